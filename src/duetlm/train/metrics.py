"""A step's metrics and sample tables, from per-sample numbers gathered over every process.

Metric names (the glossary in objective.py maps them to the paper): `reward/large` (mean R_i), `success/guided` (mean s_i),
`success/unguided` (mean b estimate), `success/marginal` (their difference), `lambda` (λ_t used by the
rewards) and `lambda/next` (λ_{t+1}), `length/penalised_mean` (mean L_i), `tokens/*`, `signal/*`,
`<role>/loss|grad_norm|clip_frac|approx_kl|ratio_max|skipped` for each model updated.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from duetlm import protocol
from duetlm.problems import Problem
from duetlm.train.records import Advantages, Rewards, Rollout, SmallRollout, UpdateStats


def per_sample(roll: Rollout, small: SmallRollout, rewards: Rewards, adv: Advantages) -> dict[str, Tensor]:
    """The per-sample numbers the metrics and λ need; the same shapes on every rank, so the global
    batch is their concatenation over ranks."""

    def flags(values: list[bool]) -> Tensor:
        return torch.tensor(values, dtype=torch.float64)

    t = {
        "reward": rewards.large,
        "advantage": adv.large,
        "penalised": rewards.lengths,
        "tokens": roll.large.lengths,
        "truncated": roll.large.truncated,
        "signal": roll.signal_lengths,
        "empty": flags([not s.text for s in roll.signals]),
        "incomplete": flags([not s.complete for s in roll.signals]),
        "success": rewards.success,
    }
    if small.guided is not None:
        t["small_tokens"] = small.guided.lengths
        if rewards.small is not None:
            t["small_reward"] = rewards.small
        if adv.small is not None:
            t["small_advantage"] = adv.small
    if rewards.unguided_success is not None and small.unguided is not None:
        t["unguided"] = rewards.unguided_success
        t["unguided_tokens"] = small.unguided.lengths
    if rewards.kl is not None:
        t["kl"] = rewards.kl
    return t


def _small_metrics(t: dict[str, Tensor], m: dict[str, float]) -> float:
    """m's metrics (into `m`); returns the tokens m generated."""
    m["success/guided"] = float(t["success"].mean())
    m["reward/small"] = float(t["small_reward"].mean()) if "small_reward" in t else 0.0
    m["tokens/small_mean"] = float(t["small_tokens"].mean())
    generated = float(t["small_tokens"].sum())
    if "small_advantage" in t:
        m["advantage/small_abs"] = float(t["small_advantage"].abs().mean())
    if "unguided" in t:
        m["success/unguided"] = float(t["unguided"].mean())
        m["success/marginal"] = m["success/guided"] - m["success/unguided"]
        generated += float(t["unguided_tokens"].sum())
    return generated


def step_metrics(
    t: dict[str, Tensor],
    stats: dict[str, UpdateStats],
    lam_used: float,
    lam_next: float,
    limit: int | None,
) -> dict[str, float]:
    """The step's metrics from the global batch's per-sample numbers (`per_sample`)."""
    m: dict[str, float] = {
        "reward/large": float(t["reward"].mean()),
        "reward/large_std": float(t["reward"].std()) if len(t["reward"]) > 1 else 0.0,
        "advantage/large_abs": float(t["advantage"].abs().mean()),
        "lambda": lam_used,
        "lambda/next": lam_next,
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
        generated += _small_metrics(t, m)
    else:
        m["success/large"] = float(t["success"].mean())
    if "kl" in t:
        m["kl/reference"] = float(t["kl"].mean())
    if limit is not None:
        m["thinkprune/limit"] = float(limit)
    m["tokens/generated"] = generated
    for role, s in stats.items():
        m.update(s.to_metrics(role))
    return m


def time_metrics(seconds: dict[str, float], generated_tokens: float) -> dict[str, float]:
    """`time/<phase>_s` and the generation throughput (rollout + guided + unguided phases)."""
    out = {f"time/{k}_s": v for k, v in seconds.items()}
    gen_s = sum(seconds.get(k, 0.0) for k in ("rollout", "guided", "unguided"))
    out["throughput/gen_tokens_per_s"] = generated_tokens / max(gen_s, 1e-9)
    return out


def sample_rows(
    problems: list[Problem],
    roll: Rollout,
    small: SmallRollout,
    rewards: Rewards,
    n_small: int,
    num_samples: int,
) -> list[dict[str, Any]]:
    """The first `num_samples` rollouts of the step as table rows (question, z, answer, reward)."""
    rows = []
    for i in range(min(num_samples, len(roll.large))):
        problem = problems[int(roll.large.owner[i])]
        if small.guided is not None:
            answer = small.guided.texts[i * n_small]
        else:
            answer = protocol.own_answer(roll.large.texts[i])
        rows.append(
            {
                "question": problem.question,
                "gold": problem.answer,
                "signal": roll.signals[i].text,
                "answer": answer,
                "reward": round(float(rewards.large[i]), 4),
                "success": round(float(rewards.success[i]), 4),
                "large_tokens": len(roll.large.token_ids[i]),
            }
        )
    return rows
