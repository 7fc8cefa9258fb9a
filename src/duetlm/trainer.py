"""`DuetTrainer`: the rollout → reward → update loop of DUET and its trained baselines.

The trainer only orchestrates; the math is elsewhere (rewards and λ: `objective.py`; advantages,
log-probs, the PPO-clip loss, KL: `grpo.py`; r(x, y): `grading.py`; prompts and signals: `protocol.py`).
One step reads as named phases, each timed (`time/<phase>_s` in the metrics):

    rollout      M samples n responses per prompt (DUET: its thinking, stopped at `</think>`) → signals z
    guided       m answers each (x, z_i) n_m times                                   (duet only)
    unguided     m answers x alone, as `objective.mu_baseline` asks                   (duet only)
    grade        every answer graded (`grading.grade_many`) on a grading thread, each part as soon as
                 it exists, overlapping the phases after it; the phase is the wait for what is left
    old_logprobs π_old by a forward pass                        (grpo.recompute_old_logprobs, see below)
    reference    log π_ref of M's tokens, for the β·KL term of M's reward             (kl_coef > 0)
    rewards      `objective.compute_reward` (M) and r(x, y_ij) (m)
    advantages   `grpo.compute_advantages`: M grouped by prompt, m by signal or prompt
    update_small PPO-clip update of m, then update_large of M (`schedule` says which run this step)
    lambda       λ ← clip(λ + η (mean L / B − 1), 0, λ_max)                            (duet, single)

Modes (`MODES`): `duet`; `single` (M alone, reward r − λL/B); `thinkprune`; `lgrpo` (algorithm.md §5).
Schedules (`SCHEDULES`): `joint` (both models every step, m first: the reference), `alternate` (M on odd
steps, m on even ones), `frozen_small` (the paper's "Fix m" ablation).

Rollouts run on the training models themselves through `HFEngine` / `DuetPipeline` (the engine switches
to eval mode and no_grad), or, for a model with `engine: vllm`, through a `VLLMEngine` serving a copy of
its weights: after each update of that model its weights are pushed to the engine (LoRA merged first),
and a resumed run starts the engine from the checkpoint; π_old of that model is then always recomputed
by the training model (as with `grpo.recompute_old_logprobs: true`), so the PPO ratio compares the
training model with itself and the two engines' numerical differences stay out of it. vLLM rollouts
run in one process only (no data parallelism).

With one PPO epoch and the HF engine, π_old is the engine's per-token log-prob of each sampled token (the untempered policy, the same distribution the update evaluates), so no extra forward pass is
spent. `grpo.recompute_old_logprobs: true` asks for π_old in the update's own precision (rollouts in
another precision or engine, e.g. bf16 autocast): with one mini-batch (`optim.mini_batches: 1`) that is
the update's forward pass itself, detached, so no pass is added either; only M's β·KL term, which needs
π_old before the update, and several mini-batches run the `old_logprobs` pass.

Forward passes of the update (and of π_old / π_ref) see [left-padded prompt | right-padded response]
rows and compute logits for the response positions only; the rows of one prompt (M's n rollouts of x,
m's n_m answers to (x, z_i)) share one pass over the prompt, whose key/value cache is repeated for them
(`micro_logprobs`); micro-batches keep a prompt's rows together, longest first.

Data parallelism (`duetlm.distributed`; docs/distributed.md). Under `accelerate launch` / `torchrun`
each process takes a contiguous shard of every step's prompts with all their rollouts and answers, so
GRPO groups stay on one process; advantages, λ and metrics come from per-sample tensors gathered in
global order; the updates draw the global mini-batches with global normalisers through DDP or FSDP2;
rank 0 writes logs and checkpoints. With `rollout.generation_block` dividing each process's share, the
samples, and so the run, do not depend on the number of processes (up to float summation order).

Reproducibility that survives a restart. Every random stream derives from (seed, step, role): the
generation seeds of M, of guided m and of unguided m (per generation call: its first prompt's place in
the global batch is part of the key, except for the call that starts the batch), and the order of the data (a seeded permutation per
epoch, read through a stored cursor). The global python/numpy/torch RNG states go into every checkpoint
too. So a run killed with SIGKILL and resumed from its last checkpoint reproduces an uninterrupted run's
per-step metrics and final weights bit for bit on CPU (tests/test_trainer.py kills one to check).

Signals. SIGTERM or SIGINT asks the run to stop: before the step's first update the step is abandoned
(nothing has changed yet), otherwise it is finished; then a checkpoint is written and `train` returns.
A second SIGINT aborts at once.

Data sources. `data.source` goes to `duetlm.problems.load_problems`, except `PREFIX:NAME` where PREFIX
is registered in `SOURCES` (`register_source`): `lab:<task>` calls
`duetlm.lab.load_problems(task, split=..., limit=...)`, which must return `Problem`s. A caller that
already has its problems passes them to `DuetTrainer(cfg, train_problems=..., val_problems=...)`.
"""

from __future__ import annotations

import copy
import hashlib
import math
import random
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from duetlm import checkpoint as ckpt
from duetlm import distributed, grpo, objective, protocol
from duetlm.config import ConfigError, ModelConfig, TrainConfig, dump_config
from duetlm.distributed import Dist
from duetlm.engines.base import Generation, SamplingParams
from duetlm.errors import DataError, DuetError
from duetlm.problems import Problem, render_question

# ---------------------------------------------------------------------------------------------------
# Dispatch tables (the config validates its names against these)
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mode:
    """What a training mode needs. The reward itself is `objective.REWARD_FUNCTIONS[mode]`."""

    uses_small: bool  # M writes a signal that m answers (DUET); otherwise M answers itself
    uses_lambda: bool  # λ enters the reward and follows the dual ascent
    uses_limit: bool = False  # ThinkPrune's length limit schedule


MODES: dict[str, Mode] = {
    "duet": Mode(uses_small=True, uses_lambda=True),
    "single": Mode(uses_small=False, uses_lambda=True),
    "thinkprune": Mode(uses_small=False, uses_lambda=False, uses_limit=True),
    "lgrpo": Mode(uses_small=False, uses_lambda=False),
}


@dataclass(frozen=True)
class Schedule:
    """Which model a step updates: `updates(step)` → (update m, update M); steps count from 1."""

    trains_small: bool
    updates: Callable[[int], tuple[bool, bool]]


SCHEDULES: dict[str, Schedule] = {
    "joint": Schedule(True, lambda step: (True, True)),
    "alternate": Schedule(True, lambda step: (step % 2 == 0, step % 2 == 1)),
    "frozen_small": Schedule(False, lambda step: (False, True)),
}


@dataclass(frozen=True)
class SmallGroup:
    """m's GRPO group: `ids(rollout_of, prompt_of)` → group id of each guided answer (N·n_m,)."""

    ids: Callable[[Tensor, Tensor], Tensor]
    size: Callable[[int, int], int]  # (n, n_small) -> answers per group


SMALL_GROUPS: dict[str, SmallGroup] = {
    "per_signal": SmallGroup(lambda rollout_of, prompt_of: rollout_of, lambda n, n_small: n_small),
    "per_prompt": SmallGroup(lambda rollout_of, prompt_of: prompt_of, lambda n, n_small: n * n_small),
}

# How many unguided answers of m each `objective.MU_BASELINES` entry needs: one estimate (n_m answers)
# per rollout, per prompt, or none. (objective.py turns the estimates into b; this says what to sample.)
UNGUIDED_PER: dict[str, str | None] = {"per_rollout": "rollout", "per_prompt": "prompt", "none": None}
assert set(UNGUIDED_PER) == set(objective.MU_BASELINES), "UNGUIDED_PER must cover objective.MU_BASELINES"
assert set(MODES) == set(objective.REWARD_FUNCTIONS), "MODES must cover objective.REWARD_FUNCTIONS"

# ---------------------------------------------------------------------------------------------------
# Data sources
# ---------------------------------------------------------------------------------------------------

SourceFn = Callable[[str, str | None, int | None], list[Problem]]


def _lab_source(name: str, split: str | None, limit: int | None) -> list[Problem]:
    try:
        from duetlm import lab
    except ImportError as err:
        raise DataError(f"data source 'lab:{name}' needs duetlm.lab ({err})") from None
    loader = getattr(lab, "load_problems", None)
    if loader is None:
        raise DataError(f"data source 'lab:{name}': duetlm.lab has no load_problems(task, split, limit)")
    return list(loader(name, split=split, limit=limit))


SOURCES: dict[str, SourceFn] = {"lab": _lab_source}


def register_source(prefix: str, fn: SourceFn) -> None:
    """Make `data.source: "PREFIX:NAME"` call `fn(NAME, split, limit) -> list[Problem]`."""
    if not prefix or ":" in prefix:
        raise ValueError(f"source prefix must be a non-empty name without ':', got {prefix!r}")
    SOURCES[prefix] = fn


def load_source(
    source: str, split: str | None = None, limit: int | None = None, **options: Any
) -> list[Problem]:
    """Problems of a data source: a registered `PREFIX:NAME` hook, else `problems.load_problems`
    (which takes `options`: column names, answer format, offline mirror)."""
    prefix, sep, name = source.partition(":")
    if sep and prefix in SOURCES:
        found = SOURCES[prefix](name, split, limit)
    else:
        from duetlm.problems import load_problems

        found = load_problems(source, split=split, limit=limit, **options)
    found = list(found)
    if not found:
        raise DataError(f"data source {source!r} (split {split!r}) has no problems")
    bad = next((p for p in found if not isinstance(p, Problem)), None)
    if bad is not None:
        raise DataError(f"data source {source!r} returned {type(bad).__name__}, not duetlm.problems.Problem")
    return found


# ---------------------------------------------------------------------------------------------------
# Reproducible streams: everything derives from (seed, step, role)
# ---------------------------------------------------------------------------------------------------


def derive_seed(seed: int, *keys: Any) -> int:
    """A 63-bit seed from (seed, *keys), stable across processes and Python versions."""
    digest = hashlib.blake2b(repr((seed, *keys)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def epoch_order(seed: int, epoch: int, size: int) -> list[int]:
    """The order of the training problems in `epoch`: a seeded permutation."""
    order = list(range(size))
    random.Random(derive_seed(seed, "data", epoch)).shuffle(order)
    return order


def batch_indices(seed: int, cursor: int, batch_size: int, size: int) -> list[int]:
    """Problems `cursor .. cursor + batch_size - 1` of the endless stream of seeded epochs."""
    out = []
    for pos in range(cursor, cursor + batch_size):
        epoch, offset = divmod(pos, size)
        out.append(epoch_order(seed, epoch, size)[offset])
    return out


def split_holdout(problems: list[Problem], size: int, seed: int) -> tuple[list[Problem], list[Problem]]:
    """(train, validation): `size` problems held out by a seeded draw, the rest for training."""
    if size >= len(problems):
        raise DataError(
            f"data.val_size={size} leaves no training problems (the source has {len(problems)}); "
            "lower val_size or set data.val_source"
        )
    order = list(range(len(problems)))
    random.Random(derive_seed(seed, "holdout")).shuffle(order)
    held = set(order[:size])
    return [p for i, p in enumerate(problems) if i not in held], [problems[i] for i in sorted(held)]


# ---------------------------------------------------------------------------------------------------
# Records passed between phases
# ---------------------------------------------------------------------------------------------------


@dataclass
class Samples:
    """A flat batch of N sampled responses of one model, with what the update needs.

    `owner` (N,) long: the index of what each sample answers (M: the prompt; guided m: M's rollout;
    unguided m: the prompt or the rollout). `old_logprobs`: π_old per response token, ragged (N × L_k).
    """

    prompt_ids: list[list[int]]
    token_ids: list[list[int]]
    texts: list[str]
    finish: list[str]
    owner: Tensor  # (N,)
    old_logprobs: list[Tensor] | None = None  # N × (L_k,)

    @classmethod
    def from_generations(cls, groups: list[list[Generation]], owners: list[int] | None = None) -> Samples:
        """Flatten engine output (one list per prompt); owner = the outer index (or `owners[outer]`)."""
        flat = [(i if owners is None else owners[i], g) for i, gs in enumerate(groups) for g in gs]
        logprobs = None
        if flat and all(g.logprobs is not None for _, g in flat):
            logprobs = [torch.tensor(g.logprobs, dtype=torch.float32) for _, g in flat]
        return cls(
            prompt_ids=[list(g.prompt_token_ids) for _, g in flat],
            token_ids=[list(g.token_ids) for _, g in flat],
            texts=[g.text for _, g in flat],
            finish=[g.finish_reason for _, g in flat],
            owner=torch.tensor([o for o, _ in flat], dtype=torch.long),
            old_logprobs=logprobs,
        )

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def lengths(self) -> Tensor:
        """(N,) generated tokens per sample."""
        return torch.tensor([len(t) for t in self.token_ids], dtype=torch.float32)

    @property
    def truncated(self) -> Tensor:
        """(N,) 1.0 where the sample ran out of tokens."""
        return torch.tensor([f == "length" for f in self.finish], dtype=torch.float32)


@dataclass
class Rollout:
    """Phase `rollout`: M's N = P·n responses (owner = prompt) and their signals."""

    large: Samples
    signals: list[protocol.Signal]  # (N,)
    signal_lengths: Tensor  # (N,) tokens of each z


@dataclass
class SmallRollout:
    """Phases `guided` / `unguided`: m's answers with z (owner = rollout) and without (owner = prompt
    for `per_prompt`, rollout for `per_rollout`; None for `none`)."""

    guided: Samples | None = None  # (N·n_m,)
    unguided: Samples | None = None  # (P·n_m,) or (N·n_m,)


@dataclass
class Grades:
    """Phase `grade`: r ∈ {0, 1} of each answer."""

    large: Tensor | None = None  # (N,) M's own answers (modes without m)
    guided: Tensor | None = None  # (N·n_m,)
    unguided: Tensor | None = None  # (P·n_m,) or (N·n_m,)


@dataclass
class Rewards:
    """Phase `rewards`. `large` (N,) is M's R_i; `small` (N·n_m,) is m's r(x, y_ij)."""

    large: Tensor  # (N,)
    lengths: Tensor  # (N,) L_i as the length term counts it
    correct: Tensor  # (N,) s_i (duet) or M's own r (baselines)
    small: Tensor | None = None  # (N·n_m,)
    baseline: Tensor | None = None  # (N,) b_i
    unguided_estimate: Tensor | None = None  # (P,) or (N,) m's success without z
    kl: Tensor | None = None  # (N,) Σ_t (log π_old − log π_ref)
    limit: int | None = None  # ThinkPrune's limit this step


@dataclass
class Advantages:
    """Phase `advantages`: one value per sequence."""

    large: Tensor  # (N,)
    small: Tensor | None = None  # (N·n_m,)


@dataclass
class UpdateStats:
    """One model's PPO update of one step (means over its mini-batches)."""

    loss: float = 0.0
    grad_norm: float = 0.0
    clip_fraction: float = 0.0
    approx_kl: float = 0.0
    ratio_max: float = 1.0
    skipped: int = 0  # mini-batches skipped for a non-finite loss or gradient
    mini_batches: int = 0

    def to_metrics(self, prefix: str) -> dict[str, float]:
        return {
            f"{prefix}/loss": self.loss,
            f"{prefix}/grad_norm": self.grad_norm,
            f"{prefix}/clip_frac": self.clip_fraction,
            f"{prefix}/approx_kl": self.approx_kl,
            f"{prefix}/ratio_max": self.ratio_max,
            f"{prefix}/skipped": float(self.skipped),
        }


@dataclass
class StepOutcome:
    """What one step hands to the logger."""

    metrics: dict[str, float]
    samples: list[dict[str, Any]] = field(default_factory=list)
    bad_update: bool = False


# ---------------------------------------------------------------------------------------------------
# Sequences → padded tensors, log-probs, the PPO update
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UpdateSpec:
    """How to run one model's update (from the config, resolved once)."""

    micro_batch_size: int
    mini_batches: int
    loss_agg: str
    clip_eps: float
    clip_eps_high: float | None
    max_tokens: int  # the configured maximum response length (seq-mean-token-sum-norm)
    grad_clip: float
    autocast: bool
    chunk_size: int | None
    # Rows with the same prompt share one forward pass of it (see `micro_logprobs`). Off with gradient
    # checkpointing, whose recomputation drops the key/value cache the shared pass hands on.
    share_prompts: bool = True


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _autocast(device: torch.device, enabled: bool) -> Any:
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if enabled else nullcontext()


def _left_padded(rows: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """(b, P) ids and mask, each row right-aligned (left padding), P = the longest row."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for k, row in enumerate(rows):
        ids[k, width - len(row) :] = torch.tensor(row)
        mask[k, width - len(row) :] = 1
    return ids, mask


def response_grid(samples: Samples, idx: list[int], pad_id: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """The responses of samples `idx`, right-padded: token ids (b, R), mask (b, R) and π_old (b, R)
    (None when the samples carry no old log-probs). R = the longest response. Every log-prob, mask
    and loss of an update lives on this grid."""
    width = max(len(samples.token_ids[i]) for i in idx)
    ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(idx), width), dtype=torch.bool)
    old = None if samples.old_logprobs is None else torch.zeros((len(idx), width), dtype=torch.float32)
    for k, i in enumerate(idx):
        n = len(samples.token_ids[i])
        ids[k, :n] = torch.tensor(samples.token_ids[i])
        mask[k, :n] = True
        if old is not None:
            old[k, :n] = samples.old_logprobs[i]
    return ids, mask, old


def micro_logprobs(
    forward: torch.nn.Module,
    samples: Samples,
    idx: list[int],
    pad_id: int,
    spec: UpdateSpec,
    prompt_model: torch.nn.Module | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """log π(response tokens) of samples `idx` on the response grid: (b, R) log-probs (0 on padding),
    (b, R) mask, (b, R) π_old (see `response_grid`). Gradients flow when they are enabled.

    Rows are laid out as [left-padded prompt | right-padded response], so the logits are computed for
    the response positions only (`logits_to_keep`): the prompt's positions never reach the LM head.
    When several rows share a prompt (a GRPO group: M's n rollouts of x, m's n_m answers to (x, z_i))
    and `spec.share_prompts`, each distinct prompt runs once (through `prompt_model`, default
    `forward`) and its key/value cache is repeated for its rows, which then run their responses only;
    gradients flow back through the shared cache. (The paper's m reads prompts of up to 18k tokens and
    writes up to 2k: sharing cuts its update's tokens by about n_m.)"""
    device = _device(forward)
    resp, mask, old = response_grid(samples, idx, pad_id)
    prompts: dict[tuple[int, ...], int] = {}
    which = [prompts.setdefault(tuple(samples.prompt_ids[i]), len(prompts)) for i in idx]
    share = spec.share_prompts and len(prompts) < len(idx)
    width = resp.shape[1]
    with _autocast(device, spec.autocast):
        if share:
            from duetlm.engines.hf import _cache_kwarg

            model = prompt_model if prompt_model is not None else forward
            p_ids, p_mask = _left_padded([list(t) for t in prompts], pad_id)
            p_pos = (p_mask.cumsum(-1) - 1).clamp(min=0)
            out = model(
                input_ids=p_ids.to(device),
                attention_mask=p_mask.to(device),
                position_ids=p_pos.to(device),
                use_cache=True,
                logits_to_keep=1,
            )
            cache = out.past_key_values if getattr(out, "cache", None) is None else out.cache
            rows = torch.tensor(which, device=device)
            cache.batch_select_indices(rows)  # (U, ...) → (b, ...): each row's prompt
            full_mask = torch.cat([p_mask.to(device)[rows], mask.long().to(device)], dim=1)  # (b, P+R)
            pos = p_mask.sum(-1).to(device)[rows, None] + torch.arange(width, device=device)  # (b, R)
            out2 = forward(
                input_ids=resp.to(device),
                attention_mask=full_mask,
                position_ids=pos,
                use_cache=True,
                **{_cache_kwarg(model): cache},
            )
            # Token 0 of a response is scored by the prompt's last position, token t by response t−1.
            logits = torch.cat([out.logits[rows], out2.logits[:, :-1]], dim=1)  # (b, R, V)
        else:
            p_ids, p_mask = _left_padded([samples.prompt_ids[i] for i in idx], pad_id)
            ids = torch.cat([p_ids, resp], dim=1).to(device)  # (b, P+R)
            full_mask = torch.cat([p_mask, mask.long()], dim=1).to(device)
            pos = (full_mask.cumsum(-1) - 1).clamp(min=0)
            out = forward(
                input_ids=ids,
                attention_mask=full_mask,
                position_ids=pos,
                use_cache=False,
                logits_to_keep=width + 1,
            )
            logits = out.logits[:, :-1]  # (b, R, V): position P−1+t scores response token t
    mask = mask.to(device)
    logp = grpo.token_logprobs(logits, resp.to(device), chunk_size=spec.chunk_size)  # (b, R)
    logp = torch.where(mask, logp.float(), torch.zeros_like(logp, dtype=torch.float32))
    return logp, mask, None if old is None else old.to(device)


def _micro_batches(samples: Samples, idx: list[int], size: int) -> Iterator[list[int]]:
    """Chunks of `idx`: rows of one prompt together (so they can share its forward pass), longest
    prompts first, and within a prompt the longest responses first, so each micro-batch pads little."""
    first: dict[tuple[int, ...], int] = {}
    for i in idx:
        first.setdefault(tuple(samples.prompt_ids[i]), i)

    def key(i: int) -> tuple[int, int, int]:
        prompt = samples.prompt_ids[i]
        return (-len(prompt), first[tuple(prompt)], -len(samples.token_ids[i]))

    ordered = sorted(idx, key=key)
    for lo in range(0, len(ordered), size):
        yield ordered[lo : lo + size]


@torch.no_grad()
def sequence_logprobs(
    model: torch.nn.Module, samples: Samples, pad_id: int, spec: UpdateSpec
) -> list[Tensor]:
    """log π(response tokens) of every sample under `model` (eval mode, no grad): N × (L_k,) on CPU.
    (Without gradients the shared prompt pass also works under gradient checkpointing.)"""
    was_training = model.training
    model.eval()
    out: list[Tensor | None] = [None] * len(samples)
    spec = replace(spec, share_prompts=True)
    try:
        for micro in _micro_batches(samples, list(range(len(samples))), spec.micro_batch_size):
            logp, mask, _ = micro_logprobs(model, samples, micro, pad_id, spec)
            logp, mask = logp.cpu(), mask.cpu()
            for r, i in enumerate(micro):
                out[i] = logp[r][mask[r]]
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]


@dataclass(frozen=True)
class RowShard:
    """Where a rank's rows sit in the global batch of an update (data parallelism).

    `offset`: global index of this rank's first row; `lengths`: response tokens of every global row
    (all ranks), for the global loss normalisers; every rank holds `len(lengths) // world_size` rows."""

    dist: Dist
    offset: int
    lengths: list[int]


def policy_update(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    samples: Samples,
    advantages: Tensor,
    pad_id: int,
    spec: UpdateSpec,
    seed: int,
    shard: RowShard | None = None,
    train_model: torch.nn.Module | None = None,
) -> UpdateStats:
    """One PPO epoch over `samples`: `spec.mini_batches` optimizer steps, each accumulating the
    gradients of its micro-batches with the mini-batch's normalisers, so the result does not depend on
    the micro-batch size. A mini-batch whose loss or gradient norm is not finite is skipped (no
    optimizer step) and counted in `skipped`.

    π_old is `samples.old_logprobs`; when it is None and there is one mini-batch, it is the update's own
    forward pass, detached (the policy has not moved yet, so that is exactly π_old in the update's
    precision, with no extra pass).

    Data parallelism (`shard`): `samples` are this rank's rows of a global batch; mini-batches are
    drawn from the global rows exactly as one process would draw them, each rank runs its share with
    the global normalisers, and `train_model` (the DDP / FSDP wrapper of `model`) averages the
    gradients, which the loss scale `world_size` turns into the single-process gradient. Every rank runs
    the same number of micro-batches (zero-weight fillers where it has fewer rows)."""
    if samples.old_logprobs is None and spec.mini_batches > 1:
        raise ValueError("policy_update needs samples.old_logprobs (π_old) with more than one mini-batch")
    device = _device(model)
    forward = train_model if train_model is not None else model
    world = shard.dist.world_size if shard is not None else 1
    offset = shard.offset if shard is not None else 0
    lengths = shard.lengths if shard is not None else [len(t) for t in samples.token_ids]
    params = [p for p in model.parameters() if p.requires_grad]
    order = list(range(len(lengths)))
    if spec.mini_batches > 1:
        random.Random(seed).shuffle(order)
    global_minis = [m.tolist() for m in np.array_split(np.array(order), spec.mini_batches) if len(m)]
    local_minis = distributed.local_minibatches(order, spec.mini_batches, offset, offset + len(samples))
    per_rank = len(lengths) // world
    stats = UpdateStats(ratio_max=0.0)
    model.train()
    for mini, part in zip(global_minis, local_minis, strict=True):
        num_tokens = sum(lengths[g] for g in mini)
        max_rows = max(sum(r * per_rank <= g < (r + 1) * per_rank for g in mini) for r in range(world))
        _, fillers = distributed.micro_batch_plan(len(part), max_rows, spec.micro_batch_size)
        micros: list[list[int] | None] = [*_micro_batches(samples, part, spec.micro_batch_size)]
        micros += [None] * fillers
        optimizer.zero_grad(set_to_none=True)
        loss_sum, clip_sum, kl_sum, finite = 0.0, 0.0, 0.0, True
        for k, micro in enumerate(micros):
            rows = micro if micro is not None else [0]  # a filler runs one row with zero weight
            with distributed.gradient_sync(forward, k == len(micros) - 1):
                logp, resp, old = micro_logprobs(forward, samples, rows, pad_id, spec, prompt_model=model)
                if micro is None:  # a filler: this rank has no more rows in this mini-batch
                    (logp.sum() * 0.0).backward()
                    continue
                if samples.old_logprobs is None:
                    old = logp.detach()
                out = grpo.policy_loss(
                    logp,
                    old,
                    advantages[rows].to(device),
                    resp,
                    clip_eps=spec.clip_eps,
                    clip_eps_high=spec.clip_eps_high,
                    loss_agg=spec.loss_agg,
                    num_seqs=len(mini),
                    num_tokens=max(num_tokens, 1),
                    max_tokens=spec.max_tokens,
                )
                if not torch.isfinite(out.loss):
                    finite = False
                    if world == 1:
                        break
                    # Keep the ranks in step (DDP and FSDP reduce every rank's backward); the step is
                    # skipped on every rank below.
                    (logp.sum() * 0.0).backward()
                    continue
                (out.loss * world).backward()
            share = resp.sum().item() / max(num_tokens, 1)  # this micro-batch's share of the tokens
            loss_sum += out.loss.item()
            clip_sum += out.clip_fraction.item() * share
            kl_sum += out.approx_kl.item() * share
            stats.ratio_max = max(stats.ratio_max, out.ratio_max.item())
        if shard is not None:
            finite = not shard.dist.any(not finite)
        grad_norm = math.nan
        if finite:
            grad_norm = distributed.full_grad_norm(torch.nn.utils.clip_grad_norm_(params, spec.grad_clip))
        if not (finite and math.isfinite(grad_norm)):
            optimizer.zero_grad(set_to_none=True)
            stats.skipped += 1
            continue
        optimizer.step()
        if shard is not None:  # each rank's sums are its share of the global mini-batch's
            loss_sum, clip_sum, kl_sum = shard.dist.all_reduce([loss_sum, clip_sum, kl_sum], "sum")
        stats.mini_batches += 1
        stats.loss += loss_sum
        stats.grad_norm += grad_norm
        stats.clip_fraction += clip_sum
        stats.approx_kl += kl_sum
    optimizer.zero_grad(set_to_none=True)
    if shard is not None:
        stats.ratio_max = shard.dist.all_reduce([stats.ratio_max], "max")[0]
    done = max(stats.mini_batches, 1)
    stats.loss, stats.grad_norm = stats.loss / done, stats.grad_norm / done
    stats.clip_fraction, stats.approx_kl = stats.clip_fraction / done, stats.approx_kl / done
    stats.ratio_max = stats.ratio_max or 1.0
    return stats


def _pad_ragged(rows: list[Tensor]) -> tuple[Tensor, Tensor]:
    """N ragged 1-D tensors → (N, L) zero-padded values and (N, L) mask."""
    values = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
    lengths = torch.tensor([len(r) for r in rows])
    mask = torch.arange(values.shape[1])[None, :] < lengths[:, None]
    return values, mask


# ---------------------------------------------------------------------------------------------------
# Phase timers and stop requests
# ---------------------------------------------------------------------------------------------------


class PhaseTimer:
    """`with timer("rollout"): ...` records seconds per phase."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


class StepAborted(Exception):
    """A stop was requested before the step changed any state; the step is abandoned."""


class StopRequest:
    """SIGTERM / SIGINT handling: the first signal asks for a checkpoint and a clean stop; a second
    SIGINT raises KeyboardInterrupt at once. Installed only on the main thread."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def install(self) -> None:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def agree(self, dist_ctx: Dist) -> None:
        """Data parallelism: a signal that reached any rank stops every rank (the launcher forwards it
        to all, but not at the same instant), so the ranks leave the loop at the same point."""
        if dist_ctx.enabled:
            signum = int(dist_ctx.all_reduce([float(self.signum or 0)], "max")[0])
            self.signum = signum or None

    def check(self, dist_ctx: Dist | None = None) -> None:
        """Raise `StepAborted` when a stop was requested (call only before a step changes state)."""
        if dist_ctx is not None:
            self.agree(dist_ctx)
        if self.signum is not None:
            raise StepAborted


class TrainingError(DuetError):
    """The run cannot go on (e.g. too many non-finite updates in a row)."""


@dataclass
class TrainResult:
    """What `DuetTrainer.train` returns."""

    run_dir: Path
    step: int
    checkpoint: Path | None
    stopped_by_signal: int | None = None
    last_metrics: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------------


@dataclass
class Policy:
    """One trained (or frozen) model with its tokenizer, rollout engine and optimizer."""

    role: str  # "large" (M) or "small" (m)
    cfg: ModelConfig
    model: torch.nn.Module
    tokenizer: Any
    engine: Any  # HFEngine over `full_model`: rollouts use the weights being trained
    optimizer: torch.optim.Optimizer | None
    spec: UpdateSpec
    wrapper: torch.nn.Module | None = None  # data parallelism: DDP over `model` (FSDP shards `model` itself)
    rollout_model: torch.nn.Module | None = None  # FSDP: an unsharded copy for generation and no-grad passes

    @property
    def forward_model(self) -> torch.nn.Module:
        """What the update's forward pass goes through (the DDP wrapper, else `model`)."""
        return self.wrapper if self.wrapper is not None else self.model

    @property
    def full_model(self) -> torch.nn.Module:
        """A module with the whole current weights on this rank: `model`, or FSDP's rollout copy."""
        return self.rollout_model if self.rollout_model is not None else self.model

    def sync_rollout_model(self) -> None:
        """FSDP: copy the updated (sharded) weights into the rollout copy (every rank calls it)."""
        if self.rollout_model is not None:
            distributed.copy_full_weights(self.model, self.rollout_model)

    def push_weights(self) -> None:
        """vLLM rollouts: load the updated weights into the engine (all of them; LoRA merged into a
        copy of the model, since vLLM takes plain checkpoint names). Nothing to do for the HF engine,
        which generates with `full_model` itself."""
        if self.cfg.engine != "vllm":
            return
        if self.is_lora:
            merged = copy.deepcopy(self.model).merge_and_unload()
            self.engine.load_weights(merged.state_dict())
            del merged
        else:
            self.engine.load_weights(self.full_model.state_dict())

    def close(self) -> None:
        """Stop the engine's own processes (vLLM); the HF engine has none."""
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return 0 if pad is None else int(pad)

    @property
    def is_lora(self) -> bool:
        return hasattr(self.model, "peft_config")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def config_changes(saved: Path, cfg: TrainConfig) -> list[str]:
    """Dotted keys whose value in `cfg` differs from the config saved at `saved` (YAML)."""
    import yaml

    if not saved.is_file():
        return []
    old = _flatten(yaml.safe_load(saved.read_text()) or {})
    new = _flatten(cfg.model_dump(mode="json"))
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


def _enable_checkpointing(model: Any) -> None:
    """Gradient (activation) checkpointing: transformers 5.24 renamed the method; older ones differ."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


class DuetTrainer:
    """Train M (and m) with GRPO on the DUET objective or a trained baseline (see the module doc).

    Construction validates everything that can be checked without loading a model: logging backends,
    the data (loaded here; an empty source is an error), and that each model path exists. `train()`
    then loads the models (from a checkpoint when resuming) and runs to `run.steps`.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        run_dir: str | Path | None = None,
        train_problems: list[Problem] | None = None,
        val_problems: list[Problem] | None = None,
    ) -> None:
        from duetlm.logging_utils import check_backends
        from duetlm.models import resolve_model_path

        self.cfg = cfg
        self.mode = MODES[cfg.mode]
        self.schedule = SCHEDULES[cfg.schedule]
        self.run_dir = Path(run_dir if run_dir is not None else cfg.run.dir)
        check_backends(cfg.logging)
        self.train_problems, self.val_problems = self._load_data(train_problems, val_problems)
        for _, mcfg in self._model_configs():
            resolve_model_path(mcfg.path)  # a missing model fails here, before any model loads
        self._check_engines()
        obj = cfg.objective
        self.lam = objective.LambdaController(
            init=obj.lambda_init,
            step_size=obj.lambda_step_size,
            bound=obj.budget,
            max_value=obj.lambda_max,
            schedule=obj.lambda_schedule,
        )
        self.step = 0  # completed steps
        self.cursor = 0  # training problems consumed (position in the stream of seeded epochs)
        self.bad_steps = 0  # consecutive steps with a skipped (non-finite) update
        self.stop = StopRequest()
        self.dist = Dist()  # one process until `init_distributed` finds a launcher
        self._prompt_lo = 0  # global index of this rank's first prompt in the current step's batch
        self._grader: ThreadPoolExecutor | None = None  # the grading thread (`_grade_later`)
        self.policies: dict[str, Policy] = {}
        self.reference: torch.nn.Module | None = None

    # -- set-up -------------------------------------------------------------------------------------

    def _check_engines(self) -> None:
        """Refuse, before any model loads, rollout engines this run cannot use (TrainConfig has already
        refused `engine: remote`): vLLM needs the vllm package and one process."""
        vllm_roles = [role for role, m in self._model_configs() if m.engine == "vllm"]
        if not vllm_roles:
            return
        names = ", ".join(f"{r}.engine" for r in vllm_roles)
        if distributed.launched_world_size() > 1:
            raise ConfigError(
                f"{names}=vllm: vLLM rollouts are supported in one process only (this launch has "
                f"WORLD_SIZE={distributed.launched_world_size()}); use engine: hf for data parallelism"
            )
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            from duetlm.engines.vllm import INSTALL_HINT, VLLMUnavailableError

            raise VLLMUnavailableError(
                f"{names}=vllm needs the vllm package, which is not installed: {INSTALL_HINT}"
            )

    def _recomputes(self, role: str) -> bool:
        """Whether π_old of `role` comes from the training model (`_recompute_old`) rather than from the
        engine's log-probs: asked for, or forced when another engine (vLLM) rolled out."""
        mcfg = self.cfg.large if role == "large" else self.cfg.small
        return self.cfg.grpo.recompute_old_logprobs or (mcfg is not None and mcfg.engine != "hf")

    def _model_configs(self) -> list[tuple[str, ModelConfig]]:
        roles = [("large", self.cfg.large)]
        if self.mode.uses_small:
            assert self.cfg.small is not None  # TrainConfig guarantees it
            roles.append(("small", self.cfg.small))
        return roles

    def _load_data(
        self, train: list[Problem] | None, val: list[Problem] | None
    ) -> tuple[list[Problem], list[Problem]]:
        data = self.cfg.data
        if train is None:
            if data.source is None:
                raise ConfigError("data.source is required: a registered name, a data file, or lab:<task>")
            train = load_source(data.source, data.split, data.limit, **data.load_options())
        elif not train:
            raise DataError("train_problems is empty")
        if val is None and data.val_source is not None:
            mirror = {"data_dir": data.data_dir} if data.data_dir else {}
            val = load_source(data.val_source, data.val_split, data.val_size or None, **mirror)
        elif val is None and data.val_size:
            train, val = split_holdout(train, data.val_size, self.cfg.seed)
        return list(train), list(val or [])

    def _update_spec(self, sampling_max_tokens: int, share_prompts: bool = True) -> UpdateSpec:
        g, o = self.cfg.grpo, self.cfg.optim
        return UpdateSpec(
            micro_batch_size=o.micro_batch_size,
            mini_batches=o.mini_batches,
            loss_agg=g.loss_agg,
            clip_eps=g.clip_eps,
            clip_eps_high=g.clip_eps_high,
            max_tokens=sampling_max_tokens,
            grad_clip=o.grad_clip,
            autocast=o.autocast == "bf16",
            chunk_size=o.logprob_chunk_size,
            share_prompts=share_prompts,
        )

    def _load_policy(self, role: str, mcfg: ModelConfig, trainable: bool, checkpoint: Path | None) -> Policy:
        from duetlm.engines.hf import HFEngine
        from duetlm.models import load_model

        lora = trainable and mcfg.lora
        spec = str(checkpoint / role) if checkpoint is not None and not lora else mcfg.path
        device = self.dist.device(mcfg.device)
        model, tokenizer = load_model(spec, dtype=mcfg.dtype, device=device, trainable=trainable)
        if trainable and mcfg.gradient_checkpointing:
            _enable_checkpointing(model)
        if lora:
            model = self._wrap_lora(model, mcfg, checkpoint / f"{role}_adapter" if checkpoint else None)
        wrapper = rollout_model = None
        if trainable and self.dist.enabled:
            if self.dist.strategy == "fsdp":
                if lora:
                    raise ConfigError(f"{role}.lora with distributed.strategy=fsdp is not supported; use ddp")
                # Generation decodes a different number of steps on each rank, which sharded weights
                # (one all-gather per layer per forward) cannot do: it runs on a full copy instead.
                rollout_model, _ = load_model(spec, dtype=mcfg.dtype, device=device)
                distributed.wrap_fsdp(model, self.cfg.distributed.fsdp_reshard_after_forward)
            else:
                wrapper = distributed.wrap_ddp(model, self.dist)
        optimizer = None
        if trainable:
            o = self.cfg.optim
            optimizer = torch.optim.AdamW(
                [p for p in model.parameters() if p.requires_grad],
                lr=o.lr_large if role == "large" else o.lr_small,
                betas=o.betas,
                weight_decay=o.weight_decay,
            )
        sampling = self.cfg.rollout.large if role == "large" else self.cfg.rollout.small
        # Shared prompt passes (micro_logprobs): not under gradient checkpointing (it drops the cache)
        # nor FSDP (each forward is a collective, and ranks would run different numbers of them).
        share = not mcfg.gradient_checkpointing and rollout_model is None
        if mcfg.engine == "vllm":
            from duetlm.engines import build_engine

            # The training copy stays the HF model above; vLLM serves the same weights: the
            # checkpoint's when resuming (`<checkpoint>/<role>` holds merged weights for LoRA too),
            # and each update's, pushed by `Policy.push_weights`.
            served = str(checkpoint / role) if checkpoint is not None else mcfg.path
            engine = build_engine(
                mcfg.model_copy(update={"path": served}), seed=self.cfg.seed, **self.cfg.rollout.vllm
            )
        else:
            engine = HFEngine(
                rollout_model if rollout_model is not None else model,
                tokenizer,
                max_batch_size=self.cfg.rollout.engine_batch_size,
            )
        return Policy(
            role,
            mcfg,
            model,
            tokenizer,
            engine,
            optimizer,
            self._update_spec(sampling.max_new_tokens, share_prompts=share),
            wrapper=wrapper,
            rollout_model=rollout_model,
        )

    def _wrap_lora(self, model: Any, mcfg: ModelConfig, adapter: Path | None) -> Any:
        from peft import LoraConfig, get_peft_model, load_peft_weights, set_peft_model_state_dict

        lc = self.cfg.lora
        model = get_peft_model(
            model,
            LoraConfig(
                r=lc.r,
                lora_alpha=lc.alpha,
                lora_dropout=lc.dropout,
                target_modules=lc.target_modules,
                task_type="CAUSAL_LM",
            ),
        )
        if mcfg.gradient_checkpointing:
            model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
        if adapter is not None:
            set_peft_model_state_dict(model, load_peft_weights(str(adapter)))
        return model

    def init_distributed(self) -> Dist:
        """Join the launcher's process group, once (a single process gets a trivial `Dist`)."""
        if not self.dist.enabled and distributed.launched_world_size() > 1:
            from duetlm.models import resolve_device

            cpu = all(resolve_device(m.device) == "cpu" for _, m in self._model_configs())
            self.dist = distributed.init_distributed(self.cfg.distributed.strategy, cpu=cpu)
            per = self.dist.shard(self.cfg.rollout.batch_size)  # checks divisibility
            block = self.cfg.rollout.generation_block
            if block is not None and (per[1] - per[0]) % block:
                raise ConfigError(
                    f"rollout.generation_block={block} must divide the {per[1] - per[0]} prompts of each of "
                    f"the {self.dist.world_size} processes (rollout.batch_size={self.cfg.rollout.batch_size})"
                )
        return self.dist

    def setup(self, checkpoint: Path | None = None) -> None:
        """Load the models (from `checkpoint` when resuming), optimizers, λ and RNG states."""
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the run has its own progress display
        self.init_distributed()
        if self.cfg.run.threads:
            torch.set_num_threads(self.cfg.run.threads)
        seed = self.cfg.seed
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)  # LoRA's initial adapter weights come from the global stream
        for role, mcfg in self._model_configs():
            trainable = role == "large" or self.schedule.trains_small
            self.policies[role] = self._load_policy(role, mcfg, trainable, checkpoint)
        if self.cfg.objective.kl_coef > 0 and not self.policies["large"].is_lora:
            from duetlm.models import load_model

            # The reference is M's starting weights (the config's path, also when resuming).
            large = self.cfg.large
            device = self.dist.device(large.device)
            self.reference, _ = load_model(large.path, dtype=large.dtype, device=device)
        if checkpoint is not None:
            self._load_state(ckpt.load_state(checkpoint))

    def _state_dict(self) -> dict[str, Any]:
        """The trainer state of a checkpoint (collective: FSDP's optimizer states are gathered). Optimizer
        states are full and keyed by parameter name, so any world size and strategy can load them."""
        return {
            "format": 2,
            "step": self.step,
            "cursor": self.cursor,
            "bad_steps": self.bad_steps,
            "lambda": self.lam.state_dict(),
            "optimizers": {
                r: distributed.optimizer_state(p.model, p.optimizer)
                for r, p in self.policies.items()
                if p.optimizer
            },
            "rng": ckpt.rng_state(),
        }

    def _load_state(self, state: dict[str, Any]) -> None:
        self.step, self.cursor, self.bad_steps = state["step"], state["cursor"], state["bad_steps"]
        self.lam.load_state_dict(state["lambda"])
        for role, opt_state in state["optimizers"].items():
            policy = self.policies.get(role)
            if policy is not None and policy.optimizer is not None:
                if state.get("format", 1) == 1:  # positional optimizer states (before data parallelism)
                    policy.optimizer.load_state_dict(opt_state)
                else:
                    distributed.load_optimizer_state(policy.model, policy.optimizer, opt_state)
        ckpt.set_rng_state(state["rng"])

    def save_checkpoint(self) -> Path:
        """Write the checkpoint of the completed step `self.step` atomically (see checkpoint.py). Every
        rank calls it (optimizer states may need gathering); rank 0 writes."""
        from duetlm.models import save_pretrained

        state = self._state_dict()
        final = ckpt.checkpoints_dir(self.run_dir) / ckpt.checkpoint_name(self.step)
        if self.dist.is_main:
            tmp = ckpt.begin_checkpoint(self.run_dir, self.step)
            for role, policy in self.policies.items():
                if policy.is_lora:
                    policy.model.save_pretrained(str(tmp / f"{role}_adapter"))
                    # A merged copy as a plain HF directory, so eval and vLLM need no peft.
                    merged = copy.deepcopy(policy.model).merge_and_unload()
                    save_pretrained(merged, policy.tokenizer, tmp / role)
                    del merged
                else:
                    save_pretrained(policy.full_model, policy.tokenizer, tmp / role)
            ckpt.save_state(tmp, state)
            dump_config(self.cfg, tmp / "config.yaml")
            final = ckpt.commit_checkpoint(tmp, self.step, self.cfg.run.keep_last)
        self.dist.barrier()  # nobody reads the checkpoint (or exits) before it is complete
        return final

    def resolve_resume(self, resume: str | None) -> Path | None:
        """`None`: a fresh run (an error if the run directory already has checkpoints); `"auto"`: the
        newest complete checkpoint of the run directory, if any; otherwise a checkpoint directory."""
        if self.dist.is_main:
            ckpt.remove_partial(self.run_dir)
        latest = ckpt.latest_checkpoint(self.run_dir)
        if resume is None:
            if latest is not None:
                raise DuetError(
                    f"run directory {self.run_dir} already has checkpoints (newest: {latest.name}); "
                    "pass --resume auto to continue it, or choose another run.dir"
                )
            return None
        if resume == "auto":
            return latest
        path = Path(resume)
        if not (path / ckpt.COMPLETE).is_file():
            raise DuetError(f"--resume {resume}: not a complete checkpoint directory (no {ckpt.COMPLETE})")
        return path

    def close(self) -> None:
        """Stop the rollout engines' own processes (vLLM). `train` leaves them running, so the
        engines can still be used after it returns; `run_training` calls this."""
        for policy in self.policies.values():
            policy.close()

    # -- the loop -----------------------------------------------------------------------------------

    def train(self, resume: str | None = None) -> TrainResult:
        """Run (or resume) training up to `run.steps`; returns where it stopped and why."""
        from duetlm.logging_utils import NullLogger, RunLogger

        self.init_distributed()
        start = self.resolve_resume(resume)
        self.setup(start)
        logger: Any = NullLogger()
        if self.dist.is_main:  # one process writes the run directory's logs
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_config(self.cfg, self.run_dir / "config.yaml")
            logger = RunLogger(
                self.run_dir,
                self.cfg.logging,
                total_steps=self.cfg.run.steps,
                start_step=self.step,
                config=self.cfg.model_dump(mode="json"),
            )
        if self.dist.enabled:
            logger.message(
                f"data parallel: {self.dist.world_size} processes ({self.dist.strategy}), "
                f"{self.cfg.rollout.batch_size // self.dist.world_size} prompts each per step"
            )
        if start is not None:
            logger.message(f"resumed from {start} (step {self.step}, λ = {self.lam.value:.4g})")
            changed = config_changes(start / "config.yaml", self.cfg)
            if changed:
                logger.message("config differs from the checkpoint's: " + ", ".join(changed))
        saved = start if start is not None else None
        saved_step = self.step if start is not None else -1
        outcome = None
        self.stop.install()
        try:
            while self.step < self.cfg.run.steps:
                try:
                    outcome = self.train_step(self.step + 1)
                except StepAborted:
                    break
                self.step += 1
                self._finish_step(outcome, logger)
                every = self.cfg.run.save_every
                if (every and self.step % every == 0) or self.step == self.cfg.run.steps:
                    saved, saved_step = self.save_checkpoint(), self.step
                self.stop.agree(self.dist)
                if self.stop.signum is not None:
                    break
            if saved_step != self.step:
                saved, saved_step = self.save_checkpoint(), self.step
            if self.stop.signum is not None:
                logger.message(f"stopped by signal {self.stop.signum}; checkpoint {saved}")
        finally:
            self.stop.restore()
            logger.close()
            if self._grader is not None:
                self._grader.shutdown()
                self._grader = None
        return TrainResult(
            run_dir=self.run_dir,
            step=self.step,
            checkpoint=saved,
            stopped_by_signal=self.stop.signum,
            last_metrics=outcome.metrics if outcome is not None else {},
        )

    def _finish_step(self, outcome: StepOutcome, logger: Any) -> None:
        """Validation, logging, sample tables and the NaN guard, after step `self.step`."""
        step, lg = self.step, self.cfg.logging
        if self.val_problems and lg.val_every and (step % lg.val_every == 0 or step == self.cfg.run.steps):
            outcome.metrics.update(self.validate())
        logger.log_step(step, outcome.metrics)
        if lg.sample_every and step % lg.sample_every == 0:
            logger.log_samples(step, outcome.samples)
        self.bad_steps = self.bad_steps + 1 if outcome.bad_update else 0
        if outcome.bad_update:
            logger.message(
                f"step {step}: non-finite loss or gradient; update skipped ({self.bad_steps} in a row)"
            )
        if self.bad_steps >= self.cfg.run.max_bad_steps:
            raise TrainingError(
                f"{self.bad_steps} steps in a row had a non-finite loss or gradient (run.max_bad_steps = "
                f"{self.cfg.run.max_bad_steps}); lower the learning rate or check the data"
            )

    def train_step(self, step: int) -> StepOutcome:
        """One step, phase by phase (module doc). Steps count from 1. With data parallelism this rank
        runs the phases on its shard of the prompts; statistics are computed over all shards."""
        cfg, timer = self.cfg, PhaseTimer()
        t0 = time.perf_counter()
        indices = batch_indices(cfg.seed, self.cursor, cfg.rollout.batch_size, len(self.train_problems))
        lo, hi = self.dist.shard(cfg.rollout.batch_size)
        self._prompt_lo = lo
        problems = [self.train_problems[i] for i in indices[lo:hi]]
        # Grading runs on its own thread, each part as soon as its answers exist, while the next
        # phases generate or score; the `grade` phase is only the wait for what is left.
        grading: dict[str, Future] = {}
        with timer("rollout"):
            roll = self._rollout(problems, step)
        small = SmallRollout()
        if not self.mode.uses_small:
            grading["large"] = self._grade_later("large", problems, roll, small)
        self.stop.check(self.dist)
        if self.mode.uses_small:
            with timer("guided"):
                small.guided = self._guided(problems, roll, step)
            grading["guided"] = self._grade_later("guided", problems, roll, small)
            self.stop.check(self.dist)
            with timer("unguided"):
                small.unguided = self._unguided(problems, roll, step)
            if small.unguided is not None:
                grading["unguided"] = self._grade_later("unguided", problems, roll, small)
            self.stop.check(self.dist)
        update_small, update_large = self.schedule.updates(step)
        update_small = update_small and small.guided is not None and self.schedule.trains_small
        if any(self._recomputes(role) for role in self.policies):
            with timer("old_logprobs"):
                self._recompute_old(roll.large, small.guided if update_small else None, update_large)
        kl = None
        if cfg.objective.kl_coef > 0:
            with timer("reference"):
                kl = self._reference_kl(roll.large)
        with timer("grade"):
            grades = Grades(**{part: torch.tensor(f.result()) for part, f in grading.items()})
        self.stop.check(self.dist)
        with timer("rewards"):
            rewards = self._rewards(step, roll, small, grades, kl)
        with timer("advantages"):
            adv = self._advantages(roll, small, rewards)
        # From here on the step changes state, so it runs to its end even when a stop is requested.
        stats: dict[str, UpdateStats] = {}
        if update_small:
            with timer("update_small"):
                stats["small"] = self._update("small", small.guided, adv.small, step)
        if update_large:
            with timer("update_large"):
                stats["large"] = self._update("large", roll.large, adv.large, step)
        batch = self.dist.gather_cat(self._per_sample(roll, small, rewards, adv))  # the global batch
        lam_used = self.lam.value
        with timer("lambda"):
            if self.mode.uses_lambda:
                self.lam.update(float(batch["penalised"].mean()))
        self.cursor += cfg.rollout.batch_size
        metrics = self._metrics(batch, stats, lam_used, rewards.limit)
        seconds = dict(timer.seconds)
        seconds["step"] = time.perf_counter() - t0
        # The slowest rank's time: the others wait for it at the next collective.
        seconds = dict(zip(seconds, self.dist.all_reduce(list(seconds.values()), "max"), strict=True))
        metrics.update({f"time/{k}_s": v for k, v in seconds.items()})
        gen_s = sum(seconds.get(k, 0.0) for k in ("rollout", "guided", "unguided"))
        metrics["throughput/gen_tokens_per_s"] = metrics["tokens/generated"] / max(gen_s, 1e-9)
        return StepOutcome(
            metrics=metrics,
            samples=self._sample_rows(problems, roll, small, rewards),
            bad_update=any(s.skipped for s in stats.values()),
        )

    # -- phases -------------------------------------------------------------------------------------

    def _sampling(self, role: str, n: int, seed: int, greedy: bool = False) -> SamplingParams:
        s = self.cfg.rollout.large if role == "large" else self.cfg.rollout.small
        return SamplingParams(
            temperature=0.0 if greedy else s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            max_new_tokens=s.max_new_tokens,
            n=n,
            seed=None if greedy else seed,
            logprobs=not greedy,
        )

    def _pipeline(self, large: SamplingParams, small: SamplingParams) -> Any:
        from duetlm.pipeline import DuetPipeline

        return DuetPipeline(self.policies["large"].engine, self.policies["small"].engine, large, small)

    def _blocks(self, num_prompts: int) -> list[tuple[int, int, int]]:
        """This step's generation calls: (local first prompt, local end, global first prompt)."""
        lo = self._prompt_lo
        blocks = distributed.generation_blocks(lo, lo + num_prompts, self.cfg.rollout.generation_block)
        return [(s - lo, e - lo, s) for s, e in blocks]

    def _block_seed(self, step: int, role: str, start: int) -> int:
        """The seed of the generation call whose first prompt is `start` in the global batch: from
        (seed, step, role[, start]); the call at the start of the batch keeps (seed, step, role), the
        seed of single-process runs made before calls were split."""
        return (
            derive_seed(self.cfg.seed, step, role)
            if start == 0
            else derive_seed(self.cfg.seed, step, role, start)
        )

    def _rollout(self, problems: list[Problem], step: int) -> Rollout:
        """M's n responses per prompt; DUET stops them at the end of thinking (protocol.large_stop)."""
        large = self.policies["large"]
        questions = [render_question(p) for p in problems]
        groups: list[list[Generation]] = []
        for a, b, start in self._blocks(len(problems)):
            params = self._sampling("large", self.cfg.rollout.n, self._block_seed(step, "large", start))
            if self.mode.uses_small:
                groups += self._pipeline(params, self._sampling("small", 1, 0)).think(questions[a:b])
            else:  # M thinks and answers itself
                prompts = [protocol.large_prompt(large.tokenizer, q) for q in questions[a:b]]
                groups += large.engine.generate(prompts, params)
        samples = Samples.from_generations(groups)
        signals = [protocol.extract_signal(text) for text in samples.texts]
        lengths = [large.engine.count_tokens(s.text) if s.text else 0 for s in signals]
        return Rollout(samples, signals, torch.tensor(lengths, dtype=torch.float32))

    def _guided(self, problems: list[Problem], roll: Rollout, step: int) -> Samples:
        """m's n_m answers to each (x, z_i); owner = the rollout i."""
        n_small = self.cfg.rollout.n_small
        prompt_of = roll.large.owner.tolist()
        groups: list[list[Generation]] = []
        for a, b, start in self._blocks(len(problems)):
            params = self._sampling("small", n_small, self._block_seed(step, "guided", start))
            rows = [i for i, p in enumerate(prompt_of) if a <= p < b]
            questions = [render_question(problems[prompt_of[i]]) for i in rows]
            signals = [roll.signals[i].text for i in rows]
            groups += self._pipeline(params, params).answer(questions, signals, n=n_small)
        return Samples.from_generations(groups)

    def _unguided(self, problems: list[Problem], roll: Rollout, step: int) -> Samples | None:
        """m's answers to x alone: n_m per prompt or per rollout, as `mu_baseline` asks (or none)."""
        per = UNGUIDED_PER[self.cfg.objective.mu_baseline]
        if per is None:
            return None
        n_small = self.cfg.rollout.n_small
        prompt_of = roll.large.owner.tolist()
        groups: list[list[Generation]] = []
        for a, b, start in self._blocks(len(problems)):
            params = self._sampling("small", n_small, self._block_seed(step, "unguided", start))
            if per == "prompt":
                owners = list(range(a, b))
            else:
                owners = [prompt_of[i] for i in range(len(prompt_of)) if a <= prompt_of[i] < b]
            questions = [render_question(problems[p]) for p in owners]
            groups += self._pipeline(params, params).answer(questions, [None] * len(questions), n=n_small)
        return Samples.from_generations(groups)

    def _grade_inputs(
        self, part: str, problems: list[Problem], roll: Rollout, small: SmallRollout
    ) -> tuple[list[str], list[Problem]]:
        """The (answer, problem) pairs of one part of the step: `large` (M's own answers, after its
        thinking), `guided` or `unguided` (m's answers)."""
        prompt_of = roll.large.owner
        if part == "large":
            answers = [protocol.split_response(t)[1] for t in roll.large.texts]
            return answers, [problems[i] for i in prompt_of.tolist()]
        samples = small.guided if part == "guided" else small.unguided
        assert samples is not None
        owners = samples.owner
        if part == "guided" or UNGUIDED_PER[self.cfg.objective.mu_baseline] == "rollout":
            owners = prompt_of[owners]
        return samples.texts, [problems[i] for i in owners.tolist()]

    def _grade(self, problems: list[Problem], roll: Rollout, small: SmallRollout) -> Grades:
        """Every answer of the step in one parallel `grade_many` call."""
        from duetlm.grading import grade_many

        parts = ["guided" if small.guided is not None else "large"]
        if small.unguided is not None:
            parts.append("unguided")
        inputs = [self._grade_inputs(part, problems, roll, small) for part in parts]
        texts = [t for ts, _ in inputs for t in ts]
        probs = [p for _, ps in inputs for p in ps]
        scores = torch.tensor(grade_many(texts, probs, workers=self.cfg.run.grading_workers))
        out, lo = Grades(), 0
        for part, (ts, _) in zip(parts, inputs, strict=True):
            setattr(out, part, scores[lo : lo + len(ts)])
            lo += len(ts)
        return out

    def _grade_later(self, part: str, problems: list[Problem], roll: Rollout, small: SmallRollout) -> Future:
        """Grade one part of the step on the grading thread while the next phase runs (a future of its
        scores). Off the main thread `grade_many` bounds each comparison in helper processes."""
        from duetlm.grading import grade_many

        if self._grader is None:
            self._grader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="duetlm-grade")
        texts, probs = self._grade_inputs(part, problems, roll, small)
        return self._grader.submit(grade_many, texts, probs, workers=self.cfg.run.grading_workers)

    def _recompute_old(self, large: Samples, guided: Samples | None, update_large: bool) -> None:
        """π_old by a forward pass in the update's precision (`grpo.recompute_old_logprobs`).

        With one mini-batch the update's own forward pass is π_old (see `policy_update`), so the pass
        is skipped and `old_logprobs` set to None, except for M when the β·KL term of its reward needs
        π_old before the update."""
        one_epoch = self.cfg.optim.mini_batches == 1
        needs = {
            "large": self.cfg.objective.kl_coef > 0 or (update_large and not one_epoch),
            "small": guided is not None and not one_epoch,
        }
        for role, samples in (("large", large), ("small", guided)):
            if samples is None or not self._recomputes(role):
                continue  # π_old stays the engine's log-probs
            if needs[role]:
                p = self.policies[role]
                samples.old_logprobs = sequence_logprobs(p.full_model, samples, p.pad_id, p.spec)
            else:
                samples.old_logprobs = None

    def _reference_kl(self, large: Samples) -> Tensor:
        """Σ_t (log π_old − log π_ref) over each of M's responses (N,): the β·KL term of M's reward."""
        policy = self.policies["large"]
        if self.reference is not None:
            ref = sequence_logprobs(self.reference, large, policy.pad_id, policy.spec)
        else:  # LoRA: the reference is the base model, i.e. M with its adapter switched off
            with policy.model.disable_adapter():
                ref = sequence_logprobs(policy.model, large, policy.pad_id, policy.spec)
        old, mask = _pad_ragged(large.old_logprobs)
        ref_pad, _ = _pad_ragged(ref)
        return grpo.sequence_kl_k1(old, ref_pad, mask)

    def _rewards(
        self, step: int, roll: Rollout, small: SmallRollout, grades: Grades, kl: Tensor | None
    ) -> Rewards:
        obj, prompt_of = self.cfg.objective, roll.large.owner
        lengths = objective.select_lengths(obj.length_measure, roll.large.lengths, roll.signal_lengths)
        baseline = estimate = small_reward = None
        if grades.guided is not None:
            n_small = self.cfg.rollout.n_small
            correct = grades.guided.view(len(roll.large), n_small).mean(1)  # (N,) s_i
            per = UNGUIDED_PER[obj.mu_baseline]
            if grades.unguided is not None:
                estimate = grades.unguided.view(-1, n_small).mean(1)  # (P,) or (N,)
            baseline = objective.marginal_utility_baseline(
                obj.mu_baseline,
                prompt_of,
                per_rollout=estimate if per == "rollout" else None,
                per_prompt=estimate if per == "prompt" else None,
            )
            small_reward = grades.guided
        else:
            correct = grades.large
        limit = None
        if self.mode.uses_limit:
            limit = objective.thinkprune_limit(
                step - 1,
                obj.thinkprune_start,
                obj.thinkprune_step,
                obj.thinkprune_every,
                obj.thinkprune_floor,
            )
        large_reward = objective.compute_reward(
            self.cfg.mode,
            correct=correct,
            lengths=lengths,
            group_ids=prompt_of,
            lam=self.lam.value,
            budget=obj.budget,
            baseline=baseline,
            limit=limit,
            kl_sum=kl,
            beta=obj.kl_coef if kl is not None else 0.0,
        )
        return Rewards(large_reward, lengths, correct, small_reward, baseline, estimate, kl, limit)

    def _advantages(self, roll: Rollout, small: SmallRollout, rewards: Rewards) -> Advantages:
        """Advantages of this rank's samples, computed over the global batch (rewards gathered from
        every rank), so estimators that look beyond a group (`batch`, `global`) see what one process
        would see."""
        g, rank = self.cfg.grpo, self.dist.rank
        lo, num_large = self._prompt_lo, len(roll.large)
        local = {"large": rewards.large, "large_group": roll.large.owner + lo}
        has_small = small.guided is not None and rewards.small is not None
        if has_small:
            owner = small.guided.owner  # local rollout of each answer
            local["small"] = rewards.small
            local["small_rollout"] = owner + rank * num_large
            local["small_prompt"] = roll.large.owner[owner] + lo
        batch = self.dist.gather_cat(local)
        large = grpo.compute_advantages(g.advantage, batch["large"], batch["large_group"], g.norm_std, g.eps)
        large = large[rank * num_large : (rank + 1) * num_large]
        small_adv = None
        if has_small:
            groups = SMALL_GROUPS[g.small_group].ids(batch["small_rollout"], batch["small_prompt"])
            small_adv = grpo.compute_advantages(g.small_advantage, batch["small"], groups, g.norm_std, g.eps)
            num_small = len(rewards.small)
            small_adv = small_adv[rank * num_small : (rank + 1) * num_small]
        return Advantages(large, small_adv)

    def _update(self, role: str, samples: Samples, advantages: Tensor, step: int) -> UpdateStats:
        p = self.policies[role]
        assert p.optimizer is not None
        seed = derive_seed(self.cfg.seed, step, role, "mini-batches")
        shard = None
        if self.dist.enabled:
            tokens = torch.tensor([len(t) for t in samples.token_ids], dtype=torch.long)
            lengths = self.dist.gather_cat({"tokens": tokens})["tokens"].tolist()
            shard = RowShard(self.dist, self.dist.rank * len(samples), lengths)
        stats = policy_update(
            p.model, p.optimizer, samples, advantages, p.pad_id, p.spec, seed, shard, p.forward_model
        )
        p.sync_rollout_model()
        p.push_weights()
        return stats

    # -- reporting ----------------------------------------------------------------------------------

    def _per_sample(
        self, roll: Rollout, small: SmallRollout, rewards: Rewards, adv: Advantages
    ) -> dict[str, Tensor]:
        """The per-sample numbers the metrics and λ need; the same shapes on every rank, so the global
        batch is their concatenation over ranks."""
        large = roll.large

        def flags(values: list[bool]) -> Tensor:
            return torch.tensor(values, dtype=torch.float64)

        t = {
            "reward": rewards.large,
            "advantage": adv.large,
            "penalised": rewards.lengths,
            "tokens": large.lengths,
            "truncated": large.truncated,
            "signal": roll.signal_lengths,
            "empty": flags([not s.text for s in roll.signals]),
            "incomplete": flags([not s.complete for s in roll.signals]),
            "correct": rewards.correct,
        }
        if small.guided is not None:
            t["small_tokens"] = small.guided.lengths
            if rewards.small is not None:
                t["small_reward"] = rewards.small
            if adv.small is not None:
                t["small_advantage"] = adv.small
        if rewards.unguided_estimate is not None and small.unguided is not None:
            t["unguided"] = rewards.unguided_estimate
            t["unguided_tokens"] = small.unguided.lengths
        if rewards.kl is not None:
            t["kl"] = rewards.kl
        return t

    def _metrics(
        self, t: dict[str, Tensor], stats: dict[str, UpdateStats], lam_used: float, limit: int | None
    ) -> dict[str, float]:
        """The step's metrics from the global batch's per-sample numbers (`_per_sample`)."""
        m: dict[str, float] = {
            "reward/large": float(t["reward"].mean()),
            "reward/large_std": float(t["reward"].std()) if len(t["reward"]) > 1 else 0.0,
            "advantage/large_abs": float(t["advantage"].abs().mean()),
            "lambda": lam_used,
            "lambda/next": self.lam.value,
            "length/penalised_mean": float(t["penalised"].mean()),
            "tokens/large_mean": float(t["tokens"].mean()),
            "tokens/large_max": float(t["tokens"].max()),
            "tokens/large_truncated": float(t["truncated"].mean()),
            "tokens/signal_mean": float(t["signal"].mean()),
            "signal/empty_frac": float(t["empty"].mean()),
            "signal/incomplete_frac": float(t["incomplete"].mean()),
        }
        generated = float(t["tokens"].sum())
        if "small_tokens" in t:
            m["success/guided"] = float(t["correct"].mean())
            m["reward/small"] = float(t["small_reward"].mean()) if "small_reward" in t else 0.0
            m["tokens/small_mean"] = float(t["small_tokens"].mean())
            generated += float(t["small_tokens"].sum())
            if "small_advantage" in t:
                m["advantage/small_abs"] = float(t["small_advantage"].abs().mean())
        else:
            m["success/large"] = float(t["correct"].mean())
        if "unguided" in t:
            m["success/unguided"] = float(t["unguided"].mean())
            m["success/marginal"] = m["success/guided"] - m["success/unguided"]
            generated += float(t["unguided_tokens"].sum())
        if "kl" in t:
            m["kl/reference"] = float(t["kl"].mean())
        if limit is not None:
            m["thinkprune/limit"] = float(limit)
        m["tokens/generated"] = generated
        for role, s in stats.items():
            m.update(s.to_metrics(role))
        return m

    def _sample_rows(
        self, problems: list[Problem], roll: Rollout, small: SmallRollout, rewards: Rewards
    ) -> list[dict[str, Any]]:
        rows = []
        n_small = self.cfg.rollout.n_small
        for i in range(min(self.cfg.logging.num_samples, len(roll.large))):
            problem = problems[int(roll.large.owner[i])]
            if small.guided is not None:
                answer = small.guided.texts[i * n_small]
            else:
                answer = protocol.split_response(roll.large.texts[i])[1]
            rows.append(
                {
                    "question": problem.question,
                    "gold": problem.answer,
                    "signal": roll.signals[i].text,
                    "answer": answer,
                    "reward": round(float(rewards.large[i]), 4),
                    "success": round(float(rewards.correct[i]), 4),
                    "large_tokens": len(roll.large.token_ids[i]),
                }
            )
        return rows

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Greedy accuracy and M tokens on the held-out problems (`val/...` metrics); with data
        parallelism each rank takes a contiguous share of them."""
        from duetlm.grading import grade_many

        shares = np.array_split(np.arange(len(self.val_problems)), self.dist.world_size)[self.dist.rank]
        problems = [self.val_problems[i] for i in shares.tolist()]
        questions = [render_question(p) for p in problems]
        large = self._sampling("large", 1, 0, greedy=True)
        answers: list[str] = []
        large_tokens: list[int] = []
        small_tokens: list[int] = []
        if questions and self.mode.uses_small:
            results = self._pipeline(large, self._sampling("small", 1, 0, greedy=True)).run(questions)
            answers = [r.answer for r in results]
            large_tokens = [r.large_tokens for r in results]
            small_tokens = [r.small_tokens for r in results]
        elif questions:
            policy = self.policies["large"]
            prompts = [protocol.large_prompt(policy.tokenizer, q) for q in questions]
            gens = [gs[0] for gs in policy.engine.generate(prompts, large)]
            answers = [protocol.split_response(g.text)[1] for g in gens]
            large_tokens = [g.num_tokens for g in gens]
        scores = grade_many(answers, problems, workers=self.cfg.run.grading_workers) if answers else []
        parts = self.dist.gather_objects((list(scores), large_tokens, small_tokens))
        scores = [x for part in parts for x in part[0]]
        large_tokens = [x for part in parts for x in part[1]]
        small_tokens = [x for part in parts for x in part[2]]
        out = {"val/accuracy": float(np.mean(scores)), "val/large_tokens": float(np.mean(large_tokens))}
        if small_tokens:
            out["val/small_tokens"] = float(np.mean(small_tokens))
        return out


def run_training(
    cfg: TrainConfig,
    resume: str | None = None,
    run_dir: str | Path | None = None,
    train_problems: list[Problem] | None = None,
    val_problems: list[Problem] | None = None,
) -> TrainResult:
    """`duetlm train`: validate, then train (or resume) to `run.steps`. Under `accelerate launch` or
    `torchrun` every process runs this; it leaves the process group at the end."""
    trainer = DuetTrainer(cfg, run_dir=run_dir, train_problems=train_problems, val_problems=val_problems)
    try:
        return trainer.train(resume=resume)
    finally:
        trainer.close()
        distributed.shutdown()


# ---------------------------------------------------------------------------------------------------
# Tiny models for the CPU config (`duetlm init-tiny`)
# ---------------------------------------------------------------------------------------------------


def _tiny_corpus(seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = [protocol.LARGE_INSTRUCTION, protocol.CONCISE_INSTRUCTION]
    for _ in range(400):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        op, value = rng.choice([("+", a + b), ("-", a - b), ("*", a * b)])
        lines.append(f"What is {a} {op} {b}? {a} {op} {b} = {value}. The answer is \\boxed{{{value}}}.")
    return lines


def init_tiny(out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """Build and save a tiny M (Qwen3, hidden 64, 2 layers) and m (hidden 32, 2 layers) sharing a BPE
    tokenizer trained locally on arithmetic text: random weights, for trying the trainer on a CPU."""
    from transformers.utils import logging as hf_logging

    from duetlm.models import save_pretrained, tiny_model, train_tokenizer

    hf_logging.disable_progress_bar()
    out = Path(out_dir)
    tokenizer = train_tokenizer(_tiny_corpus(seed), vocab_size=384)
    # head_dim 32 (not 16): the smallest head size vLLM's CPU attention accepts, so checkpoints of these
    # models also load in vLLM.
    large = tiny_model(tokenizer, arch="qwen3", hidden_size=64, num_layers=2, num_heads=2, seed=seed + 1)
    small = tiny_model(tokenizer, arch="qwen3", hidden_size=32, num_layers=2, num_heads=1, seed=seed + 2)
    out.mkdir(parents=True, exist_ok=True)
    return {
        "large": save_pretrained(large, tokenizer, out / "large"),
        "small": save_pretrained(small, tokenizer, out / "small"),
    }
