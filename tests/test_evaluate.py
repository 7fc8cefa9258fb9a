"""`duetlm eval` and `duetlm report`: methods, metrics, records, resume, rendering, bad input.

Real tiny models (conftest), a real problem file, the CLI in real subprocesses; the interruption in the
resume test is a real SIGKILL of a running eval.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from duetlm import protocol
from duetlm.errors import DuetError
from duetlm.evaluate import METHODS, make_config, parse_method, split_list
from duetlm.report import (
    RECORDS_FILE,
    SampleRecord,
    aggregate,
    compute_flops,
    ipt,
    pareto_front,
    per_problem_mean,
    read_records,
)

ALL_METHODS = "duet,original,truncation:4,truncation:7,prompt,small"
N_METHODS = 6
N_PROBLEMS = 5
SAMPLES = 2
QUESTIONS = [
    ("p0", "What is 12 + 7?", "19"),
    ("p1", "Compute 3 * (4 + 5).", "27"),
    ("p2", "What is 6 * 7?", "42"),
    ("p3", "A train travels 60 miles in 1.5 hours. What is its average speed in miles per hour?", "40"),
    ("p4", "What is 2 + 2?", "4"),
]


# One torch thread: tiny models gain nothing from more, and on a shared, loaded machine extra threads
# spin against each other (measured here: 43 s of generation with the default, 3 s with one).
ENV = dict(os.environ, TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS="1")


def duetlm(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = ENV
    return subprocess.run(
        [sys.executable, "-m", "duetlm.cli", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.fixture(scope="module")
def problem_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "tiny_bench.jsonl"
    path.write_text("".join(json.dumps({"id": i, "problem": q, "answer": a}) + "\n" for i, q, a in QUESTIONS))
    return path


def eval_args(tiny_dir: Path, tiny_llama_dir: Path, problem_file: Path, out: Path, *extra: str) -> list[str]:
    return [
        "eval",
        "--large",
        str(tiny_dir),
        "--small",
        str(tiny_llama_dir),
        "--benchmarks",
        str(problem_file),
        "--methods",
        ALL_METHODS,
        "--samples",
        str(SAMPLES),
        "--temperature",
        "1.0",
        "--max-signal-tokens",
        "6",
        "--max-answer-tokens",
        "5",
        "--seed",
        "3",
        "--batch-size",
        "1",  # one sample per batch: its seed is its own, so resumed and uninterrupted runs agree
        "--output",
        str(out),
        *extra,
    ]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_dir, tiny_llama_dir, problem_file) -> Path:
    """An uninterrupted eval of every method on two tiny models."""
    out = tmp_path_factory.mktemp("eval") / "full"
    r = duetlm(*eval_args(tiny_dir, tiny_llama_dir, problem_file, out, "--no-progress"))
    assert r.returncode == 0, r.stderr
    return out


def strip_timing(rec: SampleRecord) -> dict:
    d = dict(rec.__dict__)
    d.pop("seconds")
    return d


# --------------------------------------------------------------------------------------------------
# Method names


def test_parse_method_names_and_caps():
    assert parse_method("duet").name == "duet"
    spec = parse_method(" truncation:3072 ")
    assert (spec.name, spec.kind, spec.cap) == ("truncation:3072", "truncation", 3072)
    assert parse_method("truncation:0100").name == "truncation:100"
    assert split_list(["duet, original", "duet,,small"]) == ["duet", "original", "small"]
    assert set(METHODS) == {"duet", "original", "truncation", "prompt", "small", "small-at-once", "cascade"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "beam",
            "unknown method 'beam'; valid methods: duet, original, truncation:T, prompt, small, small-at-once",
        ),
        ("truncation:abc", "cap must be a positive whole number"),
        ("truncation", "cap must be a positive whole number"),
        ("truncation:0", "cap must be a positive whole number"),
        ("truncation:-5", "cap must be a positive whole number"),
        ("duet:5", "takes no argument"),
    ],
)
def test_parse_method_errors(text, message):
    with pytest.raises(DuetError, match=message.replace("(", r"\(")):
        parse_method(text)


def test_config_errors_are_one_line():
    base = dict(large="x", small="y", benchmarks=["b"], methods=["duet"], output="o")
    with pytest.raises(DuetError) as err:
        make_config(**{**base, "samples": 0, "batch_size": 0})
    assert "--samples" in str(err.value) and "--batch-size" in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(DuetError, match="no method given"):
        make_config(**{**base, "methods": [" , "]})


# --------------------------------------------------------------------------------------------------
# Metrics, by hand


def rec(problem: str, method: str, sample: int, correct: float, large: int, small: int, bench: str = "b"):
    return SampleRecord(
        benchmark=bench,
        problem_id=problem,
        method=method,
        sample=sample,
        signal="z",
        signal_complete=large < 100,
        answer="y",
        extracted=None,
        gold="1",
        correct=correct,
        large_tokens=large,
        small_tokens=small,
        think_finish="stop",
        large_finish="stop",
        small_finish="stop",
        seconds=0.5,
        seed=0,
    )


def test_metrics_by_hand():
    records = [
        # problem a: 1 of 2 right; problem b: 3 of 3 right (unbalanced on purpose)
        rec("a", "duet", 0, 1.0, 10, 4),
        rec("a", "duet", 1, 0.0, 30, 6),
        rec("b", "duet", 0, 1.0, 50, 1),
        rec("b", "duet", 1, 1.0, 50, 1),
        rec("b", "duet", 2, 1.0, 200, 1),
        rec("a", "small", 0, 0.0, 0, 8),
        rec("b", "small", 0, 1.0, 0, 2),
    ]
    duet, small = aggregate(records, large_params=1000, small_params=10)
    assert (duet.method, small.method) == ("duet", "small")
    # accuracy: mean over problems of the per-problem mean: (0.5 + 1.0) / 2, not 4/5
    assert duet.accuracy == pytest.approx(0.75)
    # M tokens: ((10 + 30) / 2 + (50 + 50 + 200) / 3) / 2 = (20 + 100) / 2
    assert duet.large_tokens == pytest.approx(60.0)
    assert duet.small_tokens == pytest.approx((5.0 + 1.0) / 2)
    assert duet.ipt == pytest.approx(1000 * 0.75 / 60.0)
    # compute: 2 * (1000 * 340 + 10 * 13)
    assert duet.compute_flops == pytest.approx(2 * (1000 * 340 + 10 * 13))
    assert (duet.problems, duet.samples, duet.wall_s) == (2, 5, pytest.approx(2.5))
    assert duet.signal_incomplete == pytest.approx(1 / 5)
    assert small.ipt is None and small.accuracy == pytest.approx(0.5) and small.signal_incomplete is None
    assert small.compute_flops == pytest.approx(2 * 10 * 10)


def test_metric_functions():
    assert ipt(0.88, 1800) == pytest.approx(0.4889, abs=1e-4)  # the paper's AMC23 example
    assert ipt(0.5, 0) is None
    assert per_problem_mean([("a", 1.0), ("a", 0.0), ("b", 0.0)]) == pytest.approx(0.25)
    assert compute_flops(None, 0, 7, 3) == 42.0
    assert compute_flops(None, 5, 7, 3) is None  # M used but its size unknown


def test_compute_estimate_adds_the_attention_context_term():
    """App. E.1: per generated token 2N + 2·n_layer·n_ctx·d_attn; a token attends its prompt and the
    tokens before it."""
    from duetlm.report import context_flops

    # 3 tokens after a 5-token prompt attend 6, 7, 8 positions: 2 · 2 layers · 4 · 21
    assert context_flops(2, 4, 5, 3) == 2 * 2 * 4 * (6 + 7 + 8)
    r = replace(rec("a", "duet", 0, 1.0, 3, 2), large_prompt_tokens=5, small_prompt_tokens=10)
    (plain,) = aggregate([r], large_params=100, small_params=10)
    (full,) = aggregate([r], 100, 10, large_shape=(2, 4), small_shape=(1, 8))
    assert plain.compute_flops == 2 * (100 * 3 + 10 * 2)
    assert full.compute_flops == plain.compute_flops + context_flops(2, 4, 5, 3) + context_flops(1, 8, 10, 2)


def test_eval_records_what_the_context_term_needs(full_run, tiny_dir):
    from duetlm.models import load_model
    from duetlm.report import load_results_dir, metrics_of

    run, records = load_results_dir(full_run)
    model, _ = load_model(str(tiny_dir), device="cpu")
    c = model.config
    assert run["models"]["large"]["layers"] == c.num_hidden_layers
    assert run["models"]["large"]["attn_dim"] == c.num_attention_heads * (
        c.head_dim or c.hidden_size // c.num_attention_heads
    )
    duet = [r for r in records if r.method == "duet"]
    assert all(r.large_prompt_tokens > 0 and r.small_prompt_tokens > r.large_prompt_tokens // 2 for r in duet)
    m = next(m for m in metrics_of(run, records) if m.method == "duet")
    no_context = sum(
        2 * run["models"][k]["params"] * sum(getattr(r, f"{k}_tokens") for r in duet)
        for k in ("large", "small")
    )
    assert m.compute_flops > no_context


def test_pareto_front():
    pts = [(100, 0.5), (50, 0.5), (200, 0.9), (150, 0.4), (0, 0.1), (200, 0.8)]
    assert pareto_front(pts) == [4, 1, 2]


# --------------------------------------------------------------------------------------------------
# The baselines themselves (in process, greedy, tiny models)


@pytest.fixture(scope="module")
def pipe(make_pipeline):
    return make_pipeline(signal_tokens=9, answer_tokens=5)


def test_baselines_token_accounting_and_consistency(pipe):
    qs = [q for _, q, _ in QUESTIONS[:3]]
    tok = pipe.large.tokenizer
    original = pipe.original(qs)
    for r in original:
        # one generation of thinking + answer budget; no m
        assert 1 <= r.large_tokens <= 9 + 5 and r.small_tokens == 0 and r.small_finish == ""
        assert r.large_tokens == r.large.num_tokens
        if not r.signal.complete:
            assert r.answer == r.large.text.strip()  # graded on the whole text
    stops = {tok.convert_tokens_to_ids(protocol.THINK_CLOSE)} | pipe.large.eos_ids
    for budget in (3, 9):
        trunc = pipe.truncation(qs, budget)
        for r, o in zip(trunc, original, strict=True):
            # Greedy thinking cut at B tokens = the uncut greedy output up to B tokens or its first stop
            first = o.large.token_ids[:budget]
            first = first[: next((i + 1 for i, t in enumerate(first) if t in stops), len(first))]
            text_ids = first[:-1] if first and first[-1] in pipe.large.eos_ids else first
            assert r.signal == protocol.extract_signal(tok.decode(text_ids, skip_special_tokens=False))
            assert r.large_tokens == len(first) + r.large.num_tokens  # M tokens = thinking + answer
            assert r.think_finish == ("length" if len(first) == budget and first[-1] not in stops else "stop")
            assert r.large.num_tokens <= 5 and r.small_tokens == 0
            # M answers after a closed thinking block holding its (cut) thinking
            prompt = tok.decode(r.large.prompt_token_ids, skip_special_tokens=False)
            assert prompt.endswith(f"{protocol.THINK_CLOSE}\n\n") and r.signal.text in prompt
    duet = pipe.run(qs)
    trunc9 = pipe.truncation(qs, 9)
    for d, t in zip(duet, trunc9, strict=True):
        assert d.signal == t.signal  # the same thinking at the same cap
        assert d.large_tokens <= 9 and 1 <= d.small_tokens <= 5
    concise = pipe.concise(qs)
    assert protocol.CONCISE_INSTRUCTION.strip() in tok.decode(concise[0].large.prompt_token_ids)
    assert protocol.CONCISE_INSTRUCTION.strip() not in tok.decode(original[0].large.prompt_token_ids)
    alone = pipe.small_only(qs)
    assert all(r.large_tokens == 0 and 1 <= r.small_tokens <= 5 for r in alone)
    assert alone[0].small.prompt_token_ids == pipe.small.encode([protocol.small_prompt(tok, qs[0], None)])[0]


# --------------------------------------------------------------------------------------------------
# End to end through the CLI


def test_eval_every_method_end_to_end(full_run, problem_file):
    from duetlm.grading import grade
    from duetlm.problems import load_problems

    records = read_records(full_run / RECORDS_FILE)
    assert len(records) == N_PROBLEMS * N_METHODS * SAMPLES
    assert len({r.key for r in records}) == len(records)
    by_id = {p.id: p for p in load_problems(str(problem_file))}
    for r in records:
        assert r.correct == grade(r.answer, by_id[r.problem_id])
        kind, _, budget = r.method.partition(":")
        if kind == "duet":
            assert 1 <= r.large_tokens <= 6 and 1 <= r.small_tokens <= 5
        elif kind in ("original", "prompt"):
            assert 1 <= r.large_tokens <= 6 + 5 and r.small_tokens == 0
        elif kind == "truncation":
            assert 2 <= r.large_tokens <= int(budget) + 5 and r.small_tokens == 0
            assert r.signal_complete or r.think_finish in ("length", "stop")
        else:
            assert r.large_tokens == 0 and 1 <= r.small_tokens <= 5
    # sampled at temperature 1: the samples of a problem are not all copies of each other
    answers = {(r.problem_id, r.method): set() for r in records}
    for r in records:
        answers[(r.problem_id, r.method)].add(r.answer)
    assert any(len(a) > 1 for a in answers.values())

    results = json.loads((full_run / "results.json").read_text())
    # oracle-route is derived wherever small and duet both ran (report.oracle_route)
    assert {(m["method"]) for m in results["metrics"]} == set(ALL_METHODS.split(",")) | {"oracle-route"}
    assert all(
        m["problems"] == N_PROBLEMS and m["samples"] == N_PROBLEMS * SAMPLES for m in results["metrics"]
    )
    run = json.loads((full_run / "run.json").read_text())
    assert run["seed"] == 3 and run["options"]["samples"] == SAMPLES
    assert run["models"]["large"]["params"] > run["models"]["small"]["params"] > 0
    table = (full_run / "table.md").read_text()
    assert "| method | tiny_bench |" in table
    for method in ALL_METHODS.split(","):
        assert f"| {method} |" in table
    assert (full_run / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_after_kill_skips_finished_samples(tmp_path, full_run, tiny_dir, tiny_llama_dir, problem_file):
    out = tmp_path / "killed"
    env = ENV
    args = eval_args(tiny_dir, tiny_llama_dir, problem_file, out, "--no-progress")
    proc = subprocess.Popen([sys.executable, "-m", "duetlm.cli", *args], env=env, stderr=subprocess.PIPE)
    records = out / RECORDS_FILE
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if records.is_file() and records.read_bytes().count(b"\n") >= 8:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the eval finished before it could be killed"
    total = N_PROBLEMS * N_METHODS * SAMPLES
    kept = records.read_bytes().count(b"\n")
    assert 8 <= kept < total
    # what a kill in the middle of a write leaves: half a line, no newline
    with records.open("a") as f:
        f.write('{"benchmark": "torn", "problem_id": "p')

    r = duetlm(*eval_args(tiny_dir, tiny_llama_dir, problem_file, out, "--no-progress"))
    assert r.returncode == 0, r.stderr
    assert f"{total - kept} samples generated ({kept} already done)" in r.stdout
    lines = records.read_text().splitlines()
    assert len(lines) == total  # the torn line is gone, nothing duplicated
    resumed = read_records(records)
    assert len({x.key for x in resumed}) == total
    run = json.loads((out / "run.json").read_text())
    assert [inv["records_before"] for inv in run["invocations"]] == [0, kept]
    assert run["invocations"][-1]["generated"] == total - kept
    # one seed per sample: the resumed run holds exactly the samples of the uninterrupted one
    full = {x.key: strip_timing(x) for x in read_records(full_run / RECORDS_FILE)}
    assert {x.key: strip_timing(x) for x in resumed} == full

    # a finished run resumed again generates nothing; changed sampling options are refused
    again = duetlm(*eval_args(tiny_dir, tiny_llama_dir, problem_file, out, "--no-progress"))
    assert again.returncode == 0 and "0 samples generated" in again.stdout
    bad = duetlm(*eval_args(tiny_dir, tiny_llama_dir, problem_file, out, "--seed", "4"))
    assert bad.returncode == 1 and "seed=3, not 4" in bad.stderr
    other = duetlm(*eval_args(tiny_dir, tiny_llama_dir, problem_file, out, "--large-top-k", "3"))
    assert other.returncode == 1 and "large_top_k" in other.stderr


def test_report_renders_and_compares(tmp_path, full_run):
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / RECORDS_FILE).write_bytes((full_run / RECORDS_FILE).read_bytes())
    (copy / "run.json").write_bytes((full_run / "run.json").read_bytes())
    r = duetlm("report", str(copy))
    assert r.returncode == 0, r.stderr
    assert (copy / "table.md").read_text() == (full_run / "table.md").read_text()
    assert r.stdout.strip() == (full_run / "table.md").read_text().strip()
    assert (
        json.loads((copy / "results.json").read_text())["metrics"]
        == json.loads((full_run / "results.json").read_text())["metrics"]
    )
    assert (copy / "pareto.png").stat().st_size > 1000

    # B holds only the duet records, every one marked correct: the comparison shows both and the deltas
    b = tmp_path / "b"
    b.mkdir()
    duet = [x for x in read_records(full_run / RECORDS_FILE) if x.method == "duet"]
    (b / RECORDS_FILE).write_text("".join(json.dumps({**x.__dict__, "correct": 1.0}) + "\n" for x in duet))
    cmp = duetlm("report", str(full_run), str(b), "--output", str(tmp_path / "cmp.md"))
    assert cmp.returncode == 0, cmp.stderr
    row = next(line for line in cmp.stdout.splitlines() if line.startswith("| tiny_bench | duet |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    acc_a = aggregate(duet)[0].accuracy
    assert cells[2:5] == [f"{acc_a:.3f}", "1.000", f"{1 - acc_a:+.3f}"]
    assert "| tiny_bench | small |" in cmp.stdout  # only in A: B's cells are "—"
    assert (tmp_path / "cmp.md").read_text() == cmp.stdout.rstrip("\n") + "\n"


# --------------------------------------------------------------------------------------------------
# Bad input: one line, before any model is loaded


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--methods": "duet,beam"}, "unknown method 'beam'; valid methods: duet, original, truncation:T"),
        ({"--methods": "truncation:abc"}, "method 'truncation:abc': the cap must be a positive whole"),
        ({"--samples": "0"}, "--samples: input should be greater than or equal to 1 (got 0)"),
        ({"--benchmarks": "no-such-benchmark"}, "unknown source 'no-such-benchmark'"),
        ({"--large-engine": "gpu"}, "--large-engine 'gpu' is not an engine; valid: hf, vllm, remote"),
        ({"--large-engine": "remote"}, "--large-engine remote needs --large-url"),
        (
            {
                "--large-engine": "remote",
                "--large-url": "http://127.0.0.1:9",
                "--methods": "duet,truncation:8",
            },
            "truncation:8: budget forcing continues M's assistant turn",
        ),
    ],
)
def test_bad_input_fails_fast(tmp_path, problem_file, change, message):
    # The model paths do not exist: reaching them would be a different error, so these fail first.
    opts = {
        "--large": "/no/such/model",
        "--small": "/no/such/model",
        "--benchmarks": str(problem_file),
        "--methods": "duet",
        "--output": str(tmp_path / "out"),
        **change,
    }
    r = duetlm("eval", *[x for kv in opts.items() for x in kv])
    assert r.returncode == 1
    assert r.stderr.startswith("error:") and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "model not found" not in r.stderr


@pytest.mark.slow
def test_eval_smollm2_on_champ_and_gsm8k(tmp_path):
    """SmolLM2 as both models, every method, real benchmark files: real data flows through each."""
    from conftest import SHARED_DATA

    if not (SHARED_DATA / "gsm8k_test.jsonl").is_file():
        pytest.skip(f"needs the shared GSM8K file in {SHARED_DATA}")
    out = tmp_path / "smollm2"
    r = duetlm(
        "eval", "--large", "smollm2-135m", "--small", "smollm2-135m", "--benchmarks", "champ,gsm8k",
        "--data-dir", str(SHARED_DATA), "--methods", "duet,original,truncation:16,prompt,small",
        "--limit", "2", "--max-signal-tokens", "24", "--max-answer-tokens", "16", "--batch-size", "2",
        "--output", str(out), "--no-progress", timeout=1200,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    records = read_records(out / RECORDS_FILE)
    assert len(records) == 2 * 5 * 2
    assert {x.problem_id for x in records if x.benchmark == "gsm8k"} == {"gsm8k-test-0000", "gsm8k-test-0001"}
    assert all(x.large_tokens + x.small_tokens > 0 and x.answer for x in records)
    assert "| truncation:16 |" in (out / "table.md").read_text()


def test_report_of_a_directory_without_records(tmp_path):
    r = duetlm("report", str(tmp_path))
    assert r.returncode == 1 and "not a `duetlm eval` output directory" in r.stderr


def test_each_model_samples_with_its_own_options(tiny_engine, tiny_small_engine):
    """Qwen3's recommended sampling differs for M (thinking) and m: `--large-*` / `--small-*`
    override the shared `--temperature` / `--top-p` / `--top-k` per model."""
    from duetlm.evaluate import eval_pipeline, make_config

    shared = make_config(
        large="M", small="m", benchmarks=["b"], methods=["duet"], output="o", temperature=0.7, top_k=5
    )
    pipe = eval_pipeline(shared, tiny_engine, tiny_small_engine)
    assert (pipe.large_sampling.temperature, pipe.large_sampling.top_k) == (0.7, 5)
    assert (pipe.small_sampling.temperature, pipe.small_sampling.top_k) == (0.7, 5)
    own = shared.model_copy(
        update={"large_temperature": 0.6, "large_top_p": 0.95, "large_top_k": 20, "small_temperature": 0.0}
    )
    pipe = eval_pipeline(own, tiny_engine, tiny_small_engine)
    large, small = pipe.large_sampling, pipe.small_sampling
    assert (large.temperature, large.top_p, large.top_k, large.max_new_tokens) == (
        0.6,
        0.95,
        20,
        own.max_signal_tokens,
    )
    assert (small.temperature, small.top_p, small.top_k, small.max_new_tokens) == (
        0.0,
        1.0,
        5,
        own.max_answer_tokens,
    )
