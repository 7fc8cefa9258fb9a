"""Typed configuration: pydantic models, YAML files, and dotted CLI overrides.

Every config class derives from `Strict`, which forbids unknown keys, so a typo is an error naming the
key instead of a silently ignored option. `load_config(cls, path, overrides)` reads a YAML file, applies
`a.b.c=value` overrides (values parsed as YAML: `0.6`, `true`, `[1, 2]`, `null`), validates, and raises
`ConfigError` whose message names the file and each offending key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from duetlm.errors import DuetError

T = TypeVar("T", bound=BaseModel)


class ConfigError(DuetError, ValueError):
    """A config that cannot be used; the message says which key, in which file, and why."""


class Strict(BaseModel):
    """Base of all configs: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


DType = Literal["auto", "float32", "bfloat16", "float16"]


class ModelConfig(Strict):
    """Where a model comes from and how it runs.

    `path`: a Hugging Face hub id, a local directory, a `.gguf` file, or a registered short name
    (`smollm2-135m`; see `duetlm.models.SHORT_NAMES`).
    """

    path: str = Field(description="hub id, local directory, .gguf file or short name")
    dtype: DType = Field("auto", description="weights dtype; auto = float32 on CPU, bfloat16 on CUDA")
    device: str = Field("auto", description="'auto', 'cpu', 'cuda', 'cuda:1', ...")
    engine: Literal["hf", "vllm", "remote"] = Field("hf", description="generation engine")
    url: str | None = Field(None, description="base URL of an OpenAI-compatible server (engine: remote)")
    lora: bool = Field(False, description="train a LoRA adapter instead of all weights")
    gradient_checkpointing: bool = False


class SamplingConfig(Strict):
    """Decoding options for one model (see `duetlm.engines.SamplingParams`)."""

    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    max_new_tokens: int = Field(256, ge=1)


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """`["a.b=1", "c=x"]` -> `{"a": {"b": 1}, "c": "x"}`; values are parsed as YAML scalars/lists."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r} is not of the form key.path=value")
        key, raw = pair.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {pair!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {pair!r} conflicts with an earlier override of {part!r}")
            node = child
        node[parts[-1]] = value
    return out


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """A new dict: `update` merged into `base`, recursively for nested dicts."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def format_validation_error(err: ValidationError, origin: str) -> str:
    lines = [f"invalid config ({origin}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {loc}: unknown key (check the spelling; see the config reference in README)")
        elif e["type"] == "missing":
            lines.append(f"  {loc}: required key is missing")
        else:
            lines.append(f"  {loc}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def build_config(cls: type[T], data: dict[str, Any], origin: str = "<dict>") -> T:
    """Validate `data` as `cls`, turning pydantic's error into a `ConfigError` that names `origin`."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, origin)) from None


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Read `path` (YAML; optional), apply dotted `overrides`, validate as `cls`."""
    data: dict[str, Any] = {}
    origin = "defaults"
    if path is not None:
        path = Path(path)
        origin = str(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping, got {type(loaded).__name__}")
        data = loaded
    if overrides:
        data = deep_merge(data, parse_overrides(overrides))
        origin += " + --set overrides"
    return build_config(cls, data, origin)


def dump_config(cfg: BaseModel, path: str | Path) -> None:
    """Write the resolved config (every default filled in) as YAML."""
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
