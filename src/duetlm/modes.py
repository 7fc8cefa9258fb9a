"""The names of every dispatched training choice, and the trainer's own tables (torch-free).

`config.py` validates a YAML file against these without importing torch or the trainer. The functions
behind the names live where their math is, each family in one dispatch table that must cover exactly
these names (checked where the table is defined):

| config key | names here | functions |
|---|---|---|
| `mode` | `MODES` | `objective.REWARD_FUNCTIONS` |
| `schedule` | `SCHEDULES` | (the table itself) |
| `grpo.small_group` | `SMALL_GROUPS` | (the table itself) |
| `objective.mu_baseline` | `MU_BASELINES` (with `UNGUIDED_PER`) | `objective.marginal_utility_baseline` |
| `objective.length_measure` | `LENGTH_MEASURES` | `objective.select_lengths` |
| `objective.lambda_schedule` | `LAMBDA_SCHEDULES` | `objective.LambdaController` |
| `grpo.advantage`, `grpo.small_advantage` | `ADVANTAGE_ESTIMATORS` | `grpo.ADVANTAGE_ESTIMATORS` |
| `grpo.loss_agg` | `AGGREGATIONS` | `grpo.AGGREGATIONS` |
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor


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
    size: Callable[[int, int], int]  # (n, n_m) -> answers per group


SMALL_GROUPS: dict[str, SmallGroup] = {
    "per_signal": SmallGroup(lambda rollout_of, prompt_of: rollout_of, lambda n, n_small: n_small),
    "per_prompt": SmallGroup(lambda rollout_of, prompt_of: prompt_of, lambda n, n_small: n * n_small),
}

# The marginal-utility baseline b (algorithm.md §2 item 4) and how many unguided answers of m each
# needs: one estimate (n_m answers) per rollout, per prompt, or none ("−MU").
UNGUIDED_PER: dict[str, str | None] = {"per_rollout": "rollout", "per_prompt": "prompt", "none": None}
MU_BASELINES: tuple[str, ...] = tuple(UNGUIDED_PER)
LENGTH_MEASURES: tuple[str, ...] = ("response", "signal")
LAMBDA_SCHEDULES: tuple[str, ...] = ("adaptive", "constant")
ADVANTAGE_ESTIMATORS: tuple[str, ...] = ("grpo", "batch", "global")
AGGREGATIONS: tuple[str, ...] = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def check_name(value: str, valid: Any, what: str) -> str:
    """`value` if it is one of `valid`'s names, else a ValueError listing them."""
    names = list(valid)
    if value not in names:
        raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(names)}")
    return value


def check_covers(table: Any, names: Any, what: str) -> None:
    """A dispatch table must hold exactly the names the config accepts (called where it is defined)."""
    if set(table) != set(names):
        raise RuntimeError(f"{what} holds {sorted(table)}, but duetlm.modes names {sorted(names)}")
