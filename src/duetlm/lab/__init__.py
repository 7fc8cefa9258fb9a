"""The lab: a procedural reasoning task, its tokenizer, tiny-model recipes, the supervised warm start,
and the `duetlm demo` orchestration. Everything else (protocol, pipeline, grader, trainer) is the
project's own: the lab only supplies the task, the tokenizer and the warm start.

`load_problems(task, split, limit)` is the trainer's `data.source: lab:<task>` hook. Task names:
`chain` (6 steps) or `chain<N>` (N steps), optionally suffixed `-merged` / `-split` (the writing style,
see `duetlm.lab.task`); `mix` (mixed difficulty, chain lengths 2..6, m's answer cap 10 tokens). Splits: `train` (10,000 problems unless `limit`), `validation` (200), `test`
(500); the three never share a question.
"""

from __future__ import annotations

import re

from duetlm.errors import DataError
from duetlm.lab.task import MIX_TASK, TaskSpec, chains, problems
from duetlm.problems import Problem

__all__ = ["SPLIT_SEEDS", "load_problems", "task_spec"]

# Fixed seeds per split, so every run and every seed of the demo scores the same test problems.
SPLIT_SEEDS = {"test": 7_000_001, "validation": 7_000_002, "train": 7_000_003}
SPLIT_SIZES = {"test": 500, "validation": 200, "train": 10_000}
_TASK = re.compile(r"^chain(\d+)?(?:-(merged|split))?$")


def task_spec(name: str) -> TaskSpec:
    """`chain`, `chain8`, `chain6-merged`, `mix`, ... -> TaskSpec."""
    if name == "mix":
        return TaskSpec(**MIX_TASK)  # type: ignore[arg-type]
    m = _TASK.match(name)
    if m is None:
        raise DataError(f"unknown lab task {name!r}; use chain, chain<N>, chain<N>-merged|-split or mix")
    kwargs: dict[str, object] = {}
    if m.group(1):
        kwargs["steps"] = int(m.group(1))
    if m.group(2):
        kwargs["style"] = m.group(2)
    try:
        return TaskSpec(**kwargs)  # type: ignore[arg-type]
    except ValueError as err:
        raise DataError(f"lab task {name!r}: {err}") from None


def load_problems(task: str, split: str | None = None, limit: int | None = None) -> list[Problem]:
    """Problems of a lab task's split (`train` by default), as `duetlm.problems.Problem`s."""
    spec = task_spec(task)
    split = split or "train"
    if split not in SPLIT_SEEDS:
        raise DataError(f"lab task {task!r} has no split {split!r}; use {', '.join(SPLIT_SEEDS)}")
    exclude: frozenset[str] = frozenset()
    if split != "test":
        held = chains(spec, SPLIT_SIZES["test"], SPLIT_SEEDS["test"])
        if split == "train":
            held += chains(spec, SPLIT_SIZES["validation"], SPLIT_SEEDS["validation"])
        exclude = frozenset(c.question() for c in held)
    count = limit if limit is not None else SPLIT_SIZES[split]
    return problems(spec, count, SPLIT_SEEDS[split], exclude)
