"""Generation engines behind one small protocol (`Engine`), and `build_engine`, the one place that turns
a `ModelConfig` into an engine (the trainer, `duetlm eval` and `duetlm serve`'s `build_service` call it).

Engines import their heavy libraries only when built: `import duetlm.engines` needs neither vLLM nor
an HTTP client.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from duetlm.engines.base import Engine, Generation, SamplingParams

if TYPE_CHECKING:
    from duetlm.config import ModelConfig

__all__ = ["ENGINE_BUILDERS", "Engine", "Generation", "SamplingParams", "build_engine"]


def _build_hf(model: ModelConfig, seed: int, *, trainable: bool = False, **options: Any) -> Engine:
    """`HFEngine` over `models.load_model` (options: `max_batch_size`). The seed travels per call."""
    from duetlm.engines.hf import HFEngine
    from duetlm.models import load_model

    hf_model, tokenizer = load_model(model.path, dtype=model.dtype, device=model.device, trainable=trainable)
    return HFEngine(hf_model, tokenizer, **options)


def _build_vllm(model: ModelConfig, seed: int, **options: Any) -> Engine:
    """`VLLMEngine` (options: `kv_cache_gib`, `gpu_memory_utilization`, `max_model_len`,
    `enforce_eager`, `sleep_mode`, `llm_kwargs`). vLLM picks its own device; `model.device` is unused."""
    from duetlm.engines.vllm import VLLMEngine

    return VLLMEngine(model.path, dtype=model.dtype, seed=seed, **options)


def _build_remote(model: ModelConfig, seed: int, **options: Any) -> Engine:
    """`RemoteEngine` at `model.url`, asking for the served model named `model.path` (options:
    `timeout`, `max_retries`, `max_concurrency`, `api_key`, `extra_body`, ...)."""
    from duetlm.config import ConfigError
    from duetlm.engines.remote import RemoteEngine

    if not model.url:
        raise ConfigError(f"model {model.path!r} has engine: remote but no url (set url: http://host:port)")
    return RemoteEngine(model.url, model=model.path, **options)


# One dispatch table for engine names (ModelConfig.engine).
ENGINE_BUILDERS: dict[str, Callable[..., Engine]] = {
    "hf": _build_hf,
    "vllm": _build_vllm,
    "remote": _build_remote,
}


def build_engine(model: ModelConfig, seed: int = 0, **options: Any) -> Engine:
    """The engine that `model.engine` names, for the model `model.path`.

    `hf`: `HFEngine` over `duetlm.models.load_model` (`trainable=True` keeps the model trainable, for a
    trainer that rolls out with the policy it updates). `vllm`: `VLLMEngine` (needs vLLM; see
    `scripts/install_vllm.sh`). `remote`: `RemoteEngine` over an OpenAI-compatible server at `model.url`.
    `seed`: the engine's own seed where it has one (vLLM); per-call seeds go in `SamplingParams`.
    `options`: keyword arguments for that engine's constructor.
    """
    from duetlm.config import ConfigError

    try:
        builder = ENGINE_BUILDERS[model.engine]
    except KeyError:
        raise ConfigError(
            f"unknown engine {model.engine!r} for model {model.path!r}; valid: {', '.join(ENGINE_BUILDERS)}"
        ) from None
    return builder(model, seed, **options)
