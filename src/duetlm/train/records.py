"""The typed records one training step passes from phase to phase (shapes in the field comments).

N = P·n is M's rollouts of the step's P prompts; each has n_m answers of m (N·n_m guided answers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from duetlm.engines.base import Generation
from duetlm.protocol import Signal


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
    ref_logprobs: list[Tensor] | None = None  # N × (L_k,): log π_ref, for the KL loss (kl_loss_coef)

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
    """Phase `rollout`: M's N = P·n responses (owner = prompt) and their signals z."""

    large: Samples
    signals: list[Signal]  # (N,)
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

    large: Tensor  # (N,) R_i
    lengths: Tensor  # (N,) L_i as the length term counts it
    success: Tensor  # (N,) s_i = mean_j r(x, y_ij) (duet), or M's own r(x, y) (M-alone modes)
    small: Tensor | None = None  # (N·n_m,) r(x, y_ij)
    mu_baseline: Tensor | None = None  # (N,) b_i, the marginal-utility baseline
    unguided_success: Tensor | None = None  # (P,) or (N,) m's success without z
    kl: Tensor | None = None  # (N,) Σ_t (log π_old − log π_ref)
    limit: int | None = None  # ThinkPrune's length limit this step


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
    kl_loss: float = 0.0  # the k3 KL term of the loss (before its coefficient); 0 without it
    ratio_max: float = 1.0
    skipped: int = 0  # mini-batches skipped for a non-finite loss or gradient
    mini_batches: int = 0

    def to_metrics(self, prefix: str) -> dict[str, float]:
        return {
            f"{prefix}/loss": self.loss,
            f"{prefix}/grad_norm": self.grad_norm,
            f"{prefix}/clip_frac": self.clip_fraction,
            f"{prefix}/approx_kl": self.approx_kl,
            f"{prefix}/kl_loss": self.kl_loss,
            f"{prefix}/ratio_max": self.ratio_max,
            f"{prefix}/skipped": float(self.skipped),
        }


@dataclass
class StepOutcome:
    """What one step hands to the logger."""

    metrics: dict[str, float]
    samples: list[dict[str, Any]] = field(default_factory=list)
    bad_update: bool = False


@dataclass
class TrainResult:
    """What `DuetTrainer.train` returns."""

    run_dir: Path
    step: int
    checkpoint: Path | None
    stop_signum: int | None = None  # the signal (SIGTERM, SIGINT) that stopped the run early, if any
    last_metrics: dict[str, float] = field(default_factory=dict)
