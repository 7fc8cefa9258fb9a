"""Loaders: the shared benchmark files, small local files in each hub dataset's own format, bad rows,
column options, hub errors (offline, gated), and the `duetlm data` commands. No mocked datasets."""

from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from duetlm.cli import app
from duetlm.errors import DataError
from duetlm.grading import grade
from duetlm.problems import REGISTRY, Problem, SkippedRowsWarning, load_problems, render_question

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FIXTURES = Path(__file__).resolve().parent / "data"
needs_shared = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"benchmark files not found at {SHARED_DATA} (../shared/data)"
)


# --- registered names on the shared offline files -------------------------------------------------


@needs_shared
@pytest.mark.parametrize(
    ("name", "split", "count", "first_id"),
    [
        ("math500", None, 500, "test/precalculus/807.json"),
        ("aime24", None, 30, "2024-I-1"),
        ("aime25", None, 30, "2025-I-1"),
        ("amc23", None, 40, "amc23-0"),
        ("gsm8k", "test", 1319, "gsm8k-test-0000"),
    ],
)
def test_registered_benchmarks_load_from_the_shared_mirror(
    name: str, split: str | None, count: int, first_id: str
) -> None:
    problems = load_problems(name, split=split, data_dir=SHARED_DATA)
    assert len(problems) == count
    assert problems[0].id == first_id
    assert len({p.id for p in problems}) == count
    assert all(p.kind == "math" and p.question and p.answer and p.source == name for p in problems)


@needs_shared
def test_the_mirror_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DUETLM_DATA_DIR", str(SHARED_DATA))
    assert len(load_problems("aime25")) == 30


@needs_shared
def test_benchmark_answers_are_normalised() -> None:
    amc = load_problems("amc23", data_dir=SHARED_DATA)
    assert all(p.answer.lstrip("-").isdigit() for p in amc)  # no "27.0"
    gsm = load_problems("gsm8k", split="test", data_dir=SHARED_DATA)
    assert all("," not in p.answer for p in gsm)
    assert (
        load_problems("math500", limit=1, data_dir=SHARED_DATA)[0].answer
        == "\\left( 3, \\frac{\\pi}{2} \\right)"
    )


def test_champ_loads_offline_from_its_package() -> None:
    problems = load_problems("champ")
    assert len(problems) == 270
    assert problems[0].id == "P_Combinatorics_1" and problems[0].answer == "239"
    assert len({p.id for p in problems}) == 270


def test_limit_takes_the_first_problems() -> None:
    assert [p.id for p in load_problems("amc23", limit=1, data_dir=FIXTURES)] == ["amc23-0"]
    assert load_problems("amc23", limit=0, data_dir=FIXTURES) == []


# --- hub-only names, on small files in the hub datasets' own formats ------------------------------


def test_deepscaler_json_list() -> None:
    problems = load_problems("deepscaler", data_dir=FIXTURES)
    assert [(p.id, p.answer) for p in problems] == [
        ("deepscaler-0", "14"),
        ("deepscaler-1", "\\frac{3}{4}"),
        ("deepscaler-2", "23"),
    ]


def test_dapo_parquet_unwraps_the_prompt_and_drops_repeats(caplog: pytest.LogCaptureFixture) -> None:
    problems = load_problems("dapo17k", data_dir=FIXTURES)
    assert [p.answer for p in problems] == ["28", "-3", "6"]  # each repeated 3 times in the file
    assert problems[0].question == "Find the sum of the positive divisors of $12$."
    assert "6 rows repeating" in caplog.text


def test_math_lighteval_answer_is_the_last_box_of_the_solution() -> None:
    problems = load_problems("math-lighteval", data_dir=FIXTURES)
    assert [p.answer for p in problems] == ["7", "2", "0.25"]
    assert problems[0].id == "math-lighteval-train-0"


def test_limo() -> None:
    assert [p.answer for p in load_problems("limo", data_dir=FIXTURES)] == ["2", "9"]


def test_gsm8k_answer_after_hashes_without_commas() -> None:
    problems = load_problems("gsm8k", data_dir=FIXTURES)  # default split: train
    assert [(p.id, p.answer) for p in problems] == [("gsm8k-train-0", "31"), ("gsm8k-train-1", "2125")]


def test_hub_format_numbers_are_normalised() -> None:
    assert [(p.id, p.answer) for p in load_problems("amc23", data_dir=FIXTURES)] == [
        ("amc23-0", "27"),
        ("amc23-1", "36"),
    ]
    assert [(p.id, p.answer) for p in load_problems("aime25", data_dir=FIXTURES)] == [
        ("aime25-1", "70"),
        ("aime25-2", "25"),
    ]
    assert load_problems("aime24", data_dir=FIXTURES)[0].answer == "25"  # "025"


def test_gpqa_options_are_shuffled_reproducibly_per_item() -> None:
    problems = load_problems("gpqa-diamond", data_dir=FIXTURES)
    assert len(problems) == 4
    correct = {"recA1": "Nitrogen", "recB2": "Coulomb", "recC3": "Nucleus", "recD4": "Neutron"}
    for p in problems:
        assert p.kind == "choice" and len(p.choices) == 4
        assert p.choices["ABCD".index(p.answer)] == correct[p.id]
    assert load_problems("gpqa-diamond", data_dir=FIXTURES) == problems  # same letters every time
    # The shuffle depends on the item alone, not on which items were loaded before it.
    assert load_problems("gpqa-diamond", data_dir=FIXTURES, limit=1)[0] == problems[0]
    assert len({p.choices.index(correct[p.id]) for p in problems} | {0}) > 1  # not always "A"
    text = render_question(problems[0])
    assert text.startswith(problems[0].question) and "\nA) " in text and "\nD) " in text
    assert grade(f"Answer: {problems[0].answer}", problems[0]) == 1.0


def test_every_registered_name_is_covered() -> None:
    assert set(REGISTRY) == {
        "deepscaler",
        "dapo17k",
        "math-lighteval",
        "limo",
        "gsm8k",
        "math500",
        "aime24",
        "aime25",
        "amc23",
        "gpqa-diamond",
        "champ",
    }


# --- hub errors --------------------------------------------------------------------------------


def test_unreachable_hub_says_so_and_names_the_offline_mirror(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # the hub's own offline mode
    monkeypatch.delenv("DUETLM_DATA_DIR", raising=False)
    with pytest.raises(
        DataError,
        match=r"HF_HUB_OFFLINE.*is set and no cached copy.*DUETLM_DATA_DIR \(or --data-dir\).*math500\.jsonl",
    ):
        load_problems("math500")
    # A data dir without the file: the message says where it looked.
    with pytest.raises(DataError, match=r"looked for math500\.jsonl in"):
        load_problems("math500", data_dir=tmp_path)
    with pytest.raises(DataError, match="could not load hub dataset 'someone/nothing-here'"):
        load_problems("someone/nothing-here", split="train")


def test_gated_dataset_without_a_token_says_how_to_set_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import huggingface_hub.constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "DUETLM_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    with pytest.raises(DataError, match=r"gated.*HF_TOKEN.*gpqa_diamond\.jsonl"):
        load_problems("gpqa-diamond")


# --- bad rows -------------------------------------------------------------------------------------


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = {"id": "a", "question": "1+1?", "answer": "2"}


@pytest.mark.parametrize(
    ("bad_row", "pattern"),
    [
        ({"id": "b", "question": "2+2?"}, r"line 2: field 'answer': missing answer"),
        ({"id": "b", "question": "  ", "answer": "4"}, r"line 2: field 'question': empty question"),
        ({"id": "b", "question": "2+2?", "answer": ""}, r"line 2: field 'answer': empty answer"),
        (
            {"id": "b", "question": 4, "answer": "4"},
            r"line 2: field 'question': question must be a string, got int",
        ),
        (
            {"id": "b", "question": "2+2?", "answer": [4]},
            r"line 2: field 'answer': answer must be a string, got list",
        ),
        ({"id": "b", "question": "2+2?", "answer": True}, r"line 2: field 'answer': .*got bool"),
        ({"id": ["b"], "question": "2+2?", "answer": "4"}, r"line 2: field 'id': id must be a string"),
        ({"id": "a", "question": "2+2?", "answer": "4"}, r"line 2: field 'id': duplicate id 'a'"),
        ('{"id": "b", "question": ', r"line 2: field '<line>': not valid JSON"),
        ("[1, 2]", r"line 2: field '<row>': expected an object, got list"),
    ],
)
def test_a_bad_row_is_an_error_naming_file_line_and_field(
    tmp_path: Path, bad_row: object, pattern: str
) -> None:
    path = write_jsonl(tmp_path / "set.jsonl", [GOOD, bad_row])
    with pytest.raises(DataError, match=rf"set\.jsonl, {pattern}"):
        load_problems(path)


def test_skip_counts_bad_rows_in_one_warning(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "set.jsonl",
        [
            GOOD,
            {"id": "b", "question": "x"},
            {"id": "c", "question": "", "answer": "1"},
            GOOD,
            "{oops",
            GOOD | {"id": "d"},
        ],
    )
    with pytest.warns(
        SkippedRowsWarning, match=r"skipped 4 bad row\(s\).*first: .*set\.jsonl, line 2"
    ) as caught:
        problems = load_problems(path, on_error="skip")
    assert [p.id for p in problems] == ["a", "d"]
    assert len(caught) == 1


def test_no_warning_when_nothing_is_skipped(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(load_problems(write_jsonl(tmp_path / "ok.jsonl", [GOOD]), on_error="skip")) == 1


def test_csv_errors_name_the_line_and_parquet_errors_the_row(tmp_path: Path) -> None:
    csv_path = tmp_path / "set.csv"
    csv_path.write_text('id,question,answer\na,"multi\nline question",1\nb,second,\n')
    with pytest.raises(DataError, match=r"set\.csv, line 4: field 'answer': missing answer"):
        load_problems(csv_path)

    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet_path = tmp_path / "set.parquet"
    pq.write_table(pa.Table.from_pylist([GOOD, {"id": "b", "question": "q", "answer": None}]), parquet_path)
    with pytest.raises(DataError, match=r"set\.parquet, row 1: field 'answer': missing answer"):
        load_problems(parquet_path)


def test_file_level_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        load_problems(tmp_path / "missing.jsonl")
    (tmp_path / "obj.json").write_text('{"question": "q"}')
    with pytest.raises(DataError, match="expected a JSON list of objects"):
        load_problems(tmp_path / "obj.json")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="unsupported file type"):
        load_problems(tmp_path / "x.txt")
    with pytest.raises(DataError, match="unknown source 'nonsense'.*math500"):
        load_problems("nonsense")
    with pytest.raises(DataError, match="split applies to hub datasets"):
        load_problems(write_jsonl(tmp_path / "s.jsonl", [GOOD]), split="test")


def test_registered_name_errors() -> None:
    with pytest.raises(DataError, match=r"gsm8k has no split 'dev'; choose one of: train, test"):
        load_problems("gsm8k", split="dev", data_dir=FIXTURES)
    with pytest.raises(DataError, match="registered source with fixed columns"):
        load_problems("math500", question_field="q")


# --- column options ---------------------------------------------------------------------------------


def test_column_options_on_a_local_file(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "custom.jsonl",
        [
            {"key": 7, "body": "What is 6*7?", "meta": {"gold": "42.0"}},
            {"key": 8, "body": "Half of 3?", "meta": {"gold": "1.5"}},
        ],
    )
    problems = load_problems(
        path, question_field="body", answer_field="meta.gold", id_field="key", answer_format="number"
    )
    assert problems == [
        Problem(id="custom-7", question="What is 6*7?", answer="42", source="custom"),
        Problem(id="custom-8", question="Half of 3?", answer="1.5", source="custom"),
    ]


def test_solution_and_choices_columns(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "sol.jsonl", [{"question": "q", "solution": "so $\\boxed{\\frac{1}{2}}$"}])
    assert load_problems(path)[0].answer == "\\frac{1}{2}"
    path = write_jsonl(
        tmp_path / "mc.jsonl",
        [
            {"id": "1", "question": "Pick red", "options": ["blue", "red"], "answer": "B"},
            {"id": "2", "question": "Pick blue", "options": ["blue", "red"], "answer": "blue"},
        ],
    )
    problems = load_problems(path, choices_field="options")
    assert [(p.kind, p.answer, p.choices) for p in problems] == [
        ("choice", "B", ("blue", "red")),
        ("choice", "A", ("blue", "red")),
    ]
    bad = write_jsonl(tmp_path / "mc_bad.jsonl", [{"question": "q", "options": ["x", "y"], "answer": "C"}])
    with pytest.raises(DataError, match=r"line 1: field 'answer': answer 'C' is neither a letter A-B"):
        load_problems(bad, choices_field="options")


def test_gsm8k_format_option_on_a_hub_style_file() -> None:
    problems = load_problems(FIXTURES / "gsm8k_train.jsonl", answer_format="gsm8k")
    assert [p.answer for p in problems] == ["31", "2125"]


# --- duetlm data ----------------------------------------------------------------------------------


@needs_shared
def test_cli_data_stats_math500() -> None:
    result = CliRunner().invoke(app, ["data", "stats", "math500", "--data-dir", str(SHARED_DATA)])
    assert result.exit_code == 0, result.output
    assert "math500: 500 problems" in result.output
    assert "math: 500" in result.output


def test_cli_data_show_and_stats_on_fixtures() -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["data", "show", "gpqa-diamond", "--limit", "2", "--data-dir", str(FIXTURES)])
    assert result.exit_code == 0, result.output
    assert result.output.count("(choice)") == 2 and "A) " in result.output and "answer: " in result.output
    result = runner.invoke(app, ["data", "show", str(FIXTURES / "limo.jsonl"), "--json", "--limit", "1"])
    assert json.loads(result.output)["answer"] == "2"
    result = runner.invoke(app, ["data", "stats", "gpqa-diamond", "--data-dir", str(FIXTURES)])
    assert "gpqa-diamond: 4 problems" in result.output and "choice: 4" in result.output


def test_cli_data_errors_and_skipped_rows(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["data", "stats", "nonsense"])
    assert result.exit_code == 1 and "error: unknown source 'nonsense'" in result.output
    path = write_jsonl(tmp_path / "set.jsonl", [GOOD, {"id": "b"}])
    assert runner.invoke(app, ["data", "stats", str(path)]).exit_code == 1
    result = runner.invoke(app, ["data", "stats", str(path), "--skip-bad-rows"])
    assert result.exit_code == 0
    assert "warning: " in result.output and "skipped 1 bad row" in result.output
    assert "1 problems" in result.output


def test_cli_data_reads_a_source_as_eval_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from duetlm.problems import load_benchmark

    runner = CliRunner()
    # gsm8k: the test split by default (eval's), train only when asked; read from the mirror.
    write_jsonl(tmp_path / "gsm8k_test.jsonl", [{"question": "What is 2 + 2?", "answer": "work #### 4"}])
    result = runner.invoke(app, ["data", "show", "gsm8k", "--data-dir", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["id"] == "gsm8k-test-0"
    # the train split is not mirrored: with the Hub switched off that is an error at once, naming the file
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for args in (["gsm8k@train"], ["gsm8k", "--split", "train"]):
        result = runner.invoke(app, ["data", "stats", *args, "--data-dir", str(tmp_path)])
        assert result.exit_code == 1 and "HF_HUB_OFFLINE" in result.output, result.output
        assert "gsm8k_train.jsonl" in result.output and "Traceback" not in result.output
    # lab:<task>, as train and eval take it
    result = runner.invoke(app, ["data", "show", "lab:chain", "--limit", "2", "--json"])
    assert result.exit_code == 0, result.output
    shown = [json.loads(line) for line in result.output.splitlines()]
    assert [s["id"] for s in shown] == [p.id for p in load_benchmark("lab:chain", limit=2)]
    result = runner.invoke(app, ["data", "stats", "lab:nonsense"])
    assert result.exit_code == 1 and "chain" in result.output and "mix" in result.output, result.output


def test_kinds_of_fixtures_add_up() -> None:
    kinds = Counter(
        p.kind for name in ("gpqa-diamond", "limo") for p in load_problems(name, data_dir=FIXTURES)
    )
    assert kinds == {"choice": 4, "math": 2}
