"""The preflight: what a training config needs in memory on each device, before any weight is loaded
(`duetlm train --preflight`, and the first thing `duetlm train` does on an accelerator).

Each model's shape comes from its config.json alone (a local directory, or the hub's config): its
parameters are counted by building it on PyTorch's `meta` device, which allocates nothing. Per device
the preflight adds up, for each model placed there:

- weights (the model's dtype), and, for a trained model, its gradients and AdamW's two moments (torch
  keeps them in the parameter's dtype); a LoRA model trains its adapter only (the frozen base weights
  stay); under FSDP the three are sharded over the processes;
- M's frozen reference when `objective.kl_coef > 0` and M has no LoRA (with LoRA, the base with the
  adapter switched off is the reference);
- under FSDP, the whole-weights generation copy each process decodes with;
- the KV cache of `rollout.engine_batch_size` sequences at their longest (prompt + generation: M's
  prompt is bounded by `max_prompt_tokens`, m's by that plus M's signal), in the model's dtype;
- the update's activations for one micro-batch at the longest sequence: with gradient checkpointing
  each layer keeps its input and one layer at a time is recomputed, without it every layer keeps what
  its backward needs. These bytes are *measured* (`activation_profile`): forwards of 1- and 2-layer
  models of the real width at two short lengths, on CPU with the trainer's autocast, counting what
  autograd saves, give the per-layer and outside-layer bytes per token and per token² (the attention
  mask); so they follow the architecture's own code on this transformers (CPU's attention, sdpa: a
  GPU's flash attention keeps no T² mask, so this errs high there). Plus the logits of the response
  positions, their gradient, and one fp32 log-prob chunk;
- vLLM's reservation (`gpu_memory_utilization` of the device) where a model rolls out on vLLM.

Generation and the update are different phases, so the peak is the resident memory plus the larger
of the two. Estimates are checked against memory measured on tiny models (tests/test_preflight.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from duetlm.errors import DuetError

GB = 1e9
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelShape:
    """What memory depends on: parameters, layers, widths, vocabulary (from config.json)."""

    params: int
    layers: int
    hidden: int
    kv_heads: int
    head_dim: int
    vocab: int
    config: Any = field(repr=False, compare=False, default=None)

    @classmethod
    def of(cls, path: str) -> ModelShape:
        """The shape of the model at `path` (a directory or hub id; only config.json is read)."""
        from duetlm.models import resolve_model_path

        try:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(resolve_model_path(path))
        except (OSError, ValueError) as err:
            raise DuetError(f"preflight: cannot read the config of {path!r}: {err}") from None
        return cls.from_config(config)

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        params = sum(p.numel() for p in model.parameters())
        text = config.get_text_config(decoder=True)
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        kv = getattr(text, "num_key_value_heads", None) or heads
        return cls(params, text.num_hidden_layers, text.hidden_size, kv, head_dim, text.vocab_size, text)

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Keys and values of one token in every layer."""
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


@dataclass(frozen=True)
class Activations:
    """Bytes autograd keeps in a forward pass of T tokens: `layer(T)` per decoder layer plus
    `base(T)` outside the layers (embedding output, final norm, rotary tables, the attention mask,
    whose size grows with T²), each `const + lin·T + quad·T²`; the constant is autocast's bf16 copies
    of the weights, kept for the backward. Measured by `activation_profile`."""

    layer_const: float
    layer_lin: float
    layer_quad: float
    base_const: float
    base_lin: float
    base_quad: float

    def layer(self, tokens: int) -> float:
        return self.layer_const + self.layer_lin * tokens + self.layer_quad * tokens**2

    def base(self, tokens: int) -> float:
        return self.base_const + self.base_lin * tokens + self.base_quad * tokens**2


def _layers_model(shape: ModelShape, layers: int, dtype: str, checkpointing: bool, device: str) -> Any:
    """A `layers`-layer model of `shape`'s architecture and width, vocabulary shrunk to 256, its
    weights left uninitialised (their values do not change what autograd saves)."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(shape.config)
    cfg.num_hidden_layers = layers
    cfg.vocab_size = 256
    for key in ("layer_types", "max_window_layers"):
        if isinstance(getattr(cfg, key, None), list):
            setattr(cfg, key, getattr(cfg, key)[:layers])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    model = model.to_empty(device=device)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def _saved_bytes(model: Any, tokens: int, autocast: bool) -> int:
    """Bytes of the distinct storages autograd saves in one forward of `model` over `tokens` tokens
    (the trainer's call: an attention mask, position ids; logits for the last position only),
    parameters excluded."""
    import torch

    device = next(model.parameters()).device
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    ids = torch.randint(0, 256, (1, tokens), device=device)
    mask = torch.ones(1, tokens, dtype=torch.long, device=device)
    pos = torch.arange(tokens, device=device)[None]
    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    with hooks, torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1)
    del out
    return sum(n for ptr, n in seen.items() if ptr not in params)


def activation_profile(
    shape: ModelShape,
    autocast: bool = False,
    dtype: str = "float32",
    checkpointing: bool = False,
    tokens: int = 16,
    device: str = "cpu",
) -> Activations:
    """`Activations` of `shape`'s architecture, measured at its real width on `device`: forwards of 1
    and 2 layers at `tokens` and 2 x `tokens` tokens separate the per-layer and outside-layer bytes and
    their linear and quadratic parts (so the architecture's own code and the device's attention kernel
    decide, on this transformers)."""
    lengths = (tokens, 2 * tokens, 3 * tokens)
    b = {}
    for n in (1, 2):
        model = _layers_model(shape, n, dtype, checkpointing, device)
        for t in lengths:
            b[n, t] = _saved_bytes(model, t, autocast)
        del model

    def fit(f: list[float]) -> list[float]:
        # const + lin t + quad t² through the three lengths (exact: three points, three unknowns)
        import numpy as np

        coef = np.linalg.solve(np.array([[1.0, t, t * t] for t in lengths]), np.array(f, dtype=float))
        return [max(float(c), 0.0) for c in coef]

    layer = fit([b[2, t] - b[1, t] for t in lengths])
    base = fit([b[1, t] - (layer[0] + layer[1] * t + layer[2] * t * t) for t in lengths])
    return Activations(*layer, *base)


@dataclass
class Item:
    """One line of the preflight's table: what, for which model, on which device, how many bytes, and
    in which phase (`resident`, `generation` or `update`)."""

    what: str
    model: str
    device: str
    nbytes: float
    phase: str = "resident"


@dataclass
class Report:
    items: list[Item]
    capacity: dict[str, float]  # device -> bytes available (None-free: unknown devices are left out)

    def per_device(self) -> dict[str, dict[str, float]]:
        """Per device: resident bytes (summed), the generation and update phases' (M's and m's run one
        after the other, so the larger model's), and the peak: resident + the larger phase."""
        out: dict[str, dict[str, float]] = {}
        phases: dict[tuple[str, str, str], float] = {}
        for it in self.items:
            d = out.setdefault(it.device, {"resident": 0.0, "generation": 0.0, "update": 0.0})
            if it.phase == "resident":
                d["resident"] += it.nbytes
            else:
                phases[it.device, it.phase, it.model] = (
                    phases.get((it.device, it.phase, it.model), 0.0) + it.nbytes
                )
        for (dev, phase, _), nbytes in phases.items():
            out[dev][phase] = max(out[dev][phase], nbytes)
        for d in out.values():
            d["peak"] = d["resident"] + max(d["generation"], d["update"])
        return out

    def misfits(self) -> dict[str, tuple[float, float]]:
        """Devices whose peak exceeds their capacity: device -> (peak, capacity)."""
        return {
            dev: (d["peak"], self.capacity[dev])
            for dev, d in self.per_device().items()
            if dev in self.capacity and d["peak"] > self.capacity[dev]
        }

    def table(self) -> str:
        lines = ["| device | model | item | phase | GB |", "|---|---|---|---|---|"]
        for it in self.items:
            lines.append(f"| {it.device} | {it.model} | {it.what} | {it.phase} | {it.nbytes / GB:,.2f} |")
        for dev, d in self.per_device().items():
            cap = self.capacity.get(dev)
            room = f" of {cap / GB:,.1f} GB" if cap else ""
            lines.append(
                f"| {dev} | all | resident {d['resident'] / GB:,.2f} + max(generation {d['generation'] / GB:,.2f}, "
                f"update {d['update'] / GB:,.2f}) | **peak** | **{d['peak'] / GB:,.2f}**{room} |"
            )
        return "\n".join(lines)


def lora_params(shape: ModelShape, r: int) -> int:
    """Adapter parameters of rank `r` on every linear layer of the decoder (peft's `all-linear`: the
    LM head excluded): r x (in + out) per layer."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(shape.config)
    head = model.get_output_embeddings()
    return sum(
        r * (m.in_features + m.out_features)
        for m in model.modules()
        if isinstance(m, torch.nn.Linear) and m is not head
    )


def _dtype(model_cfg: Any, accelerator: bool) -> str:
    if model_cfg.dtype != "auto":
        return model_cfg.dtype
    return "bfloat16" if accelerator else "float32"


def _device(model_cfg: Any, accelerator: bool) -> str:
    dev = model_cfg.device
    if dev == "auto":
        return "cuda:0" if accelerator else "cpu"
    return "cuda:0" if dev == "cuda" else dev


def model_items(
    role: str,
    model_cfg: Any,
    shape: ModelShape,
    cfg: Any,
    *,
    trained: bool,
    reference: bool,
    world: int,
    fsdp: bool,
    accelerator: bool,
    prompt_tokens: int,
    new_tokens: int,
    activations: dict[bool, Activations],
    capacity: float | None = None,
) -> list[Item]:
    """The table's lines for one model (see the module docstring)."""
    dtype = _dtype(model_cfg, accelerator)
    db = BYTES[dtype]
    dev = _device(model_cfg, accelerator)
    shard = world if fsdp else 1
    items = []
    weights = shape.params * db
    trainable = lora_params(shape, cfg.lora.r) if model_cfg.lora else shape.params
    items.append(Item(f"weights ({dtype}{', sharded' if fsdp else ''})", role, dev, weights / shard))
    if trained:
        items.append(Item("gradients", role, dev, trainable * db / (shard if not model_cfg.lora else 1)))
        items.append(
            Item("AdamW moments", role, dev, 2 * trainable * db / (shard if not model_cfg.lora else 1))
        )
        if model_cfg.lora:
            items.append(Item("LoRA adapter weights", role, dev, trainable * db))
    if reference:
        items.append(Item("frozen reference (KL)", role, dev, weights))
    if fsdp and world > 1:
        items.append(Item("generation copy (whole weights)", role, dev, weights))
    seq = prompt_tokens + new_tokens
    if model_cfg.engine == "vllm":  # vLLM holds its share from start to end (weights + its KV cache)
        opts = cfg.rollout.vllm
        if "kv_cache_gib" in opts:
            share, what = (
                weights + opts["kv_cache_gib"] * 2**30,
                f"vLLM: weights + kv_cache_gib {opts['kv_cache_gib']}",
            )
        else:
            util = opts.get("gpu_memory_utilization", 0.9)
            share, what = util * (capacity or 0.0), f"vLLM: gpu_memory_utilization {util} of the device"
        items.append(Item(what, role, dev, share))
    else:
        kv = cfg.rollout.engine_batch_size * seq * shape.kv_bytes_per_token(db)
        items.append(
            Item(f"KV cache: {cfg.rollout.engine_batch_size} x {seq:,} tokens", role, dev, kv, "generation")
        )
    if trained:
        b = cfg.optim.micro_batch_size
        kept = activations[True] if model_cfg.gradient_checkpointing else activations[False]
        acts = b * (shape.layers * kept.layer(seq) + kept.base(seq))
        what = "activations, checkpointed" if model_cfg.gradient_checkpointing else "activations"
        items.append(Item(f"{what}: {b} x {seq:,} tokens", role, dev, acts, "update"))
        if model_cfg.gradient_checkpointing:  # the backward recomputes one layer at a time
            items.append(Item("one layer recomputed", role, dev, b * activations[False].layer(seq), "update"))
        autocast = cfg.optim.autocast == "bf16" or (cfg.optim.autocast == "auto" and accelerator)
        logit_bytes = 2 if autocast or db == 2 else 4
        logits = b * new_tokens * shape.vocab * logit_bytes
        chunk = min(cfg.optim.logprob_chunk_size or new_tokens, new_tokens)
        fp32_chunk = b * chunk * shape.vocab * 4 if logit_bytes == 2 else 0
        items.append(Item(f"logits: {b} x {new_tokens:,} positions", role, dev, logits, "update"))
        items.append(
            Item("their gradient + one fp32 log-prob chunk", role, dev, logits + fp32_chunk, "update")
        )
    return items


def estimate(
    cfg: Any,
    *,
    world: int = 1,
    gpu_memory: float | None = None,
    accelerator: bool | None = None,
    max_prompt_tokens: int = 1024,
    shapes: dict[str, ModelShape] | None = None,
) -> Report:
    """The preflight of a `TrainConfig` for one process of `world` (FSDP shards over them):
    `gpu_memory` the bytes of each accelerator (None: detected, or unknown on CPU); `max_prompt_tokens`
    M's longest prompt (m's is that plus M's signal and the template's few tokens)."""
    import torch

    from duetlm.modes import MODES, SCHEDULES

    if accelerator is None:
        accelerator = torch.cuda.is_available()
    if gpu_memory is None and accelerator and torch.cuda.is_available():
        gpu_memory = float(torch.cuda.get_device_properties(0).total_memory)
    shapes = dict(shapes or {})
    uses_small = MODES[cfg.mode].uses_small
    fsdp = world > 1 and cfg.distributed.strategy == "fsdp"
    autocast = cfg.optim.autocast == "bf16" or (cfg.optim.autocast == "auto" and accelerator)
    roles = [("M", cfg.large)] + ([("m", cfg.small)] if uses_small and cfg.small is not None else [])
    items: list[Item] = []
    for role, model_cfg in roles:
        shape = shapes.get(role) or ModelShape.of(model_cfg.path)
        shapes[role] = shape
        large = role == "M"
        trained = large or SCHEDULES[cfg.schedule].trains_small
        dtype = _dtype(model_cfg, accelerator)
        ac = autocast and dtype == "float32"  # autocast runs fp32 weights in bf16
        # Measured where the run will train: a GPU's attention kernels keep no T² probabilities, the CPU's
        # do. Estimating a GPU config on a machine without one: the CPU's figures, with the per-layer T²
        # term dropped (memory-efficient attention assumed; the attention mask's T² stays).
        on_gpu = bool(accelerator and torch.cuda.is_available())
        profile = {
            ck: activation_profile(shape, ac, dtype, ck, device="cuda" if on_gpu else "cpu")
            for ck in {False, model_cfg.gradient_checkpointing}
        }
        if accelerator and not on_gpu:
            profile = {ck: replace(a, layer_quad=0.0) for ck, a in profile.items()}
        sampling = cfg.rollout.large if large else cfg.rollout.small
        prompt = max_prompt_tokens if large else max_prompt_tokens + cfg.rollout.large.max_new_tokens + 16
        items += model_items(
            role,
            model_cfg,
            shape,
            cfg,
            trained=trained,
            reference=large and cfg.objective.uses_reference and not model_cfg.lora,
            world=world,
            fsdp=fsdp,
            accelerator=accelerator,
            prompt_tokens=prompt,
            new_tokens=sampling.max_new_tokens,
            activations=profile,
            capacity=gpu_memory,
        )
    capacity = {it.device: gpu_memory for it in items if it.device.startswith("cuda") and gpu_memory}
    return Report(items, capacity)


def fixes(cfg: Any, world: int) -> list[str]:
    """What to change when a device does not fit, most effective first, each naming its config key;
    those the config already has are left out."""
    out = []
    if cfg.distributed.strategy != "fsdp" or world == 1:
        out.append(
            "shard the models over several GPUs: --set distributed.strategy=fsdp, launched with torchrun"
        )
    if not cfg.large.lora:
        out.append("train M through LoRA: --set large.lora=true (its reference then costs nothing)")
    if cfg.rollout.engine_batch_size > 1:
        out.append(
            f"decode fewer sequences at once: --set rollout.engine_batch_size=N (now {cfg.rollout.engine_batch_size})"
        )
    for role, m in (("large", cfg.large), ("small", cfg.small)):
        if m is not None and not m.gradient_checkpointing:
            out.append(f"recompute activations: --set {role}.gradient_checkpointing=true")
    if cfg.small is not None and cfg.small.device == cfg.large.device:
        out.append("put m on another GPU: --set small.device=cuda:1")
    if cfg.large.dtype == "float32":
        out.append(
            "keep M's weights in bf16: --set large.dtype=bfloat16 (AdamW's updates at lr 1e-6 are then "
            "partly lost to rounding: bf16 parameters with fp32 master weights are not implemented yet)"
        )
    return out


def check(report: Report, cfg: Any, world: int = 1) -> None:
    """A DuetError naming each device that does not fit, its peak and capacity, and the fixes."""
    bad = report.misfits()
    if not bad:
        return
    lines = [
        f"{dev}: needs {peak / GB:,.1f} GB at its peak, has {cap / GB:,.1f} GB"
        for dev, (peak, cap) in bad.items()
    ]
    raise DuetError(
        "preflight: the config does not fit: "
        + "; ".join(lines)
        + ". Fixes, most effective first: "
        + "; ".join(fixes(cfg, world))
        + ". The table: duetlm train --preflight (same config)."
    )
