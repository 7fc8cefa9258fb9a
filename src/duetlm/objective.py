"""The DUET objective: M's reward, the dual-ascent multiplier λ, and the trained baselines' rewards.

Glossary: each paper symbol has one name in code, configs, metrics and docs.

| paper | meaning | code | config | metrics |
|---|---|---|---|---|
| x | the problem | `Problem`, `question` | `data.source` | |
| z | M's reasoning signal (its thinking) | `Signal`, `signal` | | `tokens/signal_mean`, `signal/*` |
| y | the final answer (m's, or M's own) | `answer` | | |
| M | the capable model that thinks | `large` | `large` | `large/*`, `tokens/large_*` |
| m | the lightweight model that answers | `small` | `small` | `small/*`, `tokens/small_mean` |
| r(x, y) | the rule-based grade, 0 or 1 | `grading.grade` | | |
| r_Mm = s_i | m's success given z_i: mean_j r(x, y_ij) | `success` | | `success/guided` |
| r_m = b_i | m's success alone: the marginal-utility baseline | `mu_baseline` | `objective.mu_baseline` | `success/unguided` |
| L_i | M's length in the length term | `lengths` | `objective.length_measure` | `length/penalised_mean` |
| B | the token budget of the length term | `budget` (`bound` in `LambdaController`, its public name) | `objective.budget` | |
| λ | the Lagrange multiplier | `lam` (`lambda` is a Python keyword) | `objective.lambda_*` | `lambda`, `lambda/next` |
| η | λ's dual-ascent step size | `step_size` | `objective.lambda_step_size` | |
| λ_max | λ's upper clip | `max_value` | `objective.lambda_max` | |
| R_i | M's reward | `Rewards.large` | | `reward/large` |

"Budget" means B only; budget forcing's cut (the truncation baseline) is its "cap" (`truncation:T`).
The comparison methods (original, truncation, prompt-based, ThinkPrune, L-GRPO) are "methods" or
"baselines"; b_i is always "the marginal-utility baseline" (`mu_baseline`).

Paper (`shared/paper/duet-paper.txt`, §3.1): maximise E[r(x, y)] subject to E[|z|] ≤ B (eq. 1), relaxed
to the Lagrangian E[r(x, y)] − λ E[|z|] / B (eq. 2) and optimised per model (eq. 3), with two additions:
the *marginal utility* reward r(x, m(x, z)) − r(x, m(x)) ("Marginal Utility", §3.1) and the *length
penalty schedule* λ_{t+1} = Π_{≥0}(λ_t + η(mean |z| / B − 1)) ("Length Penalty Schedule", §3.1). The
extracted text lost the equations; `shared/spec/algorithm.md` §2 restores them from the reference
implementation and is the specification here:

    R_i = s_i − b_i − λ_t · L_i / B − β · Σ_tokens (log π_old − log π_ref)        (algorithm.md §2 item 4)
    λ_{t+1} = clip(λ_t + η · (mean_batch(L) / B − 1), 0, λ_max)                    (algorithm.md §2 item 6)

with s_i the guided success of m given z_i, b_i the unguided success of m (marginal utility), L_i M's
length, B the budget. The baselines of paper Appendix D / algorithm.md §5 (single-model, ThinkPrune,
L-GRPO) are here too. Every function is pure (tensors and numbers in, tensors out); `LambdaController`
is the one stateful object, holding λ between steps.

Where duetlm departs from the reference (algorithm.md "Decision" items):

- λ is always projected onto λ ≥ 0 (the reference skips even that when its clipping is off); λ_max is
  configurable (`max_value`, None for no upper clip), and λ is part of every checkpoint via
  `state_dict()` (the reference loses it on resume);
- the marginal-utility baseline is a choice, `mu_baseline`: `per_rollout` (reference), `per_prompt`
  (one shared estimate per prompt, which cancels exactly under per-prompt GRPO, algorithm.md §2.1),
  `none` (the paper's "−MU" ablation);
- L_i is configurable, `length_measure`: `response` (every token M generated, the reference; with the
  stop at end-of-thinking this is |z_i| plus the stop token) or `signal` (|z_i|).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from duetlm.modes import LAMBDA_SCHEDULES, LENGTH_MEASURES, MODES, MU_BASELINES, check_covers

__all__ = [
    "LAMBDA_SCHEDULES",
    "LENGTH_MEASURES",
    "MU_BASELINES",
    "REWARD_FUNCTIONS",
    "LambdaController",
    "compute_reward",
    "duet_reward",
    "lgrpo_reward",
    "marginal_utility_baseline",
    "select_lengths",
    "single_model_reward",
    "thinkprune_limit",
    "thinkprune_reward",
]


class LambdaController:
    """The Lagrange multiplier λ of paper eq. 2, adapted by dual ascent (paper §3.1, algorithm.md §2.6).

    `update(mean_length)` applies λ ← clip(λ + η (mean_length / B − 1), 0, λ_max) for `adaptive`; the
    `constant` schedule (the paper's "−LPS" ablation) leaves λ at `init`. Call it once per step, after
    the rewards of that step were computed with the current `value`.

    init: λ_0 ≥ 0. step_size: η ≥ 0. bound: the budget B > 0 (tokens). max_value: λ_max ≥ 0, or None
    for no upper clip (λ is projected onto λ ≥ 0 in every case).
    """

    def __init__(
        self,
        init: float = 0.0,
        step_size: float = 0.01,
        bound: float = 1000,
        max_value: float | None = 1.0,
        schedule: str = "adaptive",
    ) -> None:
        if schedule not in LAMBDA_SCHEDULES:
            raise ValueError(f"unknown lambda schedule {schedule!r}; valid: {', '.join(LAMBDA_SCHEDULES)}")
        if not (math.isfinite(init) and init >= 0):
            raise ValueError(f"lambda init must be a finite number >= 0, got {init}")
        if not (math.isfinite(step_size) and step_size >= 0):
            raise ValueError(f"lambda step_size (eta) must be a finite number >= 0, got {step_size}")
        if not (math.isfinite(bound) and bound > 0):
            raise ValueError(f"lambda bound (the budget B, in tokens) must be > 0, got {bound}")
        if max_value is not None and not max_value >= 0:
            raise ValueError(f"lambda max_value must be >= 0 or None (no upper clip), got {max_value}")
        if schedule == "adaptive" and max_value is not None and init > max_value:
            raise ValueError(
                f"lambda init {init} exceeds max_value {max_value}; lower init or raise max_value"
            )
        self.init = float(init)
        self.step_size = float(step_size)
        self.bound = float(bound)
        self.max_value = None if max_value is None else float(max_value)
        self.schedule = schedule
        self._value = float(init)
        self._num_updates = 0

    @property
    def value(self) -> float:
        """The current λ_t, to be used in this step's rewards."""
        return self._value

    @property
    def num_updates(self) -> int:
        """How many times `update` was called (checkpointed with λ)."""
        return self._num_updates

    def update(self, mean_length: float) -> float:
        """λ_{t+1} = clip(λ_t + η (mean_length / B − 1), 0, λ_max) (adaptive); returns λ_{t+1}.

        mean_length: the batch mean of L (the same length measure as the rewards). Must be finite ≥ 0.
        """
        mean_length = float(mean_length)
        if not (math.isfinite(mean_length) and mean_length >= 0):
            raise ValueError(f"mean_length must be a finite number >= 0, got {mean_length}")
        self._num_updates += 1
        if self.schedule == "constant":
            return self._value
        lam = self._value + self.step_size * (mean_length / self.bound - 1.0)
        if self.max_value is not None:
            lam = min(lam, self.max_value)
        self._value = max(lam, 0.0)
        return self._value

    def state_dict(self) -> dict[str, Any]:
        """{"value": λ, "num_updates": k}: plain numbers (JSON- and torch.save-friendly)."""
        return {"value": self._value, "num_updates": self._num_updates}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore λ and the update count saved by `state_dict` (hyperparameters come from the config)."""
        missing = {"value", "num_updates"} - set(state)
        if missing:
            raise ValueError(f"lambda state is missing {sorted(missing)}; got keys {sorted(state)}")
        value = float(state["value"])
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"saved lambda value must be a finite number >= 0, got {value}")
        self._value = value
        self._num_updates = int(state["num_updates"])

    def __repr__(self) -> str:
        return (
            f"LambdaController(value={self._value}, init={self.init}, step_size={self.step_size}, "
            f"bound={self.bound}, max_value={self.max_value}, schedule={self.schedule!r})"
        )


# ---------------------------------------------------------------------------------------------------
# Marginal utility baseline b_i and length L_i
# ---------------------------------------------------------------------------------------------------


def _baseline_per_rollout(group_ids: Tensor, per_rollout: Tensor | None, per_prompt: Tensor | None) -> Tensor:
    if per_rollout is None:
        raise ValueError(
            "mu_baseline 'per_rollout' needs per_rollout: one estimate of m(.|x) per rollout (N,)"
        )
    if per_rollout.shape != group_ids.shape:
        raise ValueError(
            f"per_rollout must be (N,) = {tuple(group_ids.shape)}, got {tuple(per_rollout.shape)}"
        )
    return per_rollout


def _baseline_per_prompt(group_ids: Tensor, per_rollout: Tensor | None, per_prompt: Tensor | None) -> Tensor:
    if per_prompt is None:
        raise ValueError(
            "mu_baseline 'per_prompt' needs per_prompt: one estimate per prompt (G,), indexed by group_ids"
        )
    if per_prompt.dim() != 1:
        raise ValueError(f"per_prompt must be 1-D (G,), got shape {tuple(per_prompt.shape)}")
    return per_prompt[group_ids]  # (N,)


def _baseline_none(group_ids: Tensor, per_rollout: Tensor | None, per_prompt: Tensor | None) -> Tensor:
    like = per_rollout if per_rollout is not None else per_prompt
    dtype = like.dtype if like is not None else torch.get_default_dtype()
    return torch.zeros(group_ids.shape, dtype=dtype, device=group_ids.device)


_BASELINES: dict[str, Callable[[Tensor, Tensor | None, Tensor | None], Tensor]] = {
    "per_rollout": _baseline_per_rollout,
    "per_prompt": _baseline_per_prompt,
    "none": _baseline_none,
}
check_covers(_BASELINES, MU_BASELINES, "objective._BASELINES")


def marginal_utility_baseline(
    mode: str,
    group_ids: Tensor,
    per_rollout: Tensor | None = None,
    per_prompt: Tensor | None = None,
) -> Tensor:
    """The marginal-utility baseline b_i = r(x, m(x)) of paper §3.1 ("Marginal Utility"), as (N,).

    mode (`mu_baseline`, algorithm.md §2 item 4):
    - `per_rollout`: `per_rollout` (N,), an independent estimate of m's unguided success per rollout;
    - `per_prompt`: `per_prompt` (G,), one estimate per prompt, broadcast as per_prompt[group_ids]
      (group_ids must then be prompt indices in [0, G));
    - `none`: zeros (the "−MU" ablation).
    """
    try:
        fn = _BASELINES[mode]
    except KeyError:
        raise ValueError(f"unknown mu_baseline {mode!r}; valid: {', '.join(MU_BASELINES)}") from None
    return fn(group_ids, per_rollout, per_prompt)


def select_lengths(measure: str, response_lengths: Tensor, signal_lengths: Tensor) -> Tensor:
    """L_i of the length penalty λ L_i / B (algorithm.md §2 item 4, `length_measure`), (N,).

    `response`: every token M generated (the reference); `signal`: the tokens of the signal z_i.
    """
    if measure == "response":
        return response_lengths
    if measure == "signal":
        return signal_lengths
    raise ValueError(f"unknown length_measure {measure!r}; valid: {', '.join(LENGTH_MEASURES)}")


# ---------------------------------------------------------------------------------------------------
# Rewards
# ---------------------------------------------------------------------------------------------------


def _check_budget(lam: float, budget: float) -> None:
    if not budget > 0:
        raise ValueError(f"budget B must be > 0 tokens, got {budget}")
    if not (math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lambda must be a finite number >= 0, got {lam}")


def _kl_term(reward: Tensor, kl_sum: Tensor | None, beta: float) -> Tensor:
    if beta == 0.0:
        return reward
    if kl_sum is None:
        raise ValueError(f"beta = {beta} needs kl_sum (N,): Σ_t (log π_old − log π_ref) per response")
    return reward - beta * kl_sum.to(reward.dtype)


def _float(x: Tensor) -> Tensor:
    return x if x.dtype.is_floating_point else x.to(torch.get_default_dtype())


def duet_reward(
    guided_success: Tensor,
    mu_baseline: Tensor,
    lengths: Tensor,
    lam: float,
    budget: float,
    kl_sum: Tensor | None = None,
    beta: float = 0.0,
) -> Tensor:
    """M's DUET reward R_i = s_i − b_i − λ L_i / B − β Σ_t (log π_old − log π_ref) (algorithm.md §2.4).

    Paper eq. 3 with the marginal-utility reward of §3.1 and the KL penalty of Appendix C / §E.7.
    guided_success: (N,) s_i = mean_j r(x, y_ij), m's success given z_i.
    mu_baseline: (N,) b_i from `marginal_utility_baseline`. lengths: (N,) L_i (`select_lengths`).
    lam: λ_t (the value before this step's update). budget: B > 0.
    kl_sum: (N,) Σ_t k1 over M's response (`duetlm.grpo.sequence_kl_k1`), needed when beta ≠ 0.
    Returns (N,) in the dtype of guided_success (float32 if it is an integer tensor).
    """
    _check_budget(lam, budget)
    s = _float(guided_success)
    reward = s - mu_baseline.to(s.dtype) - lam * lengths.to(s.dtype) / budget
    return _kl_term(reward, kl_sum, beta)


def single_model_reward(
    correct: Tensor,
    lengths: Tensor,
    lam: float,
    budget: float,
    kl_sum: Tensor | None = None,
    beta: float = 0.0,
) -> Tensor:
    """Single-model baseline reward r(x, y_M) − λ L / B (− β Σ k1) (paper App. D; algorithm.md §5), (N,).

    The DUET reward of eq. 2 without m and without marginal utility; λ follows the same schedule.
    correct: (N,) r ∈ {0, 1} of M's own answer. lengths: (N,) M's generated tokens.
    """
    _check_budget(lam, budget)
    r = _float(correct)
    return _kl_term(r - lam * lengths.to(r.dtype) / budget, kl_sum, beta)


def thinkprune_limit(
    step: int, start: int = 8000, step_size: int = 1000, every: int = 20, floor: int = 1000
) -> int:
    """ThinkPrune's length limit at training step `step` (0-based): max(floor, start − step_size·⌊step/every⌋).

    Paper App. D (Hou et al., 2025): start at 8000 tokens, minus 1000 every 20 steps, never below 1000;
    steps 0-19 use 8000, steps 20-39 use 7000, ..., steps ≥ 140 use 1000.
    """
    if step < 0 or every < 1 or step_size < 0 or floor < 0 or start < floor:
        raise ValueError(
            f"need step >= 0, every >= 1, step_size >= 0, 0 <= floor <= start; got step={step}, "
            f"start={start}, step_size={step_size}, every={every}, floor={floor}"
        )
    return max(floor, start - step_size * (step // every))


def thinkprune_reward(
    correct: Tensor, lengths: Tensor, limit: int, kl_sum: Tensor | None = None, beta: float = 0.0
) -> Tensor:
    """ThinkPrune reward r · 1[L ≤ limit] (paper App. D; algorithm.md §5), (N,).

    correct: (N,) r of the answer found within the limit: grade the response truncated to `limit`
    tokens (or generate with max_new_tokens = limit); a response longer than `limit` gets 0 regardless.
    """
    r = _float(correct)
    within = lengths <= limit  # (N,)
    return _kl_term(torch.where(within, r, torch.zeros_like(r)), kl_sum, beta)


def lgrpo_reward(
    correct: Tensor, lengths: Tensor, group_ids: Tensor, kl_sum: Tensor | None = None, beta: float = 0.0
) -> Tensor:
    """L-GRPO reward r − p with p = L / max_{correct j in group} L_j on correct responses only, (N,).

    Paper App. D (Song and Zheng, 2025); algorithm.md §5. correct: (N,) r ∈ {0, 1}; lengths: (N,);
    group_ids: (N,) the prompt of each response. An incorrect response gets 0; a correct one gets
    1 − L / L_max ∈ [0, 1), so the longest correct response of its group gets 0 as well.
    """
    r = _float(correct)
    length = lengths.to(r.dtype)
    is_correct = r > 0  # (N,)
    uniq, inverse = torch.unique(group_ids, return_inverse=True)  # (G,), (N,) in [0, G)
    longest = torch.zeros(uniq.numel(), dtype=r.dtype, device=r.device).scatter_reduce(
        0, inverse, torch.where(is_correct, length, torch.zeros_like(length)), "amax"
    )  # (G,) 0 for a group without correct responses
    p = length / longest[inverse].clamp(min=1.0)  # (N,)
    return _kl_term(torch.where(is_correct, r - p, torch.zeros_like(r)), kl_sum, beta)


# ---------------------------------------------------------------------------------------------------
# One dispatch table for the reward modes
# ---------------------------------------------------------------------------------------------------


def _need_lambda(mode: str, lam: float | None, budget: float | None) -> None:
    if lam is None or budget is None:
        raise ValueError(f"reward mode {mode!r} needs lam (the current LambdaController.value) and budget B")


def _duet(*, success, lengths, group_ids, lam, budget, mu_baseline, limit, kl_sum, beta) -> Tensor:
    if mu_baseline is None:
        raise ValueError("reward mode 'duet' needs mu_baseline b (N,) from marginal_utility_baseline")
    _need_lambda("duet", lam, budget)
    return duet_reward(success, mu_baseline, lengths, lam, budget, kl_sum=kl_sum, beta=beta)


def _single(*, success, lengths, group_ids, lam, budget, mu_baseline, limit, kl_sum, beta) -> Tensor:
    _need_lambda("single", lam, budget)
    return single_model_reward(success, lengths, lam, budget, kl_sum=kl_sum, beta=beta)


def _thinkprune(*, success, lengths, group_ids, lam, budget, mu_baseline, limit, kl_sum, beta) -> Tensor:
    if limit is None:
        raise ValueError("reward mode 'thinkprune' needs limit (tokens) from thinkprune_limit(step)")
    return thinkprune_reward(success, lengths, limit, kl_sum=kl_sum, beta=beta)


def _lgrpo(*, success, lengths, group_ids, lam, budget, mu_baseline, limit, kl_sum, beta) -> Tensor:
    return lgrpo_reward(success, lengths, group_ids, kl_sum=kl_sum, beta=beta)


REWARD_FUNCTIONS: dict[str, Callable[..., Tensor]] = {
    "duet": _duet,
    "single": _single,
    "thinkprune": _thinkprune,
    "lgrpo": _lgrpo,
}
check_covers(REWARD_FUNCTIONS, MODES, "objective.REWARD_FUNCTIONS")


def compute_reward(
    mode: str,
    *,
    success: Tensor,
    lengths: Tensor,
    group_ids: Tensor,
    lam: float | None = None,
    budget: float | None = None,
    mu_baseline: Tensor | None = None,
    limit: int | None = None,
    kl_sum: Tensor | None = None,
    beta: float = 0.0,
) -> Tensor:
    """M's reward (N,) for `mode` in `REWARD_FUNCTIONS` (duet | single | thinkprune | lgrpo).

    `success` is the guided success s_i for `duet` and M's own r for the baselines; `mu_baseline` is
    b_i; each mode uses only the arguments its function takes (see `duet_reward`, `single_model_reward`,
    `thinkprune_reward`, `lgrpo_reward`).
    """
    try:
        fn = REWARD_FUNCTIONS[mode]
    except KeyError:
        raise ValueError(f"unknown reward mode {mode!r}; valid: {', '.join(REWARD_FUNCTIONS)}") from None
    return fn(
        success=success,
        lengths=lengths,
        group_ids=group_ids,
        lam=lam,
        budget=budget,
        mu_baseline=mu_baseline,
        limit=limit,
        kl_sum=kl_sum,
        beta=beta,
    )
