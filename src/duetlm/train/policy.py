"""Policies: one trained (or frozen) model with its tokenizer, rollout engine, optimizer and update
settings, built from its `ModelConfig` (model, LoRA, gradient checkpointing, DDP / FSDP, HF or vLLM
engine).

Rollouts run on the training model itself through `HFEngine` (which switches to eval mode and
no_grad), or, for a model with `engine: vllm`, through a `VLLMEngine` serving a copy of its weights:
after each update the weights are pushed to the engine (`Policy.push_weights`, LoRA merged first), and
a resumed run starts the engine from the checkpoint. vLLM rollouts run in one process only.
"""

from __future__ import annotations

import copy
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from duetlm import distributed
from duetlm.config import ConfigError, LoraSettings, ModelConfig, TrainConfig
from duetlm.distributed import Dist
from duetlm.train.update import UpdateSpec


@dataclass
class Policy:
    """One trained (or frozen) model with its tokenizer, rollout engine and optimizer."""

    role: str  # "large" (M) or "small" (m)
    cfg: ModelConfig
    model: torch.nn.Module
    tokenizer: Any
    engine: Any  # HFEngine over `full_model` (rollouts use the weights being trained), or VLLMEngine
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


def check_engines(model_configs: list[tuple[str, ModelConfig]]) -> None:
    """Refuse, before any model loads, rollout engines this run cannot use (TrainConfig has already
    refused `engine: remote`): vLLM needs the vllm package and one process."""
    vllm_roles = [role for role, m in model_configs if m.engine == "vllm"]
    if not vllm_roles:
        return
    names = ", ".join(f"{r}.engine" for r in vllm_roles)
    if distributed.launched_world_size() > 1:
        raise ConfigError(
            f"{names}=vllm: vLLM rollouts are supported in one process only (this launch has "
            f"WORLD_SIZE={distributed.launched_world_size()}); use engine: hf for data parallelism"
        )
    if importlib.util.find_spec("vllm") is None:
        from duetlm.engines.vllm import INSTALL_HINT, VLLMUnavailableError

        raise VLLMUnavailableError(
            f"{names}=vllm needs the vllm package, which is not installed: {INSTALL_HINT}"
        )


def recomputes_old_logprobs(cfg: TrainConfig, role: str) -> bool:
    """Whether π_old of `role` comes from the training model rather than from the engine's log-probs:
    asked for (`grpo.recompute_old_logprobs`), or forced when another engine (vLLM) rolled out, so the
    PPO ratio compares the training model with itself."""
    mcfg = cfg.large if role == "large" else cfg.small
    return cfg.grpo.recompute_old_logprobs or (mcfg is not None and mcfg.engine != "hf")


def update_spec(
    cfg: TrainConfig, max_tokens: int, share_prompts: bool = True, device: str = "cpu"
) -> UpdateSpec:
    """One model's update settings from the config; `max_tokens` is its maximum response length,
    `device` where it trains (for `optim.autocast: auto`)."""
    from duetlm.models import resolve_autocast

    g, o = cfg.grpo, cfg.optim
    return UpdateSpec(
        micro_batch_size=o.micro_batch_size,
        mini_batches=o.mini_batches,
        loss_agg=g.loss_agg,
        clip_eps=g.clip_eps,
        clip_eps_high=g.clip_eps_high,
        max_tokens=max_tokens,
        grad_clip=o.grad_clip,
        autocast=resolve_autocast(o.autocast, device),
        chunk_size=o.logprob_chunk_size,
        share_prompts=share_prompts,
        kl_loss_coef=cfg.objective.kl_loss_coef,  # acts where the samples carry log π_ref (M's)
    )


def enable_checkpointing(model: Any) -> None:
    """Gradient (activation) checkpointing: transformers 5.24 renamed the method; older ones differ."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def wrap_lora(model: Any, lora: LoraSettings, gradient_checkpointing: bool, adapter: Path | None) -> Any:
    """`model` with a LoRA adapter (peft); its weights from `adapter` when resuming."""
    from peft import LoraConfig, get_peft_model, load_peft_weights, set_peft_model_state_dict

    model = get_peft_model(
        model,
        LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
            task_type="CAUSAL_LM",
        ),
    )
    if gradient_checkpointing:
        model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    if adapter is not None:
        set_peft_model_state_dict(model, load_peft_weights(str(adapter)))
    return model


def _parallel(
    model: Any, spec: str, mcfg: ModelConfig, cfg: TrainConfig, dist: Dist, lora: bool, role: str
) -> tuple[torch.nn.Module | None, torch.nn.Module | None]:
    """(DDP wrapper, FSDP rollout copy) of a trainable model under data parallelism."""
    from duetlm.models import load_model

    if not dist.enabled:
        return None, None
    if dist.strategy != "fsdp":
        return distributed.wrap_ddp(model, dist), None
    if lora:
        raise ConfigError(f"{role}.lora with distributed.strategy=fsdp is not supported; use ddp")
    # Generation decodes a different number of steps on each rank, which sharded weights (one
    # all-gather per layer per forward) cannot do: it runs on a full copy instead.
    rollout_model, _ = load_model(spec, dtype=mcfg.dtype, device=dist.device(mcfg.device))
    distributed.wrap_fsdp(model, cfg.distributed.fsdp_reshard_after_forward)
    return None, rollout_model


def _engine(
    role: str, cfg: TrainConfig, generator: torch.nn.Module, tokenizer: Any, checkpoint: Path | None
) -> Any:
    """The rollout engine: HF over the training weights, or vLLM over a copy of them."""
    mcfg = cfg.large if role == "large" else cfg.small
    assert mcfg is not None
    if mcfg.engine == "vllm":
        from duetlm.engines import build_engine

        # vLLM serves the checkpoint's weights when resuming (`<checkpoint>/<role>` holds merged
        # weights for LoRA too), and each update's, pushed by `Policy.push_weights`.
        served = str(checkpoint / role) if checkpoint is not None else mcfg.path
        return build_engine(mcfg.model_copy(update={"path": served}), seed=cfg.seed, **cfg.rollout.vllm)
    from duetlm.engines.hf import HFEngine

    return HFEngine(generator, tokenizer, max_batch_size=cfg.rollout.engine_batch_size)


def build_policy(role: str, cfg: TrainConfig, trainable: bool, checkpoint: Path | None, dist: Dist) -> Policy:
    """`role`'s model (from `checkpoint` when resuming), with LoRA, data parallelism, its engine and,
    when `trainable`, an AdamW optimizer."""
    from duetlm.models import load_model

    mcfg = cfg.large if role == "large" else cfg.small
    assert mcfg is not None  # TrainConfig guarantees m where the mode uses it
    lora = trainable and mcfg.lora
    spec = str(checkpoint / role) if checkpoint is not None and not lora else mcfg.path
    device = dist.device(mcfg.device)
    model, tokenizer = load_model(spec, dtype=mcfg.dtype, device=device, trainable=trainable)
    if trainable and mcfg.gradient_checkpointing:
        enable_checkpointing(model)
    if lora:
        adapter = checkpoint / f"{role}_adapter" if checkpoint else None
        model = wrap_lora(model, cfg.lora, mcfg.gradient_checkpointing, adapter)
    wrapper, rollout_model = (
        _parallel(model, spec, mcfg, cfg, dist, lora, role) if trainable else (None, None)
    )
    optimizer = None
    if trainable:
        o = cfg.optim
        optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad],
            lr=o.lr_large if role == "large" else o.lr_small,
            betas=o.betas,
            weight_decay=o.weight_decay,
        )
    sampling = cfg.rollout.large if role == "large" else cfg.rollout.small
    # Shared prompt passes (update.micro_logprobs): not under gradient checkpointing (it drops the
    # cache) nor FSDP (each forward is a collective, and ranks would run different numbers of them).
    share = not mcfg.gradient_checkpointing and rollout_model is None
    generator = rollout_model if rollout_model is not None else model
    return Policy(
        role,
        mcfg,
        model,
        tokenizer,
        _engine(role, cfg, generator, tokenizer, checkpoint),
        optimizer,
        update_spec(cfg, sampling.max_new_tokens, share_prompts=share, device=device),
        wrapper=wrapper,
        rollout_model=rollout_model,
    )


def load_reference(cfg: TrainConfig, dist: Dist) -> torch.nn.Module:
    """π_ref for M's β·KL term: M's starting weights (the config's path, also when resuming)."""
    from duetlm.models import load_model

    reference, _ = load_model(cfg.large.path, dtype=cfg.large.dtype, device=dist.device(cfg.large.device))
    return reference
