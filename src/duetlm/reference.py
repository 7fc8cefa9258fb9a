"""The config reference, `docs/config.md`, generated from the pydantic schemas of `duetlm train`,
`duetlm demo`, `duetlm eval` and `duetlm serve`: every key (dotted, as `--set` takes it), its type,
default and description. `tests/test_reference.py` fails when the file and the schemas disagree;
regenerate with `python -m duetlm.reference > docs/config.md`.

"""

from __future__ import annotations

import enum
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from duetlm.config import section_class

DOC_PATH = "docs/config.md"
REGENERATE = f"python -m duetlm.reference > {DOC_PATH}"


@dataclass(frozen=True)
class Key:
    """One leaf of a config schema."""

    name: str  # dotted: `rollout.large.temperature`
    type: str
    default: str  # "required" when there is none
    description: str


def type_name(annotation: Any) -> str:
    """`int | None`, `"hf" | "vllm"`, `list[str]`: how a reader would write the type."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " | ".join(repr(a).replace("'", '"') for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(annotation))
    if origin is not None:
        args = ", ".join(type_name(a) for a in typing.get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if annotation is type(None):
        return "None"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return " | ".join(repr(m.value) for m in annotation)
    return getattr(annotation, "__name__", str(annotation))


def _text(description: str | None) -> str:
    return " ".join((description or "").split())


def _shown(value: Any) -> str:
    if isinstance(value, BaseModel):
        return "(section)"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_shown(v) for v in value) + "]"
    return repr(value)


def _field_default(field: Any) -> Any:
    if field.default is not PydanticUndefined:
        return field.default
    if field.default_factory is not None:
        return field.default_factory()
    return PydanticUndefined


def keys(cls: type[BaseModel], prefix: str = "", defaults: BaseModel | None = None) -> Iterator[Key]:
    """Every leaf key of `cls`, depth first in field order. A section whose default is an instance
    with values of its own (`warm_large: SFTConfig(steps=250)`) reports those values."""
    for name, field in cls.model_fields.items():
        default = getattr(defaults, name) if defaults is not None else _field_default(field)
        sub = section_class(field.annotation)
        if (
            sub is not None and default is None
        ):  # an optional section, unset by default: say so, then its keys
            yield Key(prefix + name, type_name(field.annotation), "null", _text(field.description))
        if sub is not None and (isinstance(default, BaseModel) or default in (None, PydanticUndefined)):
            yield from keys(sub, f"{prefix}{name}.", default if isinstance(default, BaseModel) else None)
            continue
        yield Key(
            name=prefix + name,
            type=type_name(field.annotation),
            default="required" if default is PydanticUndefined else _shown(default),
            description=_text(field.description),
        )


def _cell(text: str) -> str:
    return text.replace("|", "\\|") or "—"


def commands() -> list[tuple[str, str, type[BaseModel]]]:
    """(title, how it is given, schema) of each documented command."""
    from duetlm.config import TrainConfig
    from duetlm.evaluate import EvalConfig
    from duetlm.lab.demo import DemoConfig
    from duetlm.serve.config import ServeConfig

    return [
        ("duetlm train", "a YAML file (`--config`) and `--set key=value` overrides", TrainConfig),
        (
            "duetlm demo",
            "`--set key=value` (and `--config` YAML); `--task` picks the family's defaults",
            DemoConfig,
        ),
        ("duetlm eval", "command-line flags (`--max-signal-tokens` for `max_signal_tokens`)", EvalConfig),
        ("duetlm serve", "command-line flags (`--max-batch` for `max_batch`)", ServeConfig),
    ]


def markdown() -> str:
    """The whole of docs/config.md."""
    lines = [
        "# Config reference",
        "",
        f"Generated from the pydantic schemas by `{REGENERATE}`; a test fails when it is stale.",
        "Every key has a default unless marked required; an unknown key is an error that lists the",
        "valid keys of its section.",
    ]
    for title, given, cls in commands():
        doc = " ".join((cls.__doc__ or "").split())
        lines += ["", f"## `{title}`: `{cls.__module__}.{cls.__name__}`", "", f"Given as {given}. {doc}", ""]
        lines += ["| key | type | default | description |", "|---|---|---|---|"]
        for k in keys(cls):
            lines.append(f"| `{k.name}` | {_cell(k.type)} | {_cell(k.default)} | {_cell(k.description)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import sys

    sys.stdout.write(markdown())
