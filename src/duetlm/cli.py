"""The `duetlm` command line. Thin: parse arguments, load config, call the library.

Nothing heavy is imported at module import time (torch, transformers), so `duetlm --help` is instant.
The options of `eval` and `serve` are generated from their configs (`EvalConfig`, `ServeConfig`:
`duetlm.cli_options`), where each option's default and help text are written once.
User errors (`DuetError`) print one line and exit 1; they never show a traceback.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from typing import Annotated, Any

import typer

from duetlm.cli_options import config_options
from duetlm.errors import DuetError
from duetlm.evaluate import EvalConfig
from duetlm.serve.config import ServeConfig

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
    # Weight-loading bars from transformers/hub clutter every command's output; duetlm shows its own.
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _is_rank0() -> bool:
    """Whether this is the process that speaks: rank 0 of a torchrun / accelerate launch, or the only one."""
    return os.environ.get("RANK", "0") == "0"


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn `DuetError` (and missing files) into `error: ...` on stderr and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (DuetError, FileNotFoundError) as err:
            if _is_rank0():  # under torchrun / accelerate every process fails alike: say it once
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


@app.command()
@user_errors
def train(
    config: Annotated[str, typer.Option("--config", "-c", help="YAML training config (configs/tiny.yaml)")],
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override a config key: --set rollout.n=8 (repeatable)")
    ] = None,
    resume: Annotated[
        str | None,
        typer.Option(help="'auto' (newest complete checkpoint of the run dir) or a checkpoint dir"),
    ] = None,
    run_dir: Annotated[str | None, typer.Option(help="run directory (overrides run.dir)")] = None,
    preflight: Annotated[
        bool,
        typer.Option(
            "--preflight", help="print the memory each device needs (from config.json only) and stop"
        ),
    ] = False,
    gpu_memory: Annotated[
        float | None,
        typer.Option(help="GB per GPU for the preflight (default: the detected GPU's; on CPU: unchecked)"),
    ] = None,
    world: Annotated[
        int | None, typer.Option(help="processes for the preflight (default: this launch's WORLD_SIZE)")
    ] = None,
    max_prompt_tokens: Annotated[
        int | None,
        typer.Option(
            help="M's longest prompt, for the preflight's KV cache and activations "
            "(default: rollout.max_prompt_tokens, else 1024)"
        ),
    ] = None,
) -> None:
    """Train M (and m) with GRPO on the DUET objective or a baseline; checkpoints are resumable.

    On a GPU the preflight runs first and refuses a config whose peak memory exceeds the device,
    naming the fixes; `--preflight` prints its table and stops (no weights are loaded)."""
    import os

    from duetlm.config import TrainConfig, load_config
    from duetlm.train import run_training

    cfg = load_config(TrainConfig, config, set_)
    world = world or int(os.environ.get("WORLD_SIZE", "1"))
    if preflight or _has_cuda():
        _preflight(cfg, world, gpu_memory, max_prompt_tokens, show=preflight)
        if preflight:
            return
    result = run_training(cfg, resume=resume, run_dir=run_dir)
    if _is_rank0():
        typer.echo(f"step {result.step}/{cfg.run.steps}; checkpoint {result.checkpoint}")
    if result.stop_signum is not None:
        raise typer.Exit(128 + result.stop_signum)


def _preflight(
    cfg: Any, world: int, gpu_memory: float | None, max_prompt_tokens: int | None, show: bool
) -> None:
    """`duetlm train`'s preflight: with `show` (--preflight) the table, and any failure is the
    command's; run by itself before training on a GPU, a config it cannot read (a .gguf model, a hub
    id offline) is a warning, not a refusal: training itself reads the models."""
    from duetlm.errors import DuetError
    from duetlm.train.preflight import check, estimate

    gpu = None if gpu_memory is None else gpu_memory * 1e9
    try:
        report = estimate(
            cfg,
            world=world,
            gpu_memory=gpu,
            accelerator=True if gpu is not None else None,
            max_prompt_tokens=max_prompt_tokens or cfg.rollout.max_prompt_tokens or 1024,
        )
    except DuetError as err:
        if show:
            raise
        if _is_rank0():
            typer.echo(f"warning: preflight skipped: {err}", err=True)
        return
    if show and _is_rank0():
        typer.echo(report.table())
    check(report, cfg, world)  # a config that does not fit exits 1 with the fixes


@app.command("init-tiny")
@user_errors
def init_tiny(
    out_dir: Annotated[str, typer.Argument(help="folder for large/ and small/")],
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Build a tiny random M and m (Qwen3 architecture, local tokenizer) for configs/tiny.yaml."""
    from duetlm.models import init_tiny as build

    paths = build(out_dir, seed=seed)
    typer.echo(f"M: {paths['large']}\nm: {paths['small']}")


@app.command("eval")
@user_errors
@config_options(EvalConfig)
def eval_(
    options: dict[str, Any],
    progress: Annotated[bool, typer.Option(help="show a progress bar on stderr")] = True,
) -> None:
    """Evaluate methods (DUET and the inference baselines) on benchmarks; write records, tables, plot."""
    from duetlm.evaluate import make_config, run_eval

    summary = run_eval(make_config(**options), progress=progress)
    typer.echo(
        f"{summary.generated} samples generated ({summary.done_before} already done) in "
        f"{summary.wall_s:.1f} s; wrote {summary.output}/results.json, table.md, pareto.png"
    )
    typer.echo((summary.output / "table.md").read_text())


@app.command()
@user_errors
def report(
    dirs: Annotated[list[str], typer.Argument(help="one eval output directory, or two to compare")],
    output: Annotated[str | None, typer.Option(help="also write the comparison to this file")] = None,
) -> None:
    """Re-render an eval directory's results.json, table.md and pareto.png; with two, compare them."""
    from pathlib import Path

    from duetlm.report import TABLE_FILE, render_comparison, write_report

    if len(dirs) == 1:
        write_report(dirs[0])
        text = (Path(dirs[0]) / TABLE_FILE).read_text()
    elif len(dirs) == 2:
        text = render_comparison(dirs[0], dirs[1])
    else:
        raise DuetError(f"report takes one directory, or two to compare (got {len(dirs)})")
    if output:
        Path(output).write_text(text)
    typer.echo(text)


@app.command()
@user_errors
@config_options(ServeConfig, api_key={"envvar": "DUETLM_SERVE_API_KEY"})
def serve(options: dict[str, Any]) -> None:
    """Serve M -> z -> m (or M alone) as an OpenAI-compatible API: /v1/chat/completions, /v1/models, /health, /metrics (Prometheus)."""
    from duetlm.config import build_config
    from duetlm.serve import run_server

    run_server(build_config(ServeConfig, options, origin="duetlm serve options"))


data_app = typer.Typer(
    help="Look at problem sources: registered names, hub ids (owner/name), local data files.",
    no_args_is_help=True,
)
app.add_typer(data_app, name="data")

_SourceArg = Annotated[
    str,
    typer.Argument(
        help="registered name (math500, gsm8k, ...; NAME@SPLIT), lab:<task>, hub id, or .jsonl/.json/.parquet/.csv file"
    ),
]
_SplitOpt = Annotated[
    str | None, typer.Option(help="split (default: as duetlm eval reads it: test where the source has one)")
]
_DataDirOpt = Annotated[str | None, typer.Option("--data-dir", help="offline mirror (or $DUETLM_DATA_DIR)")]
_SkipOpt = Annotated[bool, typer.Option("--skip-bad-rows", help="skip bad rows with a warning, don't fail")]
_FieldOpt = Annotated[str | None, typer.Option(help="column of a hub id or file (dotted: nested field)")]


def _cli_problems(
    source: str,
    split: str | None,
    limit: int | None,
    data_dir: str | None,
    skip_bad_rows: bool,
    fields: dict[str, str | None],
) -> list[Any]:
    """The data commands read a source as `duetlm eval` does (`problems.load_benchmark`: a registered
    name's test split by default, `NAME@SPLIT`, `lab:<task>`); skipped-row warnings become one
    `warning:` line each."""
    import warnings

    from duetlm.problems import load_benchmark

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        problems = load_benchmark(
            source,
            split=split,
            limit=limit,
            data_dir=data_dir,
            on_error="skip" if skip_bad_rows else "raise",
            **{k: v for k, v in fields.items() if v is not None},
        )
    for w in caught:
        typer.echo(f"warning: {w.message}", err=True)
    return problems


@data_app.command("show")
@user_errors
def data_show(
    source: _SourceArg,
    limit: Annotated[int, typer.Option(help="how many problems to print")] = 5,
    split: _SplitOpt = None,
    data_dir: _DataDirOpt = None,
    skip_bad_rows: _SkipOpt = False,
    question_field: _FieldOpt = None,
    answer_field: _FieldOpt = None,
    id_field: _FieldOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per line")] = False,
) -> None:
    """Print the first problems of a source: id, kind, question (with options) and gold answer."""
    import dataclasses

    from duetlm.problems import render_question

    fields = {"question_field": question_field, "answer_field": answer_field, "id_field": id_field}
    for problem in _cli_problems(source, split, limit, data_dir, skip_bad_rows, fields):
        if as_json:
            sys.stdout.write(json.dumps(dataclasses.asdict(problem), ensure_ascii=False) + "\n")
            continue
        typer.echo(f"[{problem.id}] ({problem.kind})")
        typer.echo(render_question(problem))
        typer.echo(f"answer: {problem.answer}\n")


@data_app.command("stats")
@user_errors
def data_stats(
    source: _SourceArg,
    split: _SplitOpt = None,
    data_dir: _DataDirOpt = None,
    skip_bad_rows: _SkipOpt = False,
    question_field: _FieldOpt = None,
    answer_field: _FieldOpt = None,
    id_field: _FieldOpt = None,
) -> None:
    """Count the problems of a source by kind."""
    from collections import Counter

    fields = {"question_field": question_field, "answer_field": answer_field, "id_field": id_field}
    problems = _cli_problems(source, split, None, data_dir, skip_bad_rows, fields)
    typer.echo(f"{source}: {len(problems)} problems")
    for kind, count in sorted(Counter(p.kind for p in problems).items()):
        typer.echo(f"  {kind}: {count}")


_TaskOpt = Annotated[
    str, typer.Option("--task", help="lab task family: chain (6 steps) or mix (lengths 2..6)")
]
_SeedOpt = Annotated[
    int | None, typer.Option(help="seed of training problems, warm start and RL (default: config's, 0)")
]
_DemoConfigOpt = Annotated[
    str | None,
    typer.Option("--config", "-c", help="YAML demo config (a run's demo-config.yaml is a full example)"),
]
_DemoSetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="override a config key: --set rl.steps=40 (repeatable)")
]
_CacheOpt = Annotated[
    str | None, typer.Option(help="warm-start cache (default $DUETLM_CACHE or ~/.cache/duetlm)")
]
_QuickOpt = Annotated[bool, typer.Option("--quick", help="toy sizes: every phase in about a minute")]


def _demo_config(task: str, quick: bool, config: str | None, overrides: list[str]) -> Any:
    """The task family's defaults (toy sizes with `quick`), then the config file, then the overrides."""
    from duetlm.config import build_config, deep_merge, load_config, parse_overrides
    from duetlm.lab.demo import DemoConfig, quick_config, task_config

    base = (quick_config(task) if quick else task_config(task)).model_dump()
    if config:
        base = deep_merge(base, load_config(DemoConfig, config).model_dump(exclude_defaults=True))
    return build_config(
        DemoConfig, deep_merge(base, parse_overrides(overrides)), f"--task {task} + overrides"
    )


def _cache(cache_dir: str | None) -> Any:
    from pathlib import Path

    from duetlm.models import cache_dir as default_cache

    return Path(cache_dir) if cache_dir else default_cache()


@app.command()
@user_errors
def demo(
    quick: _QuickOpt = False,
    seed: _SeedOpt = None,
    output: Annotated[str | None, typer.Option(help="run directory (default runs/demo-seed<SEED>)")] = None,
    config: _DemoConfigOpt = None,
    set_: _DemoSetOpt = None,
    cache_dir: _CacheOpt = None,
    task: _TaskOpt = "chain",
) -> None:
    """The whole DUET method on a CPU: lab task, warm start (cached), baselines, DUET training, table."""
    from pathlib import Path

    from duetlm.lab.demo import run_demo

    overrides = list(set_ or []) + ([f"seed={seed}"] if seed is not None else [])
    cfg = _demo_config(task, quick, config, overrides)
    name = "demo" + ("" if task == "chain" else f"-{task}") + ("-quick" if quick else "")
    out = Path(output or f"runs/{name}-seed{cfg.seed}")
    command = " ".join(["duetlm", *sys.argv[1:]])
    run_demo(cfg, out, _cache(cache_dir), command=command)


lab_app = typer.Typer(
    help="The lab: procedural tasks where DUET's claims can be measured on a CPU.", no_args_is_help=True
)
app.add_typer(lab_app, name="lab")


@lab_app.command("properties")
@user_errors
def lab_properties(
    task: _TaskOpt = "mix",
    quick: _QuickOpt = False,
    seed: _SeedOpt = None,
    output: Annotated[
        str | None, typer.Option(help="folder for properties.json (default runs/lab-<TASK>)")
    ] = None,
    config: _DemoConfigOpt = None,
    set_: _DemoSetOpt = None,
    cache_dir: _CacheOpt = None,
) -> None:
    """Measure a task family on the warm-started pair, per chain length: m alone (reasoning within its
    cap), m given the minimal sufficient signal, m given the whole trace, the original M."""
    from pathlib import Path

    from rich.console import Console

    from duetlm.lab.properties import measure, render, write

    overrides = list(set_ or []) + ([f"seed={seed}"] if seed is not None else [])
    cfg = _demo_config(task, quick, config, overrides)
    console = Console(width=None if sys.stdout.isatty() else 140)
    rows, info = measure(cfg, _cache(cache_dir), console.print)
    console.print(render(rows, cfg.task.spec()))
    out = Path(output or f"runs/lab-{task}{'-quick' if quick else ''}-seed{cfg.seed}")
    path = write(out, rows, info, command=" ".join(["duetlm", *sys.argv[1:]]))
    console.print(f"written {path}")


@lab_app.command("tables")
@user_errors
def lab_tables(
    task: _TaskOpt = "mix",
    seeds: Annotated[
        str, typer.Option(help="comma-separated seeds; each cell is mean ± std over them")
    ] = "0,1,2",
    variants: Annotated[
        str | None, typer.Option(help="comma-separated trained variants (default: all; see lab/grid.py)")
    ] = None,
    steps: Annotated[int, typer.Option(min=1, help="RL steps per trained variant")] = 40,
    jobs: Annotated[int, typer.Option(min=1, help="worker processes (each one torch thread)")] = 2,
    quick: _QuickOpt = False,
    output: Annotated[
        str | None, typer.Option(help="tables, plots, results.json (default runs/lab-tables-<TASK>)")
    ] = None,
    work: Annotated[
        str | None,
        typer.Option(help="cached runs: a rerun redoes only what is missing (default <OUTPUT>/work)"),
    ] = None,
    config: _DemoConfigOpt = None,
    set_: _DemoSetOpt = None,
    cache_dir: _CacheOpt = None,
) -> None:
    """Table 1 and the ablations on a lab task over seeds (cached, parallel, resumable)."""
    from pathlib import Path

    from duetlm.lab.grid import GridSpec, parse_seeds, parse_variants
    from duetlm.lab.tables import lab_tables as run_tables

    seed_list, chosen = parse_seeds(seeds), parse_variants(variants)
    cfg = _demo_config(task, quick, config, list(set_ or []))
    spec_cfg = cfg.model_dump(mode="json", exclude={"seed"})
    spec = GridSpec(task=task, steps=steps, quick=quick, config=spec_cfg, cache=str(_cache(cache_dir)))
    out = Path(output or f"runs/lab-tables-{task}{'-quick' if quick else ''}")
    command = " ".join(["duetlm", *sys.argv[1:]])
    run_tables(spec, seed_list, chosen, jobs, Path(work) if work else out / "work", out, command)
    typer.echo((out / "tables.md").read_text())


def main() -> None:  # pragma: no cover - console entry point alternative
    app()


if __name__ == "__main__":
    app()
