"""What a lab task family lets DUET show, measured on the warm-started pair (no RL): per chain length k,
how well m does alone (reasoning itself within its answer cap), with only the signal it cannot produce
itself (`task.minimal_signal`), and with the whole necessary trace; how well the original M does and
how long it thinks. `duetlm lab properties --task mix` prints the table and writes `properties.json`.

Everything runs through the project's pipeline (`DuetPipeline`: `small_only`, `answer`, `original`),
greedy, with the demo's caps: M thinks for `eval.max_signal_tokens`, the answer (m's or M's own) gets
`eval.max_answer_tokens`, which for the `mix` family is m's budget `task.small_cap`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from duetlm.lab.demo import DemoConfig, build_data, engines_for, warm_start
from duetlm.lab.task import Chain, TaskSpec, minimal_signal, parse_question, small_steps


@dataclass
class LengthRow:
    """The measurements on the test problems of one chain length k (k = 0: all lengths together)."""

    k: int
    problems: int
    minimal_words: float  # the shortest sufficient signal (`minimal_signal`), words
    necessary_words: float  # the whole necessary trace (what a single model must write), words
    large_think_tokens: float  # the original M's greedy thinking, tokens (its verbosity)
    large_accuracy: float  # the original M: thinks, then answers itself
    small_alone: float  # m alone, reasoning itself within its cap
    small_minimal: float  # m given only what it cannot produce itself
    small_full: float  # m given the whole necessary trace


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def measure(
    cfg: DemoConfig, cache_root: Path, say: Callable[[str], None] = print
) -> tuple[list[LengthRow], dict[str, Any]]:
    """Warm-start the pair (or load it from the cache), then measure every row on the test problems."""
    from duetlm.engines.base import SamplingParams
    from duetlm.grading import grade
    from duetlm.pipeline import DuetPipeline

    spec = cfg.task.spec()
    data = build_data(cfg)
    ws = warm_start(cfg, data, cache_root, say)
    large, small = engines_for(cfg, ws)
    pipe = DuetPipeline(
        large,
        small,
        large_sampling=SamplingParams(temperature=0.0, max_new_tokens=cfg.eval.max_signal_tokens),
        small_sampling=SamplingParams(temperature=0.0, max_new_tokens=cfg.eval.max_answer_tokens),
    )
    problems = data.test
    chains: list[Chain] = [parse_question(p.question, spec.modulus) for p in problems]
    questions = [p.question for p in problems]
    t0 = time.perf_counter()

    def graded(answers: list[str]) -> list[float]:
        return [grade(a, p) for a, p in zip(answers, problems, strict=True)]

    alone = graded([r.answer for r in pipe.small_only(questions)])
    minimal = [minimal_signal(c, spec) for c in chains]
    given_minimal = graded([gs[0].text.strip() for gs in pipe.answer(questions, minimal)])
    given_full = graded(
        [gs[0].text.strip() for gs in pipe.answer(questions, [c.necessary_trace() for c in chains])]
    )
    original = pipe.original(questions)
    large_acc = graded([r.answer for r in original])
    think = [float(len(r.signal.text.split())) for r in original]
    seconds = time.perf_counter() - t0

    def row(k: int, idx: list[int]) -> LengthRow:
        pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
        return LengthRow(
            k=k,
            problems=len(idx),
            minimal_words=_mean([float(len(minimal[i].split())) for i in idx]),
            necessary_words=_mean([float(len(chains[i].necessary_trace().split())) for i in idx]),
            large_think_tokens=_mean(pick(think)),
            large_accuracy=_mean(pick(large_acc)),
            small_alone=_mean(pick(alone)),
            small_minimal=_mean(pick(given_minimal)),
            small_full=_mean(pick(given_full)),
        )

    rows = [row(k, [i for i, c in enumerate(chains) if c.steps == k]) for k in spec.lengths]
    rows = [r for r in rows if r.problems] + [row(0, list(range(len(chains))))]
    info = {
        "task": cfg.task.model_dump(),
        "small_steps": small_steps(spec),
        "caps": {"think": cfg.eval.max_signal_tokens, "answer": cfg.eval.max_answer_tokens},
        "warm_start": ws.info,
        "measure_s": seconds,
    }
    return rows, info


def render(rows: list[LengthRow], spec: TaskSpec) -> Any:
    """The per-length table (rich)."""
    from rich.table import Table

    table = Table(
        title=f"lab task properties: warm-started pair, greedy (m writes {small_steps(spec)} steps itself)"
    )
    cols = ("k", "problems", "minimal z (words)", "necessary (words)", "M thinks (words)", "M alone",
            "m alone", "m + minimal z", "m + full trace")  # fmt: skip
    for c in cols:
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(
            "all" if r.k == 0 else str(r.k),
            str(r.problems),
            f"{r.minimal_words:.1f}",
            f"{r.necessary_words:.1f}",
            f"{r.large_think_tokens:.1f}",
            f"{r.large_accuracy:.3f}",
            f"{r.small_alone:.3f}",
            f"{r.small_minimal:.3f}",
            f"{r.small_full:.3f}",
        )
    return table


def write(out: Path, rows: list[LengthRow], info: dict[str, Any], command: str | None = None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "properties.json"
    path.write_text(
        json.dumps({"command": command, **info, "rows": [asdict(r) for r in rows]}, indent=2) + "\n"
    )
    return path
