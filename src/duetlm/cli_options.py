"""Command-line options generated from a pydantic config, so that each option's default and help text
live once: in the field's `Field(default, description=...)`.

`config_options(Model)` gives a typer command one `--field-name` option per field of `Model`. Options
are parsed as the field's type (a `Literal` as a string: the config checks it, and its error names the
field), a list field takes the option repeatedly, and the command receives the values as one dict.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal

import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo


def flag(name: str) -> str:
    """The option of field `name`: `max_batch` -> `--max-batch`."""
    return "--" + name.replace("_", "-")


def option_type(annotation: Any) -> tuple[Any, str | None]:
    """(the type typer parses a field as, a metavar naming a `Literal`'s choices or None)."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return str, "|".join(str(choice) for choice in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(rest) < len(args):  # X | None
            inner, metavar = option_type(rest[0])
            return inner | None, metavar
        return str, None
    if origin is list:
        return list[str], None
    if annotation in (str, int, float, bool):
        return annotation, None
    return str, None


def field_parameter(name: str, info: FieldInfo, extra: Mapping[str, Any]) -> inspect.Parameter:
    """The typer parameter of one config field (`extra`: more `typer.Option` arguments, e.g. envvar)."""
    kind, metavar = option_type(info.annotation)
    default = ... if info.is_required() else info.get_default(call_default_factory=True)
    decl = f"{flag(name)}/--no-{flag(name)[2:]}" if kind is bool else flag(name)
    settings: dict[str, Any] = {"help": info.description, **({"metavar": metavar} if metavar else {})}
    option = typer.Option(default, decl, **{**settings, **extra})
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind)


def config_options(
    model: type[BaseModel], **extra: Mapping[str, Any]
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate `fn(options, **own)` into a typer command with one option per field of `model`
    (before `fn`'s own options); `options` is the dict of their values. `extra[field]`: more
    `typer.Option` arguments for that field's option."""
    unknown = set(extra) - set(model.model_fields)
    if unknown:
        raise TypeError(f"{model.__name__} has no fields {sorted(unknown)}")

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        own = list(inspect.signature(fn, eval_str=True).parameters.values())[1:]
        fields = [field_parameter(n, info, extra.get(n, {})) for n, info in model.model_fields.items()]

        @functools.wraps(fn)
        def command(**values: Any) -> Any:
            options = {name: values.pop(name) for name in model.model_fields}
            return fn(options, **values)

        params = fields + [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        return command

    return decorate
