"""`duetlm eval`: methods × benchmarks × samples through the pipeline, graded, recorded, summarised.

The methods (algorithm.md §5), one dispatch table, `METHODS`:
- `duet`: M thinks, its signal z goes to m, m answers (`DuetPipeline.run`);
- `original`: M alone, thinking then its own answer (`DuetPipeline.original`);
- `truncation:T`: budget forcing; M's thinking is cut at T tokens, the block closed, M answers
  (`DuetPipeline.truncation`);
- `prompt`: `original` with the paper's concise instruction (`DuetPipeline.concise`);
- `small`: m alone (`DuetPipeline.small_only`);
- `cascade:logprob@T`, `cascade:consistency@K@T`: m answers alone, and asks M for z where its confidence is below T
  (`DuetPipeline.cascade`, `duetlm.cascade`);
- `oracle-route`: the routing limit, not run but read from the same samples of `small` and `duet`
  (M's signal exactly where m alone is wrong; `report.oracle_route`), so naming it runs both.

Every sample becomes a `SampleRecord` appended (and flushed) to `results.jsonl` as soon as its batch
is graded, so an interrupted evaluation loses at most one batch: run the same command again and it
skips every (benchmark, problem, method, sample) already recorded. The resolved options, the seed and
the model sizes go to `run.json`; metrics, tables and plots (`duetlm.report`) are computed from the
records alone.

Seeds: each batch samples with its own seed, derived from the run's seed and the batch's first
(benchmark, method, problem, sample), so a run is reproducible, and a resumed run samples its missing
items as an uninterrupted run with the same remaining work would.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator

from duetlm.cascade import ESTIMATORS, CascadeSpec, parse_cascade
from duetlm.config import Strict
from duetlm.dirlock import DirLock
from duetlm.engines.base import Engine, Generation, SamplingParams
from duetlm.errors import DuetError
from duetlm.pipeline import DuetPipeline, DuetResult
from duetlm.problems import Problem, render_question
from duetlm.report import (
    ORACLE_ROUTE,
    RECORDS_FILE,
    RUN_FILE,
    MethodMetrics,
    SampleRecord,
    read_records,
    read_run,
    write_report,
)

# --------------------------------------------------------------------------------------------------
# Methods: one dispatch table

MethodRun = Callable[[DuetPipeline, list[str], "MethodSpec", int], list[DuetResult]]


@dataclass(frozen=True)
class MethodDef:
    """A method of the evaluation. `run(pipeline, questions, spec, seed)` answers a batch."""

    summary: str
    run: MethodRun
    uses_large: bool = True
    uses_small: bool = False
    takes_cap: bool = False
    takes_cascade: bool = False


METHODS: dict[str, MethodDef] = {
    "duet": MethodDef(
        "M writes a signal z, m answers from (x, z)",
        lambda pipe, qs, spec, seed: pipe.run(qs, seed=seed),
        uses_small=True,
    ),
    "original": MethodDef(
        "M alone: thinking, then its own answer",
        lambda pipe, qs, spec, seed: pipe.original(qs, seed=seed),
    ),
    "truncation": MethodDef(
        "budget forcing: M's thinking cut at T tokens, then M answers",
        lambda pipe, qs, spec, seed: pipe.truncation(qs, spec.cap or 0, seed=seed),
        takes_cap=True,
    ),
    "prompt": MethodDef(
        "M alone with the paper's concise-reasoning instruction",
        lambda pipe, qs, spec, seed: pipe.concise(qs, seed=seed),
    ),
    "small": MethodDef(
        "m alone, no signal",
        lambda pipe, qs, spec, seed: pipe.small_only(qs, seed=seed),
        uses_large=False,
        uses_small=True,
    ),
    "small-at-once": MethodDef(
        "m alone answering at once: its answer begins with the box, no reasoning of its own",
        lambda pipe, qs, spec, seed: pipe.small_only(qs, seed=seed, at_once=True),
        uses_large=False,
        uses_small=True,
    ),
    "cascade": MethodDef(
        "m answers alone; M's signal, then m again, only where m's confidence is below T",
        lambda pipe, qs, spec, seed: pipe.cascade(qs, spec.cascade, seed=seed),
        uses_small=True,
        takes_cascade=True,
    ),
}


def valid_methods() -> str:
    def usage(name: str, d: MethodDef) -> str:
        if d.takes_cascade:  # no brackets: the CLI's help renders them as markup
            return ", ".join(f"{name}:{e}{'@K' if ESTIMATORS[e].votes else ''}@T" for e in ESTIMATORS)
        return f"{name}:T" if d.takes_cap else name

    return ", ".join([*(usage(n, d) for n, d in METHODS.items()), ORACLE_ROUTE])


@dataclass(frozen=True)
class MethodSpec:
    """A method as named on the command line: `name` (e.g. `truncation:3072`), its kind and cap (the truncation baseline's T)."""

    name: str
    kind: str
    cap: int | None = None
    cascade: CascadeSpec | None = None

    @property
    def definition(self) -> MethodDef:
        return METHODS[self.kind]


def parse_method(text: str) -> MethodSpec:
    """`duet`, `original`, `truncation:3072`, `prompt`, `small` -> `MethodSpec`, or a clear error."""
    name = text.strip()
    kind, sep, arg = name.partition(":")
    if kind not in METHODS:
        raise DuetError(f"unknown method {name!r}; valid methods: {valid_methods()}")
    definition = METHODS[kind]
    if definition.takes_cascade:
        if not sep:
            raise DuetError(f"method {kind!r} needs an estimator and threshold, e.g. cascade:logprob@0.5")
        spec = parse_cascade(arg)
        return MethodSpec(f"{kind}:{spec.name}", kind, cascade=spec)
    if not definition.takes_cap:
        if sep:
            raise DuetError(f"method {kind!r} takes no argument (got {name!r})")
        return MethodSpec(kind, kind)
    if not arg.strip().isdigit() or int(arg) < 1:
        raise DuetError(
            f"method {name!r}: the cap must be a positive whole number of tokens, "
            f"e.g. {kind}:3072 (got {arg!r})"
        )
    return MethodSpec(f"{kind}:{int(arg)}", kind, int(arg))


def split_list(value: str | Sequence[str]) -> list[str]:
    """`"a,b, c"` or `["a", "b,c"]` -> `["a", "b", "c"]`; duplicates dropped, order kept."""
    items = [value] if isinstance(value, str) else list(value)
    parts = [p.strip() for item in items for p in item.split(",")]
    return list(dict.fromkeys(p for p in parts if p))


# --------------------------------------------------------------------------------------------------
# Options


class EvalConfig(Strict):
    """Options of `duetlm eval` (the CLI flags, one to one)."""

    large: str = Field(description="M: hub id, local directory, .gguf file or short name")
    small: str | None = Field(None, description="m; needed by the duet and small methods")
    benchmarks: list[str] = Field(
        description="comma-separated: registered names (math500, amc23, ...) or data files"
    )
    methods: list[str] = Field(description=f"comma-separated methods to run: {valid_methods()}")
    samples: int = Field(1, ge=1, description="samples per problem and method (pass@1 over them)")
    temperature: float = Field(0.0, ge=0.0, description="sampling temperature of both models; 0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling of both models")
    top_k: int = Field(0, ge=0, description="top-k sampling of both models (0: off)")
    # Per-model sampling (Qwen3's recommended settings differ for thinking and answering): each
    # overrides the shared option above for one model.
    large_temperature: float | None = Field(
        None, ge=0.0, description="M's temperature (default: --temperature)"
    )
    large_top_p: float | None = Field(None, gt=0.0, le=1.0, description="M's top-p (default: --top-p)")
    large_top_k: int | None = Field(None, ge=0, description="M's top-k (default: --top-k)")
    small_temperature: float | None = Field(
        None, ge=0.0, description="m's temperature (default: --temperature)"
    )
    small_top_p: float | None = Field(None, gt=0.0, le=1.0, description="m's top-p (default: --top-p)")
    small_top_k: int | None = Field(None, ge=0, description="m's top-k (default: --top-k)")
    output: str = Field(description="output directory (created; an existing one is resumed)")
    limit: int | None = Field(None, ge=1, description="first K problems of each benchmark")
    data_dir: str | None = Field(None, description="folder of local benchmark files (offline mirror)")
    max_signal_tokens: int = Field(1024, ge=1, description="cap on M's thinking tokens")
    max_answer_tokens: int = Field(512, ge=1, description="cap on the answer (m's, or M's own)")
    seed: int = Field(0, description="the run's seed (each batch's is derived from it)")
    batch_size: int = Field(8, ge=1, description="samples generated together")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    dtype: str = Field("auto", description="auto, float32, bfloat16, float16")
    large_engine: str = Field("hf", description="M's engine: hf, vllm or remote (`duetlm.engines`)")
    large_url: str | None = Field(None, description="M's OpenAI-compatible server (large_engine remote)")
    small_engine: str = Field("hf", description="m's engine: hf or vllm")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (None: torch's default)")

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: list[str]) -> list[str]:
        names = split_list(value)
        if not names:
            raise ValueError(f"no method given; valid methods: {valid_methods()}")
        # oracle-route is read from small's and duet's samples (the report adds it where both ran).
        names = [m for n in names for m in (("small", "duet") if n == ORACLE_ROUTE else (n,))]
        return list(dict.fromkeys(parse_method(n).name for n in names))

    @field_validator("benchmarks")
    @classmethod
    def _benchmarks(cls, value: list[str]) -> list[str]:
        names = split_list(value)
        if not names:
            raise ValueError("no benchmark given")
        return names

    def method_specs(self) -> list[MethodSpec]:
        return [parse_method(m) for m in self.methods]


def make_config(**options: Any) -> EvalConfig:
    """`EvalConfig` from keyword options, every problem reported on one line (CLI errors are one line)."""
    try:
        return EvalConfig(**options)
    except ValidationError as err:
        # A DuetError raised in a validator (unknown method, bad cap) keeps its own message.
        parts = []
        for e in err.errors():
            field = ".".join(str(p) for p in e["loc"]) or "options"
            cause = e.get("ctx", {}).get("error")
            if isinstance(cause, DuetError):
                parts.append(str(cause))
            elif e["type"] == "missing":
                parts.append(f"--{field.replace('_', '-')} is required")
            else:
                msg = e["msg"].removeprefix("Value error, ")
                parts.append(
                    f"--{field.replace('_', '-')}: {msg[:1].lower() + msg[1:]} (got {e.get('input')!r})"
                )
        raise DuetError("; ".join(parts)) from None


# Options that change what a sample is: a resumed run must keep them.
_RESUME_KEYS = (
    "large",
    "large_engine",
    "small_engine",
    "temperature",
    "top_p",
    "top_k",
    "large_temperature",
    "large_top_p",
    "large_top_k",
    "small_temperature",
    "small_top_p",
    "small_top_k",
    "max_signal_tokens",
    "max_answer_tokens",
    "seed",
)


def _check_resumable(previous: dict[str, Any], cfg: EvalConfig, out_dir: Path) -> None:
    old = previous.get("options", {})
    for key in _RESUME_KEYS:
        if key in old and old[key] != getattr(cfg, key):
            raise DuetError(
                f"{out_dir} holds a run with {key}={old[key]!r}, not {getattr(cfg, key)!r}: "
                f"use another --output, or the same options to resume it"
            )
    if old.get("small") and cfg.small and old["small"] != cfg.small:
        raise DuetError(
            f"{out_dir} holds a run with small={old['small']!r}, not {cfg.small!r}: "
            f"use another --output, or the same options to resume it"
        )


# --------------------------------------------------------------------------------------------------
# Work


def load_benchmark(name: str, limit: int | None, data_dir: str | None) -> list[Problem]:
    """The problems of a benchmark (`problems.load_benchmark`: its errors name what is wrong)."""
    from duetlm.problems import load_benchmark as load

    return load(name, limit=limit, data_dir=data_dir)


@dataclass(frozen=True)
class WorkItem:
    benchmark: str
    problem: Problem
    method: MethodSpec
    sample: int

    @property
    def key(self) -> tuple[str, str, str, int]:
        return (self.benchmark, self.problem.id, self.method.name, self.sample)


def batch_seed(seed: int, item: WorkItem) -> int:
    """A batch's sampling seed, from the run's seed and the batch's first item (stable across runs;
    Python's `hash` is salted per process, so sha256)."""
    text = json.dumps([seed, *item.key])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


def plan(
    benchmarks: dict[str, list[Problem]], methods: list[MethodSpec], samples: int, done: set
) -> list[list[WorkItem]]:
    """The missing items, grouped per (benchmark, method), problem-major then sample."""
    groups = []
    for bench, problems in benchmarks.items():
        for method in methods:
            items = [
                WorkItem(bench, p, method, s)
                for p in problems
                for s in range(samples)
                if (bench, p.id, method.name, s) not in done
            ]
            if items:
                groups.append(items)
    return groups


def count_parameters(engine: Engine) -> int | None:
    """Parameters of an engine's model (None for engines without one in this process, e.g. remote)."""
    model = getattr(engine, "model", None)
    if model is None or not hasattr(model, "parameters"):
        return None
    return sum(p.numel() for p in model.parameters())


def attention_shape(engine: Engine) -> dict[str, int]:
    """{"layers": n_layer, "attn_dim": heads × head dim} of an engine's model, for the compute
    estimate's context term (`report.context_flops`); {} where the engine holds no model config."""
    config = getattr(getattr(engine, "model", None), "config", None) or getattr(engine, "hf_config", None)
    if config is None:
        return {}
    text = config.get_text_config(decoder=True)
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return {"layers": int(text.num_hidden_layers), "attn_dim": int(heads * head_dim)}


def _prompt_len(g: Generation | None) -> int:
    if g is None:
        return 0
    return len(g.prompt_token_ids) or int(getattr(g, "prompt_tokens", 0))


def to_record(
    item: WorkItem, result: DuetResult, correct: float, extracted: str | None, seconds: float, seed: int
) -> SampleRecord:
    return SampleRecord(
        benchmark=item.benchmark,
        problem_id=item.problem.id,
        method=item.method.name,
        sample=item.sample,
        signal=result.signal.text,
        signal_complete=result.signal.complete,
        answer=result.answer,
        extracted=extracted,
        gold=item.problem.answer,
        correct=correct,
        large_tokens=result.large_tokens,
        small_tokens=result.small_tokens,
        think_finish=result.think_finish,
        large_finish=result.large_finish,
        small_finish=result.small_finish,
        seconds=seconds,
        seed=seed,
        large_called=result.large_called,
        confidence=result.confidence,
        large_prompt_tokens=_prompt_len(result.large),
        small_prompt_tokens=_prompt_len(result.small),
    )


def run_batch(pipe: DuetPipeline, items: list[WorkItem], seed: int) -> list[SampleRecord]:
    """Generate and grade one batch of items of the same method."""
    from duetlm.grading import extract_answer, grade_many

    method = items[0].method
    t0 = time.perf_counter()
    # `render_question`: a multiple-choice problem's options are part of what the models read.
    questions = [render_question(it.problem) for it in items]
    results = method.definition.run(pipe, questions, method, seed)
    seconds = (time.perf_counter() - t0) / len(items)
    problems = [it.problem for it in items]
    answers = [r.answer for r in results]
    scores = grade_many(answers, problems)
    return [
        to_record(it, r, score, extract_answer(r.answer, it.problem), seconds, seed)
        for it, r, score in zip(items, results, scores, strict=True)
    ]


def _check_engines(cfg: EvalConfig, methods: list[MethodSpec]) -> None:
    """Engine choices the methods cannot use, refused before anything is loaded."""
    from duetlm.engines import ENGINE_BUILDERS

    for flag, name in (("--large-engine", cfg.large_engine), ("--small-engine", cfg.small_engine)):
        if name not in ENGINE_BUILDERS:
            raise DuetError(f"{flag} {name!r} is not an engine; valid: {', '.join(ENGINE_BUILDERS)}")
    if cfg.small_engine == "remote":
        raise DuetError(
            "--small-engine remote: m's prompt continues an assistant turn; run m with hf or vllm"
        )
    if cfg.large_engine == "remote":
        if not cfg.large_url:
            raise DuetError("--large-engine remote needs --large-url http://host:port")
        forced = [m.name for m in methods if m.kind == "truncation"]
        if forced:
            raise DuetError(
                f"{', '.join(forced)}: budget forcing continues M's assistant turn, which a chat endpoint "
                "cannot do; run M with hf or vllm"
            )


def build_engines(cfg: EvalConfig, need_small: bool) -> tuple[Engine, Engine | None]:
    """M's and m's engines (`duetlm.engines.build_engine`); one engine when both are the same model."""
    from duetlm.config import ModelConfig
    from duetlm.engines import build_engine

    def model(path: str, engine: str, url: str | None) -> ModelConfig:
        return ModelConfig(path=path, dtype=cfg.dtype, device=cfg.device, engine=engine, url=url)

    large = build_engine(model(cfg.large, cfg.large_engine, cfg.large_url), seed=cfg.seed)
    if not need_small:
        return large, None
    assert cfg.small is not None  # run_eval checked
    if cfg.small == cfg.large and cfg.small_engine == cfg.large_engine:
        return large, large
    return large, build_engine(model(cfg.small, cfg.small_engine, None), seed=cfg.seed)


@dataclass
class EvalSummary:
    """What one `run_eval` call did."""

    output: Path
    done_before: int
    generated: int
    wall_s: float
    metrics: list[MethodMetrics]


def check_unique_ids(problems: dict[str, list[Problem]]) -> None:
    """A `DuetError` naming the benchmark and the id when a benchmark holds a problem id twice."""
    for name, ps in problems.items():
        ids = [p.id for p in ps]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise DuetError(f"benchmark {name!r}: problem id {dup!r} appears more than once")


def eval_pipeline(cfg: EvalConfig, large_engine: Engine, small_engine: Engine | None) -> DuetPipeline:
    """The pipeline every method of an evaluation runs on: M thinks for `max_signal_tokens`, the
    answer (m's or M's own) takes `max_answer_tokens`; each model sampled with its own options where
    given (`large_*`, `small_*`), else the shared ones."""

    def own(role: str, cap: int) -> SamplingParams:
        def pick(name: str) -> Any:
            value = getattr(cfg, f"{role}_{name}")
            return getattr(cfg, name) if value is None else value

        return SamplingParams(
            temperature=pick("temperature"), top_p=pick("top_p"), top_k=pick("top_k"), max_new_tokens=cap
        )

    return DuetPipeline(
        large_engine,
        small_engine or large_engine,  # never used by methods that do not need m
        large_sampling=own("large", cfg.max_signal_tokens),
        small_sampling=own("small", cfg.max_answer_tokens),
    )


def run_eval(
    cfg: EvalConfig,
    *,
    large_engine: Engine | None = None,
    small_engine: Engine | None = None,
    problems: dict[str, list[Problem]] | None = None,
    progress: bool = True,
    command: str | None = None,
) -> EvalSummary:
    """Run (or resume) an evaluation and write its records, `run.json` and report into `cfg.output`.

    `large_engine` / `small_engine`: engines already in memory (the trainer's models); otherwise they
    are loaded from `cfg.large` / `cfg.small`. `problems`: benchmark name -> problems, for tasks that do
    not come from `load_problems` (the lab); otherwise each of `cfg.benchmarks` is loaded.
    Everything the user can get wrong is checked before any model is loaded.
    """
    methods = cfg.method_specs()
    need_small = any(m.definition.uses_small for m in methods)
    if need_small and cfg.small is None and small_engine is None:
        users = ", ".join(m.name for m in methods if m.definition.uses_small)
        raise DuetError(f"--small is required by the method(s) {users}")
    if large_engine is None:
        _check_engines(cfg, methods)
    if problems is None:
        problems = {name: load_benchmark(name, cfg.limit, cfg.data_dir) for name in cfg.benchmarks}
    check_unique_ids(problems)

    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise DuetError(f"--output {out} exists and is not a directory")
    with DirLock(out, "duetlm eval"):  # two evaluations of one directory would interleave records
        return _run_locked(
            cfg, out, methods, problems, need_small, large_engine, small_engine, progress, command
        )


def _run_locked(
    cfg: EvalConfig,
    out: Path,
    methods: list[Any],
    problems: dict[str, list[Problem]],
    need_small: bool,
    large_engine: Engine | None,
    small_engine: Engine | None,
    progress: bool,
    command: str | None,
) -> EvalSummary:
    """`run_eval` once it holds the output directory's lock."""
    previous = read_run(out)
    _check_resumable(previous, cfg, out)
    records_path = out / RECORDS_FILE
    done = {r.key for r in read_records(records_path, repair=True)}
    work = plan(problems, methods, cfg.samples, done)
    total = sum(len(g) for g in work)

    models = dict(previous.get("models", {}))
    if total and cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    if total:
        if large_engine is None:
            large_engine, loaded_small = build_engines(cfg, need_small and small_engine is None)
            small_engine = small_engine or loaded_small
        models["large"] = {
            "spec": cfg.large,
            "params": count_parameters(large_engine),
            **attention_shape(large_engine),
        }
        if small_engine is not None:
            models["small"] = {
                "spec": cfg.small,
                "params": count_parameters(small_engine),
                **attention_shape(small_engine),
            }

    run_info = _run_info(cfg, previous, models, command, len(done))
    _write_run(out, run_info)

    t_start = time.perf_counter()
    counter = [0]  # samples written, readable after an interruption
    try:
        if total:
            assert large_engine is not None
            generate(
                eval_pipeline(cfg, large_engine, small_engine), work, records_path, cfg, progress, counter
            )
    finally:
        run_info["invocations"][-1].update(
            generated=counter[0], wall_s=time.perf_counter() - t_start, finished=_now()
        )
        _write_run(out, run_info)
    metrics = write_report(out)
    return EvalSummary(out, len(done), counter[0], time.perf_counter() - t_start, metrics)


def generate(
    pipe: DuetPipeline,
    work: list[list[WorkItem]],
    records_path: Path,
    cfg: EvalConfig,
    progress: bool,
    counter: list[int],
) -> None:
    """Answer, grade and append every work item, batch by batch, under a progress bar (rate, ETA)."""
    from tqdm import tqdm

    total = sum(len(g) for g in work)
    with (
        tqdm(total=total, unit="sample", disable=not progress, file=sys.stderr, dynamic_ncols=True) as bar,
        records_path.open("a", encoding="utf-8") as f,
    ):
        for group in work:
            bar.set_description(f"{group[0].benchmark} {group[0].method.name}")
            for lo in range(0, len(group), cfg.batch_size):
                batch = group[lo : lo + cfg.batch_size]
                for rec in run_batch(pipe, batch, batch_seed(cfg.seed, batch[0])):
                    f.write(json.dumps(asdict(rec), ensure_ascii=False) + "\n")
                # Why flush and fsync per batch: a kill loses at most the batch in flight.
                f.flush()
                os.fsync(f.fileno())
                counter[0] += len(batch)
                bar.update(len(batch))


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for pkg in ("duetlm", "torch", "transformers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _run_info(
    cfg: EvalConfig, previous: dict[str, Any], models: dict[str, Any], command: str | None, done: int
) -> dict[str, Any]:
    options = cfg.model_dump()
    old = previous.get("options", {})
    # A resumed run may add benchmarks and methods: the union is what the records hold.
    options["benchmarks"] = list(dict.fromkeys([*old.get("benchmarks", []), *cfg.benchmarks]))
    options["methods"] = list(dict.fromkeys([*old.get("methods", []), *cfg.methods]))
    options["small"] = cfg.small or old.get("small")
    command = command or shlex.join(["duetlm", *sys.argv[1:]])
    invocations = list(previous.get("invocations", []))
    invocations.append({"command": command, "started": _now(), "records_before": done})
    return {
        "options": options,
        "seed": cfg.seed,
        "models": models,
        "command": command,
        "versions": _versions(),
        "invocations": invocations,
    }


def _write_run(out: Path, info: dict[str, Any]) -> None:
    tmp = out / (RUN_FILE + ".tmp")
    tmp.write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, out / RUN_FILE)  # atomic: a kill never leaves half a run.json
