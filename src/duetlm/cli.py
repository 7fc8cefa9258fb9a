"""The `duetlm` command line. Thin: parse arguments, load config, call the library.

Nothing heavy is imported at module import time (torch, transformers), so `duetlm --help` is instant.
User errors (`DuetError`) print one line and exit 1; they never show a traceback.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Annotated, Any

import typer

from duetlm.errors import DuetError

app = typer.Typer(
    name="duetlm",
    help="DUET: a large model thinks, a small model answers. Train, evaluate and serve model pairs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """DUET: a large model thinks, a small model answers. Train, evaluate and serve model pairs."""


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn `DuetError` (and missing files) into `error: ...` on stderr and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (DuetError, FileNotFoundError) as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(1) from None

    return wrapper


@app.command()
@user_errors
def infer(
    question: Annotated[str, typer.Option("--question", "-q", help="the problem x")],
    large: Annotated[str, typer.Option(help="M: hub id, local dir, .gguf file or short name")],
    small: Annotated[str, typer.Option(help="m: hub id, local dir, .gguf file or short name")],
    max_signal_tokens: Annotated[int, typer.Option(help="cap on M's thinking tokens")] = 256,
    max_answer_tokens: Annotated[int, typer.Option(help="cap on m's answer tokens")] = 256,
    temperature: Annotated[float, typer.Option(help="0 = greedy")] = 0.0,
    seed: Annotated[int, typer.Option()] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Run one question through M -> signal z -> m and print the signal, the answer and token counts."""
    from duetlm.pipeline import run_infer

    result = run_infer(
        question=question,
        large=large,
        small=small,
        max_signal_tokens=max_signal_tokens,
        max_answer_tokens=max_answer_tokens,
        temperature=temperature,
        seed=seed,
        device=device,
    )
    if as_json:
        sys.stdout.write(json.dumps(result, ensure_ascii=False) + "\n")
        return
    typer.echo(f"signal ({result['large_tokens']} M tokens, complete={result['signal_complete']}):")
    typer.echo(result["signal"] or "<empty>")
    typer.echo(f"\nanswer ({result['small_tokens']} m tokens):")
    typer.echo(result["answer"])


def main() -> None:  # pragma: no cover - console entry point alternative
    app()
if __name__ == "__main__":
    app()
