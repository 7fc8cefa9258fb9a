"""GRPO core: group advantages, token log-probabilities, the PPO-clip policy loss, KL estimators.

Pure tensor functions: tensors and numbers in, tensors out; no config objects, no `.item()`, no
logging, so the same code runs on CPU and GPU without host syncs (except `torch.unique` on the group
ids) and each function is tested with hand-computed numbers (tests/test_grpo.py).

Sources. DUET (`shared/paper/duet-paper.txt`) trains both models with "the standard GRPO algorithm
(Shao et al., 2024)" in verl; the paper's text lost its equations, so the formulas follow
`shared/spec/algorithm.md` §3, which restores them from the reference implementation:

- group advantage (GRPO, DeepSeekMath §4.1.2): A_i = (R_i − mean_g R) / (std_g R + ε), the same value
  for every token of response i; `norm_std=False` gives Dr. GRPO's centring only;
- PPO-clip (Schulman et al. 2017, eq. 7) on the ratio ρ_t = π_θ / π_old with ε = 0.2 and the
  aggregations `token-mean` (reference default), `seq-mean-token-mean` (original GRPO) and
  `seq-mean-token-sum-norm` (Dr. GRPO);
- KL: k1 = log π − log π_ref in M's reward (β = 0.001, paper Appendix C and §E.7) and k3 =
  e^(log π_ref − log π) − (log π_ref − log π) − 1 as a loss (Schulman, "Approximating KL divergence").

Where duetlm departs from the reference (algorithm.md "Decision" items and choices made here):

- advantage estimators `batch` and `global` (algorithm.md §2.1) exist beside `grpo`, because under
  per-prompt GRPO a per-prompt marginal-utility baseline b cancels exactly;
- a group of size 1, or a group whose rewards all tie, gets advantage exactly 0 (the reference gives a
  singleton group its raw reward); statistics are computed in float64 so any finite float32 reward
  vector gives finite advantages;
- `seq-mean-token-sum-norm` divides by a constant `max_tokens` (the configured maximum response length)
  that the caller must pass, and averages over sequences (verl sums over sequences and divides by the
  padded width, which changes with padding and micro-batching);
- every aggregation accepts global normalisers, so losses of micro-batches sum to the full-batch loss
  exactly (gradient accumulation equals one large batch);
- `model_token_logprobs` derives position ids from the attention mask, so left-padded rows give the
  same log-probs as unpadded ones, and returns 0 where the context or the label token is padding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from duetlm import modes
from duetlm.modes import check_covers

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AGGREGATIONS",
    "PolicyLossOutput",
    "aggregate",
    "batch_advantages",
    "compute_advantages",
    "global_advantages",
    "group_advantages",
    "kl_k1",
    "kl_k3",
    "kl_loss",
    "model_token_logprobs",
    "policy_loss",
    "sequence_kl_k1",
    "token_logprobs",
]

# ---------------------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------------------


def _check_rewards(rewards: Tensor, group_ids: Tensor) -> None:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (N,), got shape {tuple(rewards.shape)}")
    if group_ids.shape != rewards.shape:
        raise ValueError(
            f"group_ids must have the shape of rewards {tuple(rewards.shape)}, got {tuple(group_ids.shape)}"
        )
    if group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool:
        raise ValueError(f"group_ids must be an integer tensor, got {group_ids.dtype}")


def _group_centre(r: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-group centring of float64 rewards r (N,).

    Returns (centred (N,), inverse (N,) group index in [0, G), count (G,)). A group whose rewards all tie
    (a singleton included) is centred to exactly 0, not to a rounding residue.
    """
    uniq, inverse = torch.unique(group_ids, return_inverse=True)  # (G,), (N,) in [0, G)
    zeros = r.new_zeros(uniq.numel())  # (G,)
    count = zeros.index_add(0, inverse, torch.ones_like(r))  # (G,)
    mean = zeros.index_add(0, inverse, r) / count.clamp(min=1)  # (G,)
    gmax = torch.full_like(zeros, -torch.inf).scatter_reduce(0, inverse, r, "amax")  # (G,)
    gmin = torch.full_like(zeros, torch.inf).scatter_reduce(0, inverse, r, "amin")  # (G,)
    tied = (gmax == gmin)[inverse]  # (N,)
    centred = torch.where(tied, torch.zeros_like(r), r - mean[inverse])  # (N,)
    return centred, inverse, count


def _unbiased_std(x: Tensor) -> Tensor:
    """Unbiased std of a 1-D float64 tensor; 0 when it has fewer than 2 entries."""
    if x.numel() < 2:
        return x.new_zeros(())
    return x.std(correction=1)


def group_advantages(rewards: Tensor, group_ids: Tensor, norm_std: bool = True, eps: float = 1e-6) -> Tensor:
    """GRPO group advantage Â_i = (R_i − mean_g R) / (std_g R + ε) (algorithm.md §3; Shao et al. 2024).

    rewards: (N,) the scalar reward R_i of each response (DUET: M's R_i of algorithm.md §2 item 4).
    group_ids: (N,) integer group of each response (M: the prompt; m: the signal or the prompt).
    norm_std: divide by the unbiased group std; False gives Dr. GRPO's centring only.
    Returns (N,) advantages in the dtype of `rewards`. Groups of size 1 and groups whose rewards all tie
    get exactly 0; statistics are computed in float64, so any finite float32 input gives finite output.
    """
    _check_rewards(rewards, group_ids)
    r = rewards.detach().to(torch.float64)  # (N,)
    centred, inverse, count = _group_centre(r, group_ids)
    if not norm_std:
        return centred.to(rewards.dtype)
    sq = r.new_zeros(count.shape).index_add(0, inverse, centred * centred)  # (G,)
    std = (sq / (count - 1).clamp(min=1)).sqrt()  # (G,) unbiased
    return (centred / (std[inverse] + eps)).to(rewards.dtype)


def batch_advantages(rewards: Tensor, group_ids: Tensor, norm_std: bool = True, eps: float = 1e-6) -> Tensor:
    """REINFORCE++-baseline advantage: Â_i = (R_i − mean_g R) / (std_batch(R − mean_g R) + ε).

    algorithm.md §2.1 `advantage: batch`: centre per group, then divide by the unbiased std of the
    group-centred rewards over the whole batch (not re-centred, so every group still sums to 0 and a
    tied group or a singleton gets 0). A per-prompt baseline b still cancels in the centring.
    Shapes and dtype as `group_advantages`.
    """
    _check_rewards(rewards, group_ids)
    r = rewards.detach().to(torch.float64)  # (N,)
    centred, _, _ = _group_centre(r, group_ids)
    if not norm_std:
        return centred.to(rewards.dtype)
    return (centred / (_unbiased_std(centred) + eps)).to(rewards.dtype)


def global_advantages(rewards: Tensor, group_ids: Tensor, norm_std: bool = True, eps: float = 1e-6) -> Tensor:
    """Batch-whitened advantage Â_i = (R_i − mean_batch R) / (std_batch R + ε) (algorithm.md §2.1).

    `advantage: global` centres and scales over the whole batch, ignoring `group_ids` (kept for a common
    signature), so the marginal-utility baseline b_i of M's reward is not cancelled. A batch whose rewards
    all tie, or of one response, gets 0. Shapes and dtype as `group_advantages`.
    """
    _check_rewards(rewards, group_ids)
    r = rewards.detach().to(torch.float64)  # (N,)
    tied = (r.amax() == r.amin()) if r.numel() else r.new_ones((), dtype=torch.bool)
    centred = torch.where(tied, torch.zeros_like(r), r - r.mean())  # (N,)
    if not norm_std:
        return centred.to(rewards.dtype)
    return (centred / (_unbiased_std(centred) + eps)).to(rewards.dtype)


AdvantageFn = Callable[..., Tensor]

ADVANTAGE_ESTIMATORS: dict[str, AdvantageFn] = {
    "grpo": group_advantages,
    "batch": batch_advantages,
    "global": global_advantages,
}
check_covers(ADVANTAGE_ESTIMATORS, modes.ADVANTAGE_ESTIMATORS, "grpo.ADVANTAGE_ESTIMATORS")


def compute_advantages(
    name: str, rewards: Tensor, group_ids: Tensor, norm_std: bool = True, eps: float = 1e-6
) -> Tensor:
    """Dispatch to the advantage estimator `name` of `ADVANTAGE_ESTIMATORS` (algorithm.md §2.1, §3)."""
    try:
        fn = ADVANTAGE_ESTIMATORS[name]
    except KeyError:
        raise ValueError(
            f"unknown advantage estimator {name!r}; valid: {', '.join(ADVANTAGE_ESTIMATORS)}"
        ) from None
    return fn(rewards, group_ids, norm_std=norm_std, eps=eps)


# ---------------------------------------------------------------------------------------------------
# Token log-probabilities
# ---------------------------------------------------------------------------------------------------


def _logprobs_chunk(logits: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """log softmax(logits / τ)[labels] of one chunk, as gather − logsumexp (no log_softmax copy kept)."""
    x = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits  # (B, t, V)
    if temperature != 1.0:
        x = x / temperature
    picked = x.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # (B, t)
    return picked - torch.logsumexp(x, dim=-1)  # (B, t)


def token_logprobs(
    logits: Tensor, labels: Tensor, chunk_size: int | None = None, temperature: float = 1.0
) -> Tensor:
    """Token log-probabilities log π(y_t | ·) = z_t[y_t]/τ − logsumexp(z_t/τ) (the log π of §3's ratio).

    logits: (B, T, V) any float dtype (float16/bfloat16 are computed in float32, chunk by chunk).
    labels: (B, T) token ids in [0, V); mask the result yourself where a label is padding.
    chunk_size: process the sequence in chunks of this many positions, so that temporaries (an upcast
        or temperature-scaled copy, logsumexp's exponentials) never span the whole (B, T, V) tensor.
    temperature: τ of the sampler (π_old must be the distribution the rollout was sampled from).
    Returns (B, T) in float32 (float64 if the logits are float64).

    Memory: no log_softmax output is kept for backward (logsumexp saves only its input and a (B, T)
    result). When a chunk needs a copy (upcast or τ ≠ 1) and gradients are on, the chunk is
    checkpointed, so the copy is recomputed in backward instead of being kept.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits (B, T, V) and labels (B, T); got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size}")
    seq_len = logits.shape[1]
    if seq_len == 0:
        return logits.new_zeros(labels.shape, dtype=torch.float32 if logits.dtype != torch.float64 else None)
    step = seq_len if chunk_size is None else chunk_size
    makes_copy = logits.dtype in (torch.float16, torch.bfloat16) or temperature != 1.0
    use_ckpt = makes_copy and torch.is_grad_enabled() and logits.requires_grad
    parts = []
    for start in range(0, seq_len, step):
        lg, lb = logits[:, start : start + step], labels[:, start : start + step]  # (B, t, V), (B, t)
        if use_ckpt:
            parts.append(checkpoint(_logprobs_chunk, lg, lb, temperature, use_reentrant=False))
        else:
            parts.append(_logprobs_chunk(lg, lb, temperature))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # (B, T)


def model_token_logprobs(
    model: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    chunk_size: int | None = None,
    temperature: float = 1.0,
) -> Tensor:
    """log π(x_{t+1} | x_{≤t}) for every position of a padded batch (the log π_θ / log π_old of §3).

    input_ids, attention_mask: (B, T), left or right padded. Position ids are derived from the mask
    (cumsum − 1), so a padded row gives the values of the same row unpadded.
    Returns (B, T − 1): entry t is log p(input_ids[:, t+1] | input_ids[:, :t+1]); it is exactly 0 where
    the label token or its context token is padding (the first real token of a left-padded row has no
    context, as in an unpadded row).
    """
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(
            "input_ids and attention_mask must both be (B, T); "
            f"got {tuple(input_ids.shape)} and {tuple(attention_mask.shape)}"
        )
    mask = attention_mask.long()  # (B, T)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False)
    logits = out.logits[:, :-1]  # (B, T-1, V) a view: position t predicts token t+1
    logp = token_logprobs(logits, input_ids[:, 1:], chunk_size=chunk_size, temperature=temperature)
    valid = mask[:, :-1].bool() & mask[:, 1:].bool()  # (B, T-1)
    return torch.where(valid, logp, torch.zeros_like(logp))  # (B, T-1)


# ---------------------------------------------------------------------------------------------------
# Loss aggregation
# ---------------------------------------------------------------------------------------------------

Normaliser = int | float | Tensor


def _masked(loss_mat: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    keep = mask.bool()  # (B, T)
    return torch.where(keep, loss_mat, torch.zeros_like(loss_mat)), keep.to(loss_mat.dtype)


def _token_mean(loss_mat: Tensor, mask: Tensor, num_seqs, num_tokens, max_tokens) -> Tensor:
    masked, m = _masked(loss_mat, mask)
    denom = m.sum().clamp(min=1) if num_tokens is None else num_tokens
    return masked.sum() / denom


def _seq_mean_token_mean(loss_mat: Tensor, mask: Tensor, num_seqs, num_tokens, max_tokens) -> Tensor:
    masked, m = _masked(loss_mat, mask)
    per_seq = masked.sum(-1) / m.sum(-1).clamp(min=1)  # (B,)
    return per_seq.sum() / (loss_mat.shape[0] if num_seqs is None else num_seqs)


def _seq_mean_token_sum_norm(loss_mat: Tensor, mask: Tensor, num_seqs, num_tokens, max_tokens) -> Tensor:
    if max_tokens is None:
        raise ValueError(
            "loss_agg 'seq-mean-token-sum-norm' needs max_tokens: pass the configured maximum response "
            "length (a constant, so the loss does not change with padding or micro-batching)"
        )
    masked, _ = _masked(loss_mat, mask)
    per_seq = masked.sum(-1) / max_tokens  # (B,)
    return per_seq.sum() / (loss_mat.shape[0] if num_seqs is None else num_seqs)


AGGREGATIONS: dict[str, Callable[..., Tensor]] = {
    "token-mean": _token_mean,
    "seq-mean-token-mean": _seq_mean_token_mean,
    "seq-mean-token-sum-norm": _seq_mean_token_sum_norm,
}
check_covers(AGGREGATIONS, modes.AGGREGATIONS, "grpo.AGGREGATIONS")


def aggregate(
    loss_mat: Tensor,
    mask: Tensor,
    mode: str,
    *,
    num_seqs: Normaliser | None = None,
    num_tokens: Normaliser | None = None,
    max_tokens: Normaliser | None = None,
) -> Tensor:
    """Reduce a per-token loss ℓ_{i,t} (B, T) under `mask` (B, T) to a scalar (algorithm.md §3 `loss_agg`).

    - `token-mean` (reference): Σ_{i,t} m ℓ / num_tokens, num_tokens defaults to Σ m;
    - `seq-mean-token-mean` (GRPO): Σ_i (Σ_t m ℓ / Σ_t m) / num_seqs, num_seqs defaults to B;
    - `seq-mean-token-sum-norm` (Dr. GRPO): Σ_i (Σ_t m ℓ / max_tokens) / num_seqs; max_tokens is
      required (the configured maximum response length).

    Pass the normalisers of the whole mini-batch when the loss is computed per micro-batch: the
    micro-batch losses then sum to the full-batch loss exactly. A sequence without tokens adds 0.
    """
    if loss_mat.shape != mask.shape:
        raise ValueError(
            f"loss_mat and mask must have the same shape, got {tuple(loss_mat.shape)} and {tuple(mask.shape)}"
        )
    try:
        fn = AGGREGATIONS[mode]
    except KeyError:
        raise ValueError(f"unknown loss_agg {mode!r}; valid: {', '.join(AGGREGATIONS)}") from None
    return fn(loss_mat, mask, num_seqs, num_tokens, max_tokens)


# ---------------------------------------------------------------------------------------------------
# PPO-clip policy loss
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicyLossOutput:
    """Result of `policy_loss`; every field a 0-dim tensor, diagnostics detached."""

    loss: Tensor  # () differentiable
    clip_fraction: Tensor  # () share of valid tokens where the clipped term is the active (larger) one
    approx_kl: Tensor  # () mean over valid tokens of k3 = (ρ − 1) − log ρ ≈ KL(π_old ‖ π_θ)
    ratio_mean: Tensor  # () mean of ρ over valid tokens
    ratio_min: Tensor  # () (1 when there are no valid tokens)
    ratio_max: Tensor  # ()


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    loss_agg: str = "token-mean",
    *,
    num_seqs: Normaliser | None = None,
    num_tokens: Normaliser | None = None,
    max_tokens: Normaliser | None = None,
) -> PolicyLossOutput:
    """PPO-clip loss ℓ_t = max(−Â ρ_t, −Â clip(ρ_t, 1 − ε, 1 + ε_high)), ρ_t = π_θ/π_old (algorithm.md §3).

    This is the negated clipped surrogate L^CLIP of Schulman et al. (2017), eq. 7, as used by GRPO.
    logprobs: (B, T) log π_θ (differentiable); old_logprobs: (B, T) log π_old of the rollout.
    advantages: (B,) one Â per sequence, or (B, T) per token. mask: (B, T) 1 on response tokens.
    clip_eps_high: upper clip ε_high (DAPO's clip-higher); None uses clip_eps.
    loss_agg and the normalisers: see `aggregate`.
    log ρ is clamped to [−20, 20]; masked positions are replaced before exp, so padding values (even
    inf or NaN) reach neither the loss nor the gradient.
    """
    if logprobs.shape != old_logprobs.shape or logprobs.shape != mask.shape or logprobs.dim() != 2:
        raise ValueError(
            "logprobs, old_logprobs and mask must all be (B, T); got "
            f"{tuple(logprobs.shape)}, {tuple(old_logprobs.shape)}, {tuple(mask.shape)}"
        )
    if advantages.shape not in (logprobs.shape[:1], logprobs.shape):
        raise ValueError(f"advantages must be (B,) or (B, T), got {tuple(advantages.shape)}")
    eps_low = clip_eps
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    if not (0.0 <= eps_low < 1.0) or eps_high < 0.0:
        raise ValueError(f"need 0 <= clip_eps < 1 and clip_eps_high >= 0, got {clip_eps}, {clip_eps_high}")

    keep = mask.bool()  # (B, T)
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages  # (B, 1) or (B, T)
    adv = adv.detach().to(logprobs.dtype)
    log_ratio = torch.where(keep, logprobs - old_logprobs.detach(), torch.zeros_like(logprobs))  # (B, T)
    ratio = log_ratio.clamp(-20.0, 20.0).exp()  # (B, T)
    unclipped = -adv * ratio  # (B, T)
    clipped = -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)  # (B, T)
    loss_mat = torch.maximum(unclipped, clipped)  # (B, T)
    loss = aggregate(
        loss_mat, keep, loss_agg, num_seqs=num_seqs, num_tokens=num_tokens, max_tokens=max_tokens
    )

    with torch.no_grad():
        m = keep.to(ratio.dtype)
        n = m.sum().clamp(min=1)
        k3 = (ratio - 1.0) - log_ratio.clamp(-20.0, 20.0)
        any_tok = keep.any()
        one = ratio.new_ones(())
        out = PolicyLossOutput(
            loss=loss,
            clip_fraction=((clipped > unclipped).to(m.dtype) * m).sum() / n,
            approx_kl=(k3 * m).sum() / n,
            ratio_mean=torch.where(any_tok, (ratio * m).sum() / n, one),
            ratio_min=torch.where(any_tok, torch.where(keep, ratio, torch.inf).amin(), one),
            ratio_max=torch.where(any_tok, torch.where(keep, ratio, -torch.inf).amax(), one),
        )
    return out


# ---------------------------------------------------------------------------------------------------
# KL estimators
# ---------------------------------------------------------------------------------------------------


def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k1 = log π − log π_ref per token (B, T), the KL term of M's reward (algorithm.md §2 item 4).

    Summed over a response (`sequence_kl_k1`) it is the Σ_tokens (log π_old − log π_ref) that
    `duetlm.objective.duet_reward` multiplies by β (paper Appendix C, §E.7: β = 0.001). Unbiased for
    KL(π ‖ π_ref) under samples from π; may be negative per token.
    """
    return logprobs - ref_logprobs


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k3 = e^d − d − 1 with d = log π_ref − log π, per token (B, T): the KL *loss* estimator.

    Schulman's low-variance, non-negative estimator of KL(π ‖ π_ref) (verl's `low_var_kl`). For
    stability d is clamped to [−20, 20] and the result to [0, 10] (as the reference).
    """
    d = (ref_logprobs - logprobs).clamp(-20.0, 20.0)
    return (d.exp() - d - 1.0).clamp(0.0, 10.0)


def kl_loss(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    loss_agg: str = "token-mean",
    *,
    num_seqs: Normaliser | None = None,
    num_tokens: Normaliser | None = None,
    max_tokens: Normaliser | None = None,
) -> Tensor:
    """The KL term of the loss: `kl_k3` per token, aggregated as the policy loss is (`aggregate`,
    the same normalisers), so `objective.kl_loss_coef` × this is added to it. Its value and gradient
    are 0 where π = π_ref (the first update of a run)."""
    k3 = kl_k3(logprobs, ref_logprobs)
    k3 = torch.where(mask.bool(), k3, torch.zeros_like(k3))
    return aggregate(k3, mask, loss_agg, num_seqs=num_seqs, num_tokens=num_tokens, max_tokens=max_tokens)


def sequence_kl_k1(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Σ_t m_t (log π − log π_ref) per sequence (B,): the `kl_sum` of `duet_reward` (§2 item 4)."""
    k1 = kl_k1(logprobs, ref_logprobs)  # (B, T)
    return torch.where(mask.bool(), k1, torch.zeros_like(k1)).sum(-1)  # (B,)
