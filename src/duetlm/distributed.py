"""Data-parallel DUET training on torch.distributed: ranks, sharding, collectives, DDP / FSDP wrapping.

`accelerate launch` or `torchrun` starts N copies of `duetlm train`; each is one rank. `init_distributed`
reads the launcher's environment (through accelerate's `PartialState`, which knows torchrun, accelerate,
MPI and SLURM variables) and joins the process group: gloo on CPU, NCCL on GPUs. One process (no
launcher, or a world of 1) gives a `Dist` whose collectives are no-ops, so the single-process trainer
runs exactly as it did before data parallelism existed.

How DUET is split (the trainer does the orchestration; this module holds the rules):
- Prompts. Each step's global batch of `rollout.batch_size` prompts is cut into `world_size`
  contiguous shards (`shard_bounds`); a rank samples all n rollouts of its prompts and all of m's
  answers to them, so every GRPO group (M's per prompt, m's per signal or per prompt) is on one rank.
- Statistics. Per-sample tensors (rewards, lengths, ...) of equal size on every rank are gathered in
  rank order (`Dist.gather_cat`), which is the global batch order; advantages, λ's batch mean length
  and every logged metric are computed from the gathered tensors, so they equal the single-process
  values exactly.
- Gradients. DDP (`wrap_ddp`) or FSDP2 (`wrap_fsdp`, parameters sharded per decoder layer) average
  gradients over ranks; the loss of each rank uses the *global* normalisers (tokens or sequences of
  the whole mini-batch, all ranks together) and is multiplied by `world_size`, so the averaged
  gradient equals the single-process gradient of the same global mini-batch (`local_minibatches`).
- Lockstep. DDP needs one synchronised backward per optimizer step on every rank and FSDP one
  forward per micro-batch on every rank, so every rank runs the same number of micro-batches
  (`micro_batch_plan`; a rank with fewer real ones runs zero-weight ones).
- Checkpoints: written by rank 0 only, with full (unsharded) weights and optimizer states keyed by
  parameter name (`optimizer_state`), so a run resumes at any world size and with either strategy.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from duetlm.config import ConfigError

STRATEGIES = ("auto", "ddp", "fsdp")


# --------------------------------------------------------------------------------------------------
# Pure rules: which rank holds what (no communication)


def shard_bounds(size: int, rank: int, world_size: int) -> tuple[int, int]:
    """[lo, hi) of the contiguous shard of `size` items that `rank` holds; `size` must divide evenly."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size}")
    if size % world_size:
        raise ConfigError(
            f"rollout.batch_size={size} is not divisible by the {world_size} processes: each process "
            "must get the same number of prompts; change rollout.batch_size or the number of processes"
        )
    per = size // world_size
    return rank * per, (rank + 1) * per


def generation_blocks(lo: int, hi: int, block: int | None) -> list[tuple[int, int]]:
    """The generation calls of a rank holding global prompts [lo, hi): [start, end) in global indices.

    `block=None`: one call for the whole shard. Otherwise calls of `block` prompts, aligned to
    multiples of `block` in the global batch, so the same prompts form the same call at any world
    size where `block` divides the shard (the caller checks)."""
    if block is None:
        return [(lo, hi)]
    return [(s, min(s + block, hi)) for s in range(lo, hi, block)]


def local_minibatches(order: list[int], mini_batches: int, lo: int, hi: int) -> list[list[int]]:
    """This rank's share of each global mini-batch, as local row indices.

    `order` is the permutation of the global rows (0..N-1) that the single-process update uses; it is
    split into `mini_batches` parts as `numpy.array_split` does, and each part keeps the rows in
    [lo, hi), shifted to local indices (a part may be empty on some rank)."""
    import numpy as np

    parts = [p.tolist() for p in np.array_split(np.array(order, dtype=np.int64), mini_batches) if len(p)]
    return [[g - lo for g in part if lo <= g < hi] for part in parts]


def micro_batch_plan(local_rows: int, max_rows: int, micro_batch_size: int) -> tuple[int, int]:
    """(micro-batches with real rows, zero-weight fillers) for a rank whose share of a mini-batch is
    `local_rows` while the largest share on any rank is `max_rows`: every rank runs the same count."""
    real = math.ceil(local_rows / micro_batch_size)
    total = max(math.ceil(max_rows / micro_batch_size), 1)
    return real, total - real


# --------------------------------------------------------------------------------------------------
# The process group


@dataclass
class Dist:
    """This process's place in the world, and the collectives the trainer needs.

    Collectives on CPU tensors and Python objects go through a gloo group (`cpu_group`), so they also
    work when the default backend is NCCL. With `world_size == 1` every collective returns its input.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    strategy: str = "none"  # none (one process) | ddp | fsdp
    cpu_group: Any = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, requested: str) -> str:
        """The device a model asked for (`ModelConfig.device`) on this rank: 'auto' and 'cuda' mean this
        rank's GPU (LOCAL_RANK) when CUDA is present; an explicit 'cuda:K' is ambiguous with several
        processes and refused."""
        if not self.enabled:
            return requested
        cuda = torch.cuda.is_available()
        if requested in ("auto", "cuda"):
            return f"cuda:{self.local_rank}" if cuda else "cpu"
        if requested.startswith("cuda:"):
            raise ConfigError(
                f"device {requested!r} with {self.world_size} processes: every process would use that GPU; "
                "set large.device / small.device to 'auto' (each process takes the GPU of its LOCAL_RANK)"
            )
        return requested

    def shard(self, size: int) -> tuple[int, int]:
        return shard_bounds(size, self.rank, self.world_size)

    # -- collectives -------------------------------------------------------------------------------

    def gather_cat(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """Each tensor concatenated over ranks in rank order along dim 0 (same shape on every rank)."""
        if not self.enabled or not tensors:
            return dict(tensors)
        import torch.distributed as dist

        out = {}
        for key in sorted(tensors):  # the same order on every rank
            local = tensors[key].detach().cpu().contiguous()
            parts = [torch.empty_like(local) for _ in range(self.world_size)]
            dist.all_gather(parts, local, group=self.cpu_group)
            out[key] = torch.cat(parts, dim=0)
        return out

    def all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        """Element-wise sum / max / min of a list of floats over ranks (float64)."""
        if not self.enabled:
            return list(values)
        import torch.distributed as dist

        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=ops[op], group=self.cpu_group)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True when `flag` is true on any rank (every rank gets the same answer)."""
        return bool(self.all_reduce([float(flag)], "max")[0]) if self.enabled else flag

    def gather_objects(self, obj: Any) -> list[Any]:
        """Picklable objects of every rank, in rank order."""
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.cpu_group)
        return out

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier(group=self.cpu_group)


def launched_world_size() -> int:
    """WORLD_SIZE as set by torchrun / accelerate launch (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def init_distributed(strategy: str = "auto", cpu: bool = False) -> Dist:
    """Join the launcher's process group (idempotent); a trivial `Dist` without a launcher.

    `strategy`: ddp | fsdp | auto (fsdp when `accelerate launch` ran with an FSDP config, i.e.
    ACCELERATE_USE_FSDP=true, else ddp). `cpu`: the models run on CPU (gloo backend)."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown distributed.strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
    if launched_world_size() <= 1:
        return Dist()
    import torch.distributed as dist
    from accelerate import PartialState

    state = PartialState(cpu=cpu)
    if strategy == "auto":
        strategy = "fsdp" if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" else "ddp"
    # A gloo group for CPU tensors and objects (metrics, flags): NCCL moves CUDA tensors only.
    cpu_group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    return Dist(
        rank=state.process_index,
        world_size=state.num_processes,
        local_rank=state.local_process_index,
        strategy=strategy,
        cpu_group=cpu_group,
    )


def shutdown() -> None:
    """Leave the process group (end of `duetlm train`), so every rank exits cleanly."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------
# Wrapping models


def wrap_ddp(model: torch.nn.Module, dist_ctx: Dist) -> torch.nn.Module:
    """DistributedDataParallel over `model` (torch's). Buffers are synced once at start-up only (the
    ranks run different numbers of no-grad forwards, e.g. in generation, so a per-forward buffer sync
    would deadlock; the buffers of a causal LM, rotary tables, never change)."""
    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of a Hugging Face model (its `_no_split_modules` classes)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ConfigError(
            f"FSDP: cannot find the decoder layers of {type(base).__name__} (no _no_split_modules); use DDP"
        )
    return layers


def wrap_fsdp(model: torch.nn.Module, reshard_after_forward: bool = True) -> torch.nn.Module:
    """Shard `model` in place with FSDP2 (`torch.distributed.fsdp.fully_shard`): one unit per decoder
    layer, then the root (embeddings, final norm, head). Returns the same object."""
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer, reshard_after_forward=reshard_after_forward)
    fully_shard(model, reshard_after_forward=reshard_after_forward)
    return model


def is_fsdp(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextmanager
def gradient_sync(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Gradient accumulation: skip the cross-rank reduction for this backward unless `enabled`
    (DDP's `no_sync`, FSDP2's `set_requires_gradient_sync`)."""
    from torch.nn.parallel import DistributedDataParallel

    if enabled:
        yield
    elif isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    elif is_fsdp(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def copy_full_weights(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    """Copy the full (unsharded) parameters of an FSDP-sharded `src` into the plain module `dst`
    (every rank calls it: each DTensor is all-gathered)."""
    targets = dict(dst.named_parameters())
    with torch.no_grad():
        for name, param in src.named_parameters():
            full = param.full_tensor() if hasattr(param, "full_tensor") else param
            targets[name].copy_(full.to(targets[name].device, targets[name].dtype))


def full_grad_norm(norm: Tensor) -> float:
    """`clip_grad_norm_`'s result as a float (a DTensor under FSDP)."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


# --------------------------------------------------------------------------------------------------
# Optimizer states that travel between world sizes and strategies


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The full optimizer state keyed by parameter name (collective under FSDP; complete on rank 0)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )


def load_optimizer_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Load `optimizer_state`'s output into an optimizer over `model` (plain, DDP's module or FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(
        model, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True)
    )
