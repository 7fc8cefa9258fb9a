"""The update: sequences → padded tensors → log-probs → one PPO-clip epoch (`policy_update`).

Forward passes of the update (and of π_old / π_ref) see [left-padded prompt | right-padded response]
rows and compute logits for the response positions only; the rows of one prompt (M's n rollouts of x,
m's n_m answers to (x, z_i)) share one pass over the prompt, whose key/value cache is repeated for them
(`micro_logprobs`); micro-batches keep a prompt's rows together, longest first. The loss itself is
`grpo.policy_loss` (pure); this module owns batching, accumulation and the optimizer step.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from duetlm import distributed, grpo
from duetlm.distributed import Dist
from duetlm.engines.hf import cache_kwarg
from duetlm.train.records import Samples, UpdateStats


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
    kl_loss_coef: float = 0.0  # × grpo.kl_loss in the loss, where the samples carry ref_logprobs


@dataclass(frozen=True)
class RowShard:
    """Where a rank's rows sit in the global batch of an update (data parallelism).

    `offset`: global index of this rank's first row; `lengths`: response tokens of every global row
    (all ranks), for the global loss normalisers; every rank holds `len(lengths) // world_size` rows."""

    dist: Dist
    offset: int
    lengths: list[int]


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _autocast(device: torch.device, enabled: bool) -> Any:
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if enabled else nullcontext()


def left_padded(rows: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """(b, P) ids and mask, each row right-aligned (left padding), P = the longest row."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for k, row in enumerate(rows):
        ids[k, width - len(row) :] = torch.tensor(row)
        mask[k, width - len(row) :] = 1
    return ids, mask


def pad_ragged(rows: list[Tensor]) -> tuple[Tensor, Tensor]:
    """N ragged 1-D tensors → (N, L) zero-padded values and (N, L) mask."""
    values = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
    lengths = torch.tensor([len(r) for r in rows])
    mask = torch.arange(values.shape[1])[None, :] < lengths[:, None]
    return values, mask


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


def _shared_prompt_logits(
    forward: torch.nn.Module,
    model: torch.nn.Module,
    prompts: list[tuple[int, ...]],
    which: list[int],
    resp: Tensor,
    mask: Tensor,
    pad_id: int,
) -> Tensor:
    """(b, R, V) logits of the responses, each distinct prompt run once through `model` and its
    key/value cache repeated for its rows (`which[row]` = the row's prompt)."""
    device = model_device(forward)
    width = resp.shape[1]
    p_ids, p_mask = left_padded([list(t) for t in prompts], pad_id)
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
        **{cache_kwarg(model): cache},
    )
    # Token 0 of a response is scored by the prompt's last position, token t by response t−1.
    return torch.cat([out.logits[rows], out2.logits[:, :-1]], dim=1)  # (b, R, V)


def _full_sequence_logits(
    forward: torch.nn.Module, prompt_rows: list[list[int]], resp: Tensor, mask: Tensor, pad_id: int
) -> Tensor:
    """(b, R, V) logits of the responses from one pass over [prompt | response] rows."""
    device = model_device(forward)
    width = resp.shape[1]
    p_ids, p_mask = left_padded(prompt_rows, pad_id)
    ids = torch.cat([p_ids, resp], dim=1).to(device)  # (b, P+R)
    full_mask = torch.cat([p_mask, mask.long()], dim=1).to(device)
    pos = (full_mask.cumsum(-1) - 1).clamp(min=0)
    out = forward(
        input_ids=ids, attention_mask=full_mask, position_ids=pos, use_cache=False, logits_to_keep=width + 1
    )
    return out.logits[:, :-1]  # (b, R, V): position P−1+t scores response token t


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
    device = model_device(forward)
    resp, mask, old = response_grid(samples, idx, pad_id)
    prompts: dict[tuple[int, ...], int] = {}
    which = [prompts.setdefault(tuple(samples.prompt_ids[i]), len(prompts)) for i in idx]
    with _autocast(device, spec.autocast):
        if spec.share_prompts and len(prompts) < len(idx):
            model = prompt_model if prompt_model is not None else forward
            logits = _shared_prompt_logits(forward, model, list(prompts), which, resp, mask, pad_id)
        else:
            logits = _full_sequence_logits(forward, [samples.prompt_ids[i] for i in idx], resp, mask, pad_id)
    mask = mask.to(device)
    logp = grpo.token_logprobs(logits, resp.to(device), chunk_size=spec.chunk_size)  # (b, R)
    logp = torch.where(mask, logp.float(), torch.zeros_like(logp, dtype=torch.float32))
    return logp, mask, None if old is None else old.to(device)


def micro_batches(samples: Samples, idx: list[int], size: int) -> Iterator[list[int]]:
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
        for micro in micro_batches(samples, list(range(len(samples))), spec.micro_batch_size):
            logp, mask, _ = micro_logprobs(model, samples, micro, pad_id, spec)
            logp, mask = logp.cpu(), mask.cpu()
            for r, i in enumerate(micro):
                out[i] = logp[r][mask[r]]
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]


@dataclass
class _MiniBatch:
    """One mini-batch of an update: its global rows, this rank's rows, and what its micro-batches
    summed (each micro-batch's loss is already normalised by the whole mini-batch)."""

    rows: list[int]  # global row indices
    local: list[int]  # this rank's rows, as local indices
    num_tokens: int
    loss: float = 0.0
    clip_fraction: float = 0.0
    approx_kl: float = 0.0
    kl_loss: float = 0.0
    ratio_max: float = 0.0
    finite: bool = True


def _accumulate(
    forward: torch.nn.Module,
    model: torch.nn.Module,
    samples: Samples,
    advantages: Tensor,
    pad_id: int,
    spec: UpdateSpec,
    mini: _MiniBatch,
    fillers: int,
    world: int,
) -> None:
    """Forward and backward of one mini-batch's micro-batches (gradients accumulate); sums into `mini`.
    `fillers` zero-weight micro-batches keep this rank in step with ranks that hold more rows."""
    micros: list[list[int] | None] = [*micro_batches(samples, mini.local, spec.micro_batch_size)]
    micros += [None] * fillers
    for k, micro in enumerate(micros):
        rows = micro if micro is not None else [0]  # a filler runs one row with zero weight
        with distributed.gradient_sync(forward, k == len(micros) - 1):
            logp, resp, old = micro_logprobs(forward, samples, rows, pad_id, spec, prompt_model=model)
            if micro is None:  # a filler: this rank has no more rows in this mini-batch
                (logp.sum() * 0.0).backward()
                continue
            out = grpo.policy_loss(
                logp,
                logp.detach() if samples.old_logprobs is None else old,
                advantages[rows].to(model_device(model)),
                resp,
                clip_eps=spec.clip_eps,
                clip_eps_high=spec.clip_eps_high,
                loss_agg=spec.loss_agg,
                num_seqs=len(mini.rows),
                num_tokens=max(mini.num_tokens, 1),
                max_tokens=spec.max_tokens,
            )
            kl_term = None
            if spec.kl_loss_coef > 0 and samples.ref_logprobs is not None:
                ref, _ = pad_ragged([samples.ref_logprobs[i] for i in rows])
                kl_term = grpo.kl_loss(
                    logp,
                    ref.to(logp.device, logp.dtype)[:, : logp.shape[1]],
                    resp,
                    spec.loss_agg,
                    num_seqs=len(mini.rows),
                    num_tokens=max(mini.num_tokens, 1),
                    max_tokens=spec.max_tokens,
                )
                out = replace(out, loss=out.loss + spec.kl_loss_coef * kl_term)
            if not torch.isfinite(out.loss):
                mini.finite = False
                if world == 1:
                    break
                # Keep the ranks in step (DDP and FSDP reduce every rank's backward); the step is
                # skipped on every rank.
                (logp.sum() * 0.0).backward()
                continue
            (out.loss * world).backward()
        # One device sync per micro-batch for its statistics.
        k3 = kl_term.detach().float() if kl_term is not None else torch.zeros((), device=out.loss.device)
        tokens, loss, clip, kl, ratio, k3 = torch.stack(
            [resp.sum().float(), out.loss.detach(), out.clip_fraction, out.approx_kl, out.ratio_max, k3]
        ).tolist()
        share = tokens / max(mini.num_tokens, 1)  # this micro-batch's share of the tokens
        mini.loss += loss
        mini.clip_fraction += clip * share
        mini.approx_kl += kl * share
        mini.kl_loss += k3  # already normalised by the whole mini-batch, as the loss
        mini.ratio_max = max(mini.ratio_max, ratio)


def _plan(samples: Samples, spec: UpdateSpec, seed: int, shard: RowShard | None) -> list[_MiniBatch]:
    """The update's mini-batches, drawn from the global rows exactly as one process would draw them."""
    offset = shard.offset if shard is not None else 0
    lengths = shard.lengths if shard is not None else [len(t) for t in samples.token_ids]
    order = list(range(len(lengths)))
    if spec.mini_batches > 1:
        random.Random(seed).shuffle(order)
    global_minis = [m.tolist() for m in np.array_split(np.array(order), spec.mini_batches) if len(m)]
    local_minis = distributed.local_minibatches(order, spec.mini_batches, offset, offset + len(samples))
    return [
        _MiniBatch(rows, local, sum(lengths[g] for g in rows))
        for rows, local in zip(global_minis, local_minis, strict=True)
    ]


def _fillers(mini: _MiniBatch, total_rows: int, world: int, spec: UpdateSpec) -> int:
    """Zero-weight micro-batches this rank adds so that every rank runs as many as the fullest one."""
    per_rank = total_rows // world
    max_rows = max(sum(r * per_rank <= g < (r + 1) * per_rank for g in mini.rows) for r in range(world))
    return distributed.micro_batch_plan(len(mini.local), max_rows, spec.micro_batch_size)[1]


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
    forward = train_model if train_model is not None else model
    world = shard.dist.world_size if shard is not None else 1
    total_rows = len(shard.lengths) if shard is not None else len(samples)
    params = [p for p in model.parameters() if p.requires_grad]
    stats = UpdateStats(ratio_max=0.0)
    model.train()
    for mini in _plan(samples, spec, seed, shard):
        optimizer.zero_grad(set_to_none=True)
        fillers = _fillers(mini, total_rows, world, spec)
        _accumulate(forward, model, samples, advantages, pad_id, spec, mini, fillers, world)
        stats.ratio_max = max(stats.ratio_max, mini.ratio_max)
        finite = mini.finite if shard is None else not shard.dist.any(not mini.finite)
        grad_norm = math.nan
        if finite:
            grad_norm = distributed.full_grad_norm(torch.nn.utils.clip_grad_norm_(params, spec.grad_clip))
        if not (finite and math.isfinite(grad_norm)):
            optimizer.zero_grad(set_to_none=True)
            stats.skipped += 1
            continue
        optimizer.step()
        sums = [mini.loss, mini.clip_fraction, mini.approx_kl, mini.kl_loss]
        if shard is not None:  # each rank's sums are its share of the global mini-batch's
            sums = shard.dist.all_reduce(sums, "sum")
        stats.mini_batches += 1
        stats.loss += sums[0]
        stats.grad_norm += grad_norm
        stats.clip_fraction += sums[1]
        stats.approx_kl += sums[2]
        stats.kl_loss += sums[3]
    optimizer.zero_grad(set_to_none=True)
    return _finish_stats(stats, shard)


def _finish_stats(stats: UpdateStats, shard: RowShard | None) -> UpdateStats:
    """Sums over mini-batches → means; the largest ratio over all ranks."""
    if shard is not None:
        stats.ratio_max = shard.dist.all_reduce([stats.ratio_max], "max")[0]
    done = max(stats.mini_batches, 1)
    stats.loss, stats.grad_norm = stats.loss / done, stats.grad_norm / done
    stats.clip_fraction, stats.approx_kl = stats.clip_fraction / done, stats.approx_kl / done
    stats.kl_loss /= done
    stats.ratio_max = stats.ratio_max or 1.0
    return stats
