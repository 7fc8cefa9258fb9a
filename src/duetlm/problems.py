"""Problems: the x of the paper. `Problem` is the one record every stage passes around.

`load_problems(source, split=None, limit=None, ...)` reads problems from
  - a registered name (`REGISTRY`): training sets `deepscaler`, `dapo17k`, `math-lighteval`, `limo`,
    `gsm8k`; benchmarks `math500`, `aime24`, `aime25`, `amc23`, `gpqa-diamond`, `champ`;
  - a Hugging Face dataset id (`owner/name`), read with `datasets.load_dataset`;
  - a local `.jsonl`, `.json` (a list of objects), `.parquet` or `.csv` file.
Hub ids and files take column options (`question_field`, `answer_field`, ...); by default the first
present of the usual names (`question`/`problem`, `answer`, `id`) is used.

Offline mirror: with `data_dir=` (or `DUETLM_DATA_DIR`) set, a registered name is read from the file
named in its registry entry in that folder (e.g. `math500.jsonl`, `gsm8k_test.jsonl`) before the hub
is tried. Mirror files may be in the hub's own format or in the plain one (`id`, `problem`, `answer`).

Bad rows (a missing or empty question or answer, a value of the wrong type, a duplicate id, a line
that is not JSON) raise `DataError` naming the file, the line or row, and the field; with
`on_error="skip"` they are skipped and counted in one `SkippedRowsWarning`. Nothing is dropped silently.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import random
import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from duetlm.boxes import last_boxed
from duetlm.errors import DataError

Kind = Literal["math", "choice"]
OnError = Literal["raise", "skip"]

logger = logging.getLogger(__name__)

DATA_DIR_ENV = "DUETLM_DATA_DIR"
FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class Problem:
    """One problem x with its gold answer.

    `kind="math"`: `answer` is a LaTeX / plain expression graded by math-verify.
    `kind="choice"`: `answer` is a letter ("A".."Z") and `choices` holds the option texts in order.
    """

    id: str
    question: str
    answer: str
    kind: Kind = "math"
    choices: tuple[str, ...] = field(default_factory=tuple)
    source: str = ""


def render_question(problem: Problem) -> str:
    """The question as a model should read it: for `kind="choice"`, the options follow as `A) ...`."""
    if problem.kind != "choice" or not problem.choices:
        return problem.question
    options = "\n".join(f"{letter}) {text}" for letter, text in zip(LETTERS, problem.choices, strict=False))
    return f"{problem.question}\n\n{options}"


class SkippedRowsWarning(UserWarning):
    """Rows were skipped under `on_error="skip"`; the message counts them by reason."""


# --------------------------------------------------------------------------------------------------
# Row -> Problem
# --------------------------------------------------------------------------------------------------


class _RowError(Exception):
    """One bad row; `_Reader` adds the file and line/row, then raises `DataError` or skips."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"field {field!r}: {reason}")
        self.field = field
        self.reason = reason


def _get(row: dict[str, Any], path: str) -> Any:
    """`row["a"]["b"]` for `path="a.b"` (DAPO keeps its answer in `reward_model.ground_truth`)."""
    value: Any = row
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def _pick(row: dict[str, Any], names: tuple[str, ...]) -> tuple[str, Any]:
    """The first of `names` present (not None) in `row`, with its value; else (names[0], None)."""
    for name in names:
        value = _get(row, name)
        if value is not None:
            return name, value
    return names[0], None


def _text(name: str, value: Any, what: str) -> str:
    if value is None:
        raise _RowError(name, f"missing {what}")
    if not isinstance(value, str):
        raise _RowError(name, f"{what} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise _RowError(name, f"empty {what}")
    return value.strip()


def _answer_text(name: str, value: Any) -> str:
    """Gold answers may be strings or numbers (MathArena stores ints, AMC23 floats such as 27.0)."""
    if isinstance(value, bool):
        raise _RowError(name, "answer must be a string or a number, got bool")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _RowError(name, f"answer is {value}")
        return str(int(value)) if value.is_integer() else repr(value)
    return _text(name, value, "answer")


_INTEGER_LIKE = re.compile(r"[-+]?\d+(?:\.0*)?")


def _canonical_number(answer: str) -> str:
    """`27.0` -> `27`, `025` -> `25`; anything that is not an integer written oddly is left alone."""
    if _INTEGER_LIKE.fullmatch(answer):
        return str(int(answer.split(".")[0]))  # not via float: 20-digit answers stay exact
    return answer


def _gsm8k_answer(answer: str) -> str:
    """GSM8K's answer field is a worked solution ending in `#### 1,234`: keep `1234`."""
    final = answer.rsplit("####", 1)[-1].strip()
    return final.replace(",", "")


def _boxed_answer(solution: str) -> str | None:
    return last_boxed(solution)


AnswerFormat = Literal["plain", "number", "gsm8k"]
_ANSWER_FORMATS: dict[str, Callable[[str], str]] = {
    "plain": lambda a: a,
    "number": _canonical_number,
    "gsm8k": _gsm8k_answer,
}


@dataclass(frozen=True)
class Columns:
    """Where a row keeps its fields. Each is a list of candidates: the first present one is used.

    `solution`: when no answer column is present, the answer is the last `\\boxed{}` of this column.
    `choices`: a column holding the list of option texts (then `answer` must be a letter or one of
    the option texts).
    """

    question: tuple[str, ...] = ("question", "problem", "Question", "prompt")
    answer: tuple[str, ...] = ("answer", "final_answer", "Answer")
    id: tuple[str, ...] = ("id", "unique_id", "ID")
    solution: tuple[str, ...] = ("solution",)
    choices: str | None = None
    answer_format: AnswerFormat = "plain"


RowAdapter = Callable[[dict[str, Any]], dict[str, Any]]


def _to_problem(
    row: Any, index: int, columns: Columns, source: str, adapter: RowAdapter | None, id_prefix: str
) -> Problem:
    if not isinstance(row, dict):
        raise _RowError("<row>", f"expected an object, got {type(row).__name__}")
    if adapter is not None:
        row = adapter(row)
    q_name, q_value = _pick(row, columns.question)
    question = _text(q_name, q_value, "question")

    a_name, a_value = _pick(row, columns.answer)
    if a_value is None or (isinstance(a_value, str) and not a_value.strip()):
        s_name, solution = _pick(row, columns.solution) if columns.solution else ("", None)
        if isinstance(solution, str) and solution.strip():
            boxed = _boxed_answer(solution)
            if boxed is None:
                raise _RowError(s_name, "no answer column and no \\boxed{} answer in the solution")
            a_name, a_value = s_name, boxed
    answer = _ANSWER_FORMATS[columns.answer_format](_answer_text(a_name, a_value))
    if not answer:
        raise _RowError(a_name, "empty answer")

    i_name, i_value = _pick(row, columns.id)
    if i_value is None:
        pid = f"{id_prefix}-{index}"
    elif isinstance(i_value, bool) or not isinstance(i_value, (str, int)):
        raise _RowError(i_name, f"id must be a string or an integer, got {type(i_value).__name__}")
    elif isinstance(i_value, int):
        pid = f"{id_prefix}-{i_value}"  # bare numbers (MathArena, AMC23) are ambiguous across sets
    else:
        pid = _text(i_name, i_value, "id")

    kind: Kind = "math"
    choices: tuple[str, ...] = ()
    if columns.choices is not None:
        raw = _get(row, columns.choices)
        if not isinstance(raw, (list, tuple)) or not raw:
            raise _RowError(columns.choices, "choices must be a non-empty list of strings")
        choices = tuple(_text(columns.choices, c, "choice") for c in raw)
        kind = "choice"
        answer = _choice_letter(a_name, answer, choices)
    return Problem(id=pid, question=question, answer=answer, kind=kind, choices=choices, source=source)


def _choice_letter(name: str, answer: str, choices: tuple[str, ...]) -> str:
    letters = LETTERS[: len(choices)]
    if answer.upper() in letters and len(answer) == 1:
        return answer.upper()
    for letter, text in zip(letters, choices, strict=False):
        if text == answer:
            return letter
    raise _RowError(
        name, f"answer {answer[:40]!r} is neither a letter {letters[0]}-{letters[-1]} nor an option"
    )


# --------------------------------------------------------------------------------------------------
# Registered sources
# --------------------------------------------------------------------------------------------------

_DAPO_PREFIX = re.compile(r"^\s*Solve the following math problem step by step\..*?\n\n", re.DOTALL)
_DAPO_SUFFIX = re.compile(r"\n\nRemember to put your answer on its own line after \"Answer:\"\.?\s*$")


def _dapo_row(row: dict[str, Any]) -> dict[str, Any]:
    """DAPO-Math-17k: the question is wrapped in a chat message with an answer-format instruction."""
    prompt = row.get("prompt")
    if isinstance(prompt, list):
        user = [m.get("content") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        if not user or not isinstance(user[0], str):
            raise _RowError("prompt", "no user message with text content")
        question = _DAPO_SUFFIX.sub("", _DAPO_PREFIX.sub("", user[0]))
        row = {**row, "question": question}
    return row


def _gpqa_row(row: dict[str, Any]) -> dict[str, Any]:
    """GPQA: one correct and three incorrect answers; shuffled by a RNG seeded with the item's id.

    The seed is the record id, so an item's letter is the same on every machine and in every run,
    whatever the order or subset of items loaded.
    """
    if "Correct Answer" not in row:
        return row  # already in the plain format (question, choices, answer letter)
    record = row.get("Record ID")
    if not isinstance(record, str) or not record.strip():
        raise _RowError("Record ID", "missing record id (it seeds the option shuffle)")
    options = [("Correct Answer", row.get("Correct Answer"))]
    options += [(f"Incorrect Answer {k}", row.get(f"Incorrect Answer {k}")) for k in (1, 2, 3)]
    texts = [_text(name, value, "option") for name, value in options]
    order = list(range(len(texts)))
    random.Random(f"duetlm-gpqa:{record.strip()}").shuffle(order)
    choices = [texts[i] for i in order]
    return {
        "id": record.strip(),
        "question": row.get("Question"),
        "answer": LETTERS[order.index(0)],
        "choices": choices,
    }


@dataclass(frozen=True)
class Registered:
    """A named source: where it lives on the hub, its offline file names, and how its rows read.

    `splits` maps our split names to the hub's (AIME24 on the hub has only "train"); the first is the
    default. `mirror` holds file stems looked up in the data dir, `{split}` filled in; any suffix of
    `FILE_SUFFIXES` matches.
    """

    name: str
    hub_id: str
    columns: Columns
    mirror: tuple[str, ...]
    splits: dict[str, str] = field(default_factory=lambda: {"test": "test"})
    hub_config: str | None = None
    adapter: RowAdapter | None = None
    gated: bool = False
    # DAPO-Math-17k's release repeats each problem ~100 times under fresh UUIDs: rows with the same
    # question and answer as an earlier row are dropped, and counted in a log line.
    collapse_repeats: bool = False
    loader: Callable[[], Iterable[dict[str, Any]]] | None = None  # a local package instead of the hub
    description: str = ""

    @property
    def default_split(self) -> str:
        return next(iter(self.splits))


def _champ_rows() -> Iterator[dict[str, Any]]:
    import champ_dataset

    dataset = champ_dataset.load("v0")
    for key, problem in dataset.problems.items():
        yield {"id": key, "question": problem.text, "answer": problem.answer}


_NO_SOLUTION = ()  # benchmarks carry a clean answer column; never fall back to a solution's box
REGISTRY: dict[str, Registered] = {
    r.name: r
    for r in (
        Registered(
            "deepscaler",
            hub_id="agentica-org/DeepScaleR-Preview-Dataset",
            columns=Columns(question=("problem",), answer=("answer",)),
            mirror=("deepscaler",),
            splits={"train": "train"},
            description="DeepScaleR-Preview, 40k competition problems (training)",
        ),
        Registered(
            "dapo17k",
            hub_id="BytedTsinghua-SIA/DAPO-Math-17k",
            columns=Columns(
                question=("question", "problem"),
                answer=("reward_model.ground_truth", "answer"),
                id=("extra_info.index", "id"),
                solution=_NO_SOLUTION,
            ),
            mirror=("dapo17k", "dapo-math-17k"),
            splits={"train": "train"},
            adapter=_dapo_row,
            collapse_repeats=True,
            description="DAPO-Math-17k, integer answers (training)",
        ),
        Registered(
            "math-lighteval",
            hub_id="DigitalLearningGmbH/MATH-lighteval",
            hub_config="default",
            columns=Columns(question=("problem",), answer=("answer",), solution=("solution",)),
            mirror=("math-lighteval_{split}", "math_lighteval_{split}"),
            splits={"train": "train", "test": "test"},
            description="MATH (Hendrycks et al.), answer = last \\boxed{} of the solution (training)",
        ),
        Registered(
            "limo",
            hub_id="GAIR/LIMO",
            columns=Columns(question=("question",), answer=("answer",), solution=_NO_SOLUTION),
            mirror=("limo",),
            splits={"train": "train"},
            description="LIMO, 817 problems (training)",
        ),
        Registered(
            "gsm8k",
            hub_id="openai/gsm8k",
            hub_config="main",
            columns=Columns(
                question=("question", "problem"),
                answer=("answer",),
                solution=_NO_SOLUTION,
                answer_format="gsm8k",
            ),
            mirror=("gsm8k_{split}",),
            splits={"train": "train", "test": "test"},
            description="GSM8K, answer after #### (training; its test split for evaluation)",
        ),
        Registered(
            "math500",
            hub_id="HuggingFaceH4/MATH-500",
            columns=Columns(
                question=("problem",), answer=("answer",), id=("id", "unique_id"), solution=_NO_SOLUTION
            ),
            mirror=("math500",),
            description="MATH-500 (the PRM800K test split)",
        ),
        Registered(
            "aime24",
            hub_id="HuggingFaceH4/aime_2024",
            columns=Columns(
                question=("problem",), answer=("answer",), solution=_NO_SOLUTION, answer_format="number"
            ),
            mirror=("aime24",),
            splits={"test": "train"},
            description="AIME 2024 I and II, 30 problems",
        ),
        Registered(
            "aime25",
            hub_id="MathArena/aime_2025",
            columns=Columns(
                question=("problem",),
                answer=("answer",),
                id=("id", "problem_idx"),
                solution=_NO_SOLUTION,
                answer_format="number",
            ),
            mirror=("aime25",),
            splits={"test": "train"},
            description="AIME 2025 I and II, 30 problems",
        ),
        Registered(
            "amc23",
            hub_id="math-ai/amc23",
            columns=Columns(
                question=("problem", "question"),
                answer=("answer",),
                solution=_NO_SOLUTION,
                answer_format="number",
            ),
            mirror=("amc23",),
            description="AMC 12 2023, 40 problems",
        ),
        Registered(
            "gpqa-diamond",
            hub_id="Idavidrein/gpqa",
            hub_config="gpqa_diamond",
            columns=Columns(
                question=("question",), answer=("answer",), solution=_NO_SOLUTION, choices="choices"
            ),
            mirror=("gpqa_diamond", "gpqa-diamond"),
            splits={"test": "train"},
            adapter=_gpqa_row,
            gated=True,
            description="GPQA Diamond, 198 four-option questions (gated on the hub)",
        ),
        Registered(
            "champ",
            hub_id="",
            columns=Columns(question=("question",), answer=("answer",), solution=_NO_SOLUTION),
            mirror=(),
            loader=_champ_rows,
            description="CHAMP, 270 competition problems (PyPI champ-dataset, offline; free-text answers)",
        ),
    )
}


# --------------------------------------------------------------------------------------------------
# Reading rows
# --------------------------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> Iterator[tuple[str, Any | _RowError]]:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield f"line {number}", json.loads(line)
            except json.JSONDecodeError as err:
                yield f"line {number}", _RowError("<line>", f"not valid JSON ({err.msg})")


def _read_json(path: Path) -> Iterator[tuple[str, Any | _RowError]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON (line {err.lineno}: {err.msg})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
    for i, row in enumerate(data):
        yield f"row {i}", row


def _read_parquet(path: Path) -> Iterator[tuple[str, Any | _RowError]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a file that is not parquet
        raise DataError(f"{path}: not a readable parquet file ({err})") from None
    i = 0
    for batch in parquet.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            yield f"row {i}", row
            i += 1


def _read_csv(path: Path) -> Iterator[tuple[str, Any | _RowError]]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        for row in reader:
            # Empty cells are missing values, as in a dataframe; the line is where the row ends.
            yield f"line {reader.line_num}", {k: (v if v != "" else None) for k, v in row.items()}


_FILE_READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet, ".csv": _read_csv}


@dataclass
class _Collector:
    """Turns located rows into problems; raises or skips bad rows; enforces unique ids and `limit`."""

    where: str  # "path/to/file.jsonl" or "hub dataset X (split test)"
    source: str
    columns: Columns
    adapter: RowAdapter | None
    on_error: OnError
    limit: int | None
    collapse_repeats: bool = False
    id_prefix: str = ""  # for rows without a string id: "<id_prefix>-<row index or number id>"
    problems: list[Problem] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)
    first_skip: str = ""
    repeats: int = 0
    _ids: set[str] = field(default_factory=set)
    _contents: set[tuple[str, str]] = field(default_factory=set)

    def full(self) -> bool:
        return self.limit is not None and len(self.problems) >= self.limit

    def add(self, index: int, location: str, row: Any) -> None:
        try:
            if isinstance(row, _RowError):
                raise row
            prefix = self.id_prefix or self.source
            problem = _to_problem(row, index, self.columns, self.source, self.adapter, prefix)
            if self.collapse_repeats:
                content = (problem.question, problem.answer)
                if content in self._contents:
                    self.repeats += 1
                    return
                self._contents.add(content)
            if problem.id in self._ids:
                raise _RowError("id", f"duplicate id {problem.id!r}")
        except _RowError as err:
            message = f"{self.where}, {location}: {err}"
            if self.on_error == "raise":
                hint = "" if err.field == "id" else " (on_error='skip' skips such rows with a warning)"
                raise DataError(message + hint) from None
            self.skipped[err.reason.split(" (")[0][:60]] += 1
            self.first_skip = self.first_skip or message
            return
        self._ids.add(problem.id)
        self.problems.append(problem)

    def finish(self) -> list[Problem]:
        if self.repeats:
            logger.warning(
                "%s: %d rows repeating an earlier question and answer dropped", self.where, self.repeats
            )
        if self.skipped:
            total = sum(self.skipped.values())
            reasons = ", ".join(f"{n} x {reason}" for reason, n in self.skipped.most_common())
            warnings.warn(
                f"{self.where}: skipped {total} bad row(s) ({reasons}); first: {self.first_skip}",
                SkippedRowsWarning,
                stacklevel=3,
            )
        return self.problems


def _collect(rows: Iterable[tuple[str, Any]], collector: _Collector) -> list[Problem]:
    for index, (location, row) in enumerate(rows):
        if collector.full():
            break
        collector.add(index, location, row)
    return collector.finish()


# --------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------


def _hub_rows(
    hub_id: str, config: str | None, split: str | None, *, gated: bool = False, mirror_hint: str = ""
) -> tuple[str, Iterator[tuple[str, Any]]]:
    """Rows of a hub dataset, read with `datasets.load_dataset`; errors say what to do."""
    if gated:
        from huggingface_hub import get_token

        if get_token() is None:
            raise DataError(
                f"{hub_id} is gated on the Hugging Face Hub and no token is set: accept its terms at "
                f"https://huggingface.co/datasets/{hub_id}, then set HF_TOKEN=<your token> (or run "
                f"`hf auth login`){mirror_hint}"
            )
    import datasets

    try:
        loaded = datasets.load_dataset(hub_id, config, split=split)
    except Exception as err:  # the boundary with the hub and the network: many error types
        text = f"{type(err).__name__}: {err}"
        if "gated" in text.lower() or "401" in text or "403" in text:
            reason = "it is gated and the token has no access (accept its terms on the dataset's page)"
        elif "OfflineModeIsEnabled" in text:
            reason = "HF_HUB_OFFLINE (or HF_DATASETS_OFFLINE) is set and no cached copy exists"
        elif isinstance(err, (ConnectionError, OSError)) or "offline" in text.lower():
            reason = "the Hugging Face Hub is unreachable"
        else:
            reason = "loading failed"
        raise DataError(
            f"could not load hub dataset {hub_id!r}: {reason} ({text[:300]}){mirror_hint}"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        if len(loaded) != 1:
            raise DataError(f"hub dataset {hub_id!r} has splits {', '.join(loaded)}: choose one with split=")
        split, loaded = next(iter(loaded.items()))
    where = f"hub dataset {hub_id}" + (f" ({config})" if config else "") + f", split {split}"
    return where, ((f"row {i}", row) for i, row in enumerate(loaded))


def _file_rows(path: Path) -> Iterator[tuple[str, Any]]:
    reader = _FILE_READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unsupported file type (use {', '.join(FILE_SUFFIXES)})")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    return reader(path)


def _find_mirror(spec: Registered, split: str, data_dir: Path) -> Path | None:
    for stem in spec.mirror:
        for suffix in FILE_SUFFIXES:
            candidate = data_dir / (stem.format(split=split) + suffix)
            if candidate.is_file():
                return candidate
    return None


def _mirror_names(spec: Registered, split: str) -> str:
    return " or ".join(f"{stem.format(split=split)}.jsonl" for stem in spec.mirror)


def _load_registered(
    spec: Registered, split: str | None, limit: int | None, data_dir: Path | None, on_error: OnError
) -> list[Problem]:
    split = split or spec.default_split
    if split not in spec.splits:
        raise DataError(f"{spec.name} has no split {split!r}; choose one of: {', '.join(spec.splits)}")

    # GSM8K's train and test rows both count from 0: the split keeps their ids apart.
    prefix = f"{spec.name}-{split}" if len(spec.splits) > 1 else spec.name

    def collector(where: str) -> _Collector:
        return _Collector(
            where, spec.name, spec.columns, spec.adapter, on_error, limit, spec.collapse_repeats, prefix
        )

    if spec.loader is not None:
        return _collect(((f"row {i}", row) for i, row in enumerate(spec.loader())), collector(spec.name))
    if data_dir is not None:
        path = _find_mirror(spec, split, data_dir)
        if path is not None:
            return _collect(_file_rows(path), collector(str(path)))
        logger.info("%s: no %s in %s; trying the hub", spec.name, _mirror_names(spec, split), data_dir)
    looked = f" (looked for {_mirror_names(spec, split)} in {data_dir})" if data_dir else ""
    hint = (
        f"; to work offline, set {DATA_DIR_ENV} (or --data-dir) to a folder holding "
        f"{_mirror_names(spec, split)}{looked}"
    )
    where, rows = _hub_rows(
        spec.hub_id, spec.hub_config, spec.splits[split], gated=spec.gated, mirror_hint=hint
    )
    return _collect(rows, collector(where))


def benchmark_split(name: str) -> tuple[str, str | None]:
    """`NAME@SPLIT` -> (NAME, SPLIT). Without `@`, a registered name with a test split gets it (an
    evaluation reads held-out problems: `gsm8k` defaults to train as a training set), others their
    loader's default (None)."""
    source, sep, split = name.rpartition("@")
    if sep and source and split:
        return source, split
    spec = REGISTRY.get(name)
    if spec is not None and "test" in spec.splits:
        return name, "test"
    return name, None


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def load_problems(
    source: str | os.PathLike[str],
    split: str | None = None,
    limit: int | None = None,
    *,
    question_field: str | None = None,
    answer_field: str | None = None,
    id_field: str | None = None,
    solution_field: str | None = None,
    choices_field: str | None = None,
    answer_format: AnswerFormat = "plain",
    config: str | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    on_error: OnError = "raise",
) -> list[Problem]:
    """Load problems from a registered name, a hub dataset id, or a local file (see module docstring).

    `split`: registered names default to their usual split (`REGISTRY[name].default_split`); a hub id
    with several splits needs one. `limit`: the first `limit` good problems. Column options apply to
    hub ids and files: `question_field`, `answer_field`, `id_field` (dotted paths reach into nested
    objects: `reward_model.ground_truth`), `solution_field` (answer = its last `\\boxed{}` when there
    is no answer), `choices_field` (a list of options: the problems become `kind="choice"`),
    `answer_format` ("plain", "number": `27.0` -> `27`, "gsm8k": text after `####`), `config` (a hub
    dataset's configuration). `data_dir` (default `$DUETLM_DATA_DIR`): the offline mirror.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
    if limit is not None and limit < 0:
        raise DataError(f"limit must be >= 0, not {limit}")
    if answer_format not in _ANSWER_FORMATS:
        raise DataError(f"answer_format must be one of {', '.join(_ANSWER_FORMATS)}, not {answer_format!r}")
    mirror_dir = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV) or None
    name = os.fspath(source)
    options = {
        "question_field": question_field, "answer_field": answer_field, "id_field": id_field,
        "solution_field": solution_field, "choices_field": choices_field, "config": config,
    }  # fmt: skip

    if name in REGISTRY:
        given = [k for k, v in options.items() if v is not None]
        if given or answer_format != "plain":
            raise DataError(
                f"{name!r} is a registered source with fixed columns; {', '.join(given) or 'answer_format'} "
                "applies to hub ids and files only"
            )
        return _load_registered(
            REGISTRY[name], split, limit, Path(mirror_dir) if mirror_dir else None, on_error
        )

    columns = Columns(
        question=(question_field,) if question_field else Columns.question,
        answer=(answer_field,) if answer_field else Columns.answer,
        id=(id_field,) if id_field else Columns.id,
        solution=(solution_field,) if solution_field else Columns.solution,
        choices=choices_field,
        answer_format=answer_format,
    )
    path = Path(name)
    if path.suffix.lower() in FILE_SUFFIXES or path.exists():
        if split is not None:
            raise DataError(f"{name}: split applies to hub datasets and registered names, not to files")
        return _collect(_file_rows(path), _Collector(str(path), path.stem, columns, None, on_error, limit))
    if _HUB_ID.fullmatch(name):
        where, rows = _hub_rows(name, config, split)
        return _collect(rows, _Collector(where, name, columns, None, on_error, limit))
    raise DataError(
        f"unknown source {name!r}: not a registered name ({', '.join(REGISTRY)}), "
        f"not a {'/'.join(FILE_SUFFIXES)} file, not a hub id (owner/name)"
    )


# --------------------------------------------------------------------------------------------------
# Data sources: `PREFIX:NAME` hooks beside `load_problems` (what the trainer and eval read)
# --------------------------------------------------------------------------------------------------

SourceFn = Callable[[str, "str | None", "int | None"], list[Problem]]
SOURCES: dict[str, SourceFn] = {}
# Packages add sources through this entry-point group (name = PREFIX, value = a SourceFn); duetlm's
# own lab registers `lab` there (pyproject.toml), so nothing here imports it.
SOURCE_ENTRY_POINTS = "duetlm.sources"


def register_source(prefix: str, fn: SourceFn) -> None:
    """Make `data.source: "PREFIX:NAME"` call `fn(NAME, split, limit) -> list[Problem]`."""
    if not prefix or ":" in prefix:
        raise ValueError(f"source prefix must be a non-empty name without ':', got {prefix!r}")
    SOURCES[prefix] = fn


def source_hook(prefix: str) -> SourceFn | None:
    """The registered (or entry-point) source for `prefix`, or None."""
    if prefix not in SOURCES:
        from importlib.metadata import entry_points

        for ep in entry_points(group=SOURCE_ENTRY_POINTS, name=prefix):
            SOURCES[prefix] = ep.load()
    return SOURCES.get(prefix)


def load_source(
    source: str, split: str | None = None, limit: int | None = None, **options: Any
) -> list[Problem]:
    """Problems of a data source: a `PREFIX:NAME` hook (`register_source`, or the `duetlm.sources`
    entry points: `lab:<task>`), else `load_problems` (which takes `options`: column names, answer
    format, offline mirror). An empty source, or a hook returning anything but `Problem`s, is a
    `DataError`."""
    prefix, sep, name = source.partition(":")
    hook = source_hook(prefix) if sep and prefix else None
    found = list(
        hook(name, split, limit) if hook else load_problems(source, split=split, limit=limit, **options)
    )
    if not found:
        raise DataError(f"data source {source!r} (split {split!r}) has no problems")
    bad = next((p for p in found if not isinstance(p, Problem)), None)
    if bad is not None:
        raise DataError(f"data source {source!r} returned {type(bad).__name__}, not duetlm.problems.Problem")
    return found


def load_benchmark(
    name: str,
    split: str | None = None,
    limit: int | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    **options: Any,
) -> list[Problem]:
    """A source as `duetlm eval` and `duetlm data` name it: a registered name (its test split when it
    has one: see `benchmark_split`), a file, a hub id, `NAME@SPLIT`, or a `PREFIX:NAME` data source
    (`load_source`: `lab:<task>`, `lab:mix@test`). `split` overrides the one the name implies;
    `options` go to `load_problems` (column names, `on_error`). An empty result is a `DataError`."""
    if data_dir is not None and not Path(data_dir).is_dir():
        raise DataError(f"--data-dir {os.fspath(data_dir)}: no such directory")
    prefix, sep, _ = name.partition(":")
    if sep and prefix.isidentifier() and not Path(name).exists():
        # `PREFIX:NAME` data sources (`lab:<task>`): what the trainer trains on.
        source, implied = name.rpartition("@")[::2] if "@" in name else (name, None)
        return load_source(source, split=split or implied, limit=limit)
    source, implied = (name, None) if Path(name).exists() else benchmark_split(name)
    problems = load_problems(source, split=split or implied, limit=limit, data_dir=data_dir, **options)
    if not problems:
        raise DataError(f"source {name!r} has no problems")
    return list(problems)
