"""The phases of one training step, as functions with explicit inputs (algorithm.md §2-§4):

    rollout      M's n responses per prompt through the pipeline (DUET: its thinking, stopped at
                 `</think>`; M-alone modes: thinking and its own answer) → signals z
    guided       m answers each (x, z_i) n_m times                                   (duet only)
    unguided     m answers x alone, as `objective.mu_baseline` asks                   (duet only)
    grade        every answer graded (`grading.grade_many`) on a grading thread (`Grading`), each
                 part as soon as it exists, overlapping the phases after it
    old_logprobs π_old by a forward pass where the engine's log-probs will not do (`recompute_old`)
    reference    log π_ref of M's tokens: β·KL in its reward (kl_coef), k3 in its loss (kl_loss_coef)
    rewards      `objective.compute_reward` (M) and r(x, y_ij) (m)
    advantages   `grpo.compute_advantages` over the global batch: M grouped by prompt, m per
                 `grpo.small_group`
    update       one PPO-clip epoch of one model (`update.policy_update`)
    lambda       λ ← clip(λ + η (mean L / B − 1), 0, λ_max)                  (`LambdaController.update`)

Every generation goes through `DuetPipeline` (the one M → z → m path of training, eval, the demo and
the server), so training grades M's own answers exactly as `duetlm eval --methods original` does
(`protocol.own_answer`).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import torch
from torch import Tensor

from duetlm import grpo, objective, protocol
from duetlm.config import GRPOConfig, ObjectiveConfig, SamplingConfig
from duetlm.distributed import Dist
from duetlm.engines.base import Generation, SamplingParams
from duetlm.modes import MODES, SMALL_GROUPS, UNGUIDED_PER
from duetlm.pipeline import DuetPipeline, signals_of
from duetlm.problems import Problem, render_question
from duetlm.train.policy import Policy
from duetlm.train.records import Advantages, Grades, Rewards, Rollout, Samples, SmallRollout, UpdateStats
from duetlm.train.streams import StepBatch
from duetlm.train.update import RowShard, pad_ragged, policy_update, sequence_logprobs


def sampling(s: SamplingConfig, n: int, seed: int | None, greedy: bool = False) -> SamplingParams:
    """A model's decoding for one call: rollouts sample with per-token log-probs (π_old); validation
    decodes greedily."""
    return SamplingParams(
        temperature=0.0 if greedy else s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        max_new_tokens=s.max_new_tokens,
        n=n,
        seed=None if greedy else seed,
        logprobs=not greedy,
    )


def within_prompt_limit(
    pipe: DuetPipeline, problems: list[Problem], limit: int | None
) -> tuple[list[Problem], list[Problem]]:
    """(the problems whose M prompt fits `limit` tokens, those that do not): an over-long prompt is
    skipped, never cut (a cut problem is another problem)."""
    if limit is None:
        return problems, []
    prompts = pipe.think_prompts([render_question(p) for p in problems])
    fits = [pipe.large.count_tokens(p) <= limit for p in prompts]
    return [p for p, ok in zip(problems, fits, strict=True) if ok], [
        p for p, ok in zip(problems, fits, strict=True) if not ok
    ]


def large_rollout_config(mode: str, large: SamplingConfig, obj: ObjectiveConfig, step: int) -> SamplingConfig:
    """M's rollout decoding at `step` (from 1): ThinkPrune decodes within its current length limit
    (App. D: max_new_tokens = the limit, so no token past it is generated and then zeroed), every other
    mode as configured."""
    if not MODES[mode].uses_limit:
        return large
    return large.model_copy(update={"max_new_tokens": min(large.max_new_tokens, thinkprune_limit(obj, step))})


def thinkprune_limit(obj: ObjectiveConfig, step: int) -> int:
    """ThinkPrune's length limit at `step` (from 1), from the config's schedule."""
    return objective.thinkprune_limit(
        step - 1, obj.thinkprune_start, obj.thinkprune_step, obj.thinkprune_every, obj.thinkprune_floor
    )


def rollout(pipe: DuetPipeline, batch: StepBatch, large: SamplingConfig, n: int) -> Rollout:
    """M's n responses per prompt: its thinking stopped at the end of thinking when the pipeline has
    an m (`think`), else thinking and its own answer (`respond`)."""
    questions = batch.questions
    groups: list[list[Generation]] = []
    for a, b, start in batch.calls():
        call = replace(pipe, large_sampling=sampling(large, n, batch.call_seed("large", start)))
        groups += call.think(questions[a:b]) if pipe.small is not None else call.respond(questions[a:b])
    samples = Samples.from_generations(groups)
    signals = signals_of([g for gs in groups for g in gs])
    lengths = [pipe.large.count_tokens(s.text) if s.text else 0 for s in signals]
    return Rollout(samples, signals, torch.tensor(lengths, dtype=torch.float32))


def guided(
    pipe: DuetPipeline, batch: StepBatch, roll: Rollout, small: SamplingConfig, n_small: int
) -> Samples:
    """m's n_m answers to each (x, z_i); owner = the rollout i."""
    prompt_of = roll.large.owner.tolist()
    groups: list[list[Generation]] = []
    for a, b, start in batch.calls():
        call = replace(pipe, small_sampling=sampling(small, n_small, batch.call_seed("guided", start)))
        rows = [i for i, p in enumerate(prompt_of) if a <= p < b]
        questions = [render_question(batch.problems[prompt_of[i]]) for i in rows]
        groups += call.answer(questions, [roll.signals[i].text for i in rows], n=n_small)
    return Samples.from_generations(groups)


def unguided(
    pipe: DuetPipeline,
    batch: StepBatch,
    roll: Rollout,
    small: SamplingConfig,
    n_small: int,
    mu_baseline: str,
) -> Samples | None:
    """m's answers to x alone: n_m per prompt or per rollout, as `mu_baseline` asks (or none)."""
    per = UNGUIDED_PER[mu_baseline]
    if per is None:
        return None
    prompt_of = roll.large.owner.tolist()
    groups: list[list[Generation]] = []
    for a, b, start in batch.calls():
        call = replace(pipe, small_sampling=sampling(small, n_small, batch.call_seed("unguided", start)))
        owners = list(range(a, b)) if per == "prompt" else [p for p in prompt_of if a <= p < b]
        questions = [render_question(batch.problems[p]) for p in owners]
        groups += call.answer(questions, [None] * len(questions), n=n_small)
    return Samples.from_generations(groups)


def grade_inputs(
    part: str, problems: list[Problem], roll: Rollout, small: SmallRollout, mu_baseline: str
) -> tuple[list[str], list[Problem]]:
    """The (answer, problem) pairs of one part of the step: `large` (M's own answers,
    `protocol.own_answer`), `guided` or `unguided` (m's answers)."""
    prompt_of = roll.large.owner
    if part == "large":
        answers = [protocol.own_answer(t) for t in roll.large.texts]
        return answers, [problems[i] for i in prompt_of.tolist()]
    samples = small.guided if part == "guided" else small.unguided
    assert samples is not None
    owners = samples.owner
    if part == "guided" or UNGUIDED_PER[mu_baseline] == "rollout":
        owners = prompt_of[owners]
    return samples.texts, [problems[i] for i in owners.tolist()]


class Grading:
    """The grading thread: each part of a step is graded while the next phases generate or score.
    Off the main thread `grade_many` bounds each comparison in helper processes."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool: ThreadPoolExecutor | None = None

    def submit(self, texts: list[str], problems: list[Problem]) -> Future:
        """A future of r ∈ {0, 1} for each (answer, problem)."""
        from duetlm.grading import grade_many

        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="duetlm-grade")
        return self._pool.submit(grade_many, texts, problems, workers=self.workers)

    @staticmethod
    def collect(parts: dict[str, Future]) -> Grades:
        """Wait for the parts (`large`, `guided`, `unguided`) and stack them into `Grades`."""
        return Grades(**{part: torch.tensor(f.result()) for part, f in parts.items()})

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


def recompute_old(
    policies: dict[str, Policy],
    samples: dict[str, Samples | None],
    needed: dict[str, bool],
) -> None:
    """π_old of each role's `samples` by a forward pass in the update's precision, where `needed`;
    elsewhere set to None, so the update's own first forward pass (detached) is π_old. Roles left
    out of `samples` keep the engine's log-probs."""
    for role, s in samples.items():
        if s is None:
            continue
        if needed[role]:
            p = policies[role]
            s.old_logprobs = sequence_logprobs(p.full_model, s, p.pad_id, p.spec)
        else:
            s.old_logprobs = None


def old_logprobs_needed(
    kl_coef: float, mini_batches: int, update_large: bool, has_guided: bool
) -> dict[str, bool]:
    """Where π_old needs a pass of its own: M's β·KL term needs it before the update, and several
    mini-batches need it fixed across them; with one mini-batch the update's first pass is π_old."""
    several = mini_batches > 1
    return {"large": kl_coef > 0 or (update_large and several), "small": has_guided and several}


def reference_logprobs(policy: Policy, reference: torch.nn.Module | None, large: Samples) -> list[Tensor]:
    """log π_ref of each of M's response tokens (N × (L_k,)). With LoRA the reference is the base
    model, i.e. M with its adapter switched off."""
    if reference is not None:
        return sequence_logprobs(reference, large, policy.pad_id, policy.spec)
    with policy.model.disable_adapter():
        return sequence_logprobs(policy.model, large, policy.pad_id, policy.spec)


def reference_kl(large: Samples, ref: list[Tensor]) -> Tensor:
    """Σ_t (log π_old − log π_ref) over each of M's responses (N,): the β·KL term of M's reward."""
    old, mask = pad_ragged(large.old_logprobs)
    ref_pad, _ = pad_ragged(ref)
    return grpo.sequence_kl_k1(old, ref_pad, mask)


def _mu_baseline(
    obj: ObjectiveConfig, prompt_of: Tensor, grades: Grades, n_small: int
) -> tuple[Tensor, Tensor | None]:
    """(b_i (N,), m's unguided success per prompt or rollout) from the unguided grades."""
    per = UNGUIDED_PER[obj.mu_baseline]
    unguided = None if grades.unguided is None else grades.unguided.view(-1, n_small).mean(1)  # (P,) | (N,)
    b = objective.marginal_utility_baseline(
        obj.mu_baseline,
        prompt_of,
        per_rollout=unguided if per == "rollout" else None,
        per_prompt=unguided if per == "prompt" else None,
    )
    return b, unguided


def rewards(
    mode: str,
    obj: ObjectiveConfig,
    lam: float,
    step: int,
    roll: Rollout,
    grades: Grades,
    n_small: int,
    kl: Tensor | None = None,
) -> Rewards:
    """M's reward R_i = s_i − b_i − λ L_i / B − β KL (duet; the baselines per algorithm.md §5) and m's
    r(x, y_ij). `lam` is λ_t, `step` counts from 1 (ThinkPrune's limit schedule)."""
    prompt_of = roll.large.owner
    lengths = objective.select_lengths(obj.length_measure, roll.large.lengths, roll.signal_lengths)
    b = unguided = small_reward = None
    if grades.guided is not None:
        success = grades.guided.view(len(roll.large), n_small).mean(1)  # (N,) s_i
        b, unguided = _mu_baseline(obj, prompt_of, grades, n_small)
        small_reward = grades.guided
    else:
        success = grades.large
    limit = thinkprune_limit(obj, step) if MODES[mode].uses_limit else None
    large_reward = objective.compute_reward(
        mode,
        success=success,
        lengths=lengths,
        group_ids=prompt_of,
        lam=lam,
        budget=obj.budget,
        mu_baseline=b,
        limit=limit,
        kl_sum=kl,
        beta=obj.kl_coef if kl is not None else 0.0,
    )
    return Rewards(large_reward, lengths, success, small_reward, b, unguided, kl, limit)


def advantages(
    g: GRPOConfig, roll: Rollout, small: SmallRollout, rewards: Rewards, dist: Dist, prompt_lo: int
) -> Advantages:
    """Advantages of this rank's samples, computed over the global batch (rewards gathered from every
    rank), so estimators that look beyond a group (`batch`, `global`) see what one process would
    see. `prompt_lo`: the global index of this rank's first prompt."""
    rank, num_large = dist.rank, len(roll.large)
    local = {"large": rewards.large, "large_group": roll.large.owner + prompt_lo}
    has_small = small.guided is not None and rewards.small is not None
    if has_small:
        owner = small.guided.owner  # local rollout of each answer
        local["small"] = rewards.small
        local["small_rollout"] = owner + rank * num_large
        local["small_prompt"] = roll.large.owner[owner] + prompt_lo
    batch = dist.gather_cat(local)
    large = grpo.compute_advantages(g.advantage, batch["large"], batch["large_group"], g.norm_std, g.eps)
    large = large[rank * num_large : (rank + 1) * num_large]
    small_adv = None
    if has_small:
        groups = SMALL_GROUPS[g.small_group].ids(batch["small_rollout"], batch["small_prompt"])
        small_adv = grpo.compute_advantages(g.small_advantage, batch["small"], groups, g.norm_std, g.eps)
        num_small = len(rewards.small)
        small_adv = small_adv[rank * num_small : (rank + 1) * num_small]
    return Advantages(large, small_adv)


def update(policy: Policy, samples: Samples, advantages: Tensor, seed: int, dist: Dist) -> UpdateStats:
    """One PPO-clip epoch of `policy` on its samples (mini-batches drawn with `seed`), then the new
    weights reach its rollout copy and engine."""
    assert policy.optimizer is not None
    shard = None
    if dist.enabled:
        tokens = torch.tensor([len(t) for t in samples.token_ids], dtype=torch.long)
        lengths = dist.gather_cat({"tokens": tokens})["tokens"].tolist()
        shard = RowShard(dist, dist.rank * len(samples), lengths)
    stats = policy_update(
        policy.model,
        policy.optimizer,
        samples,
        advantages,
        policy.pad_id,
        policy.spec,
        seed,
        shard,
        policy.forward_model,
    )
    policy.sync_rollout_model()
    policy.push_weights()
    return stats


@torch.no_grad()
def validate(pipe: DuetPipeline, problems: list[Problem], workers: int, dist: Dist) -> dict[str, float]:
    """Greedy accuracy and M tokens on held-out problems (`val/...` metrics), through the pipeline
    exactly as `duetlm eval` runs it: `duet` (M → z → m) when the pipeline has an m, else `original`
    (M thinks and answers). With data parallelism each rank takes a contiguous share."""
    from duetlm.grading import grade_many

    shares = np.array_split(np.arange(len(problems)), dist.world_size)[dist.rank]
    mine = [problems[i] for i in shares.tolist()]
    questions = [render_question(p) for p in mine]
    results = []
    if questions:
        results = pipe.run(questions) if pipe.small is not None else pipe.original(questions)
    scores = grade_many([r.answer for r in results], mine, workers=workers) if results else []
    large_tokens = [r.large_tokens for r in results]
    small_tokens = [r.small_tokens for r in results] if pipe.small is not None else []
    parts = dist.gather_objects((list(scores), large_tokens, small_tokens))
    scores = [x for part in parts for x in part[0]]
    large_tokens = [x for part in parts for x in part[1]]
    small_tokens = [x for part in parts for x in part[2]]
    out = {"val/accuracy": float(np.mean(scores)), "val/large_tokens": float(np.mean(large_tokens))}
    if small_tokens:
        out["val/small_tokens"] = float(np.mean(small_tokens))
    return out
