"""The cascade (m first, M's signal only where m is unsure): estimators, parsing, the pipeline's routing,
and `duetlm eval` with `cascade:` and `oracle-route`, on tiny real models.

m here is the tests' tiny Llama taught for a few seconds to box an answer: the same digit for some
questions (it becomes sure of them), a random digit for others (it stays unsure), so its confidences
spread and a threshold between them splits the problems."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys

import pytest

from duetlm.cascade import ESTIMATORS, CascadeSpec, agreement, calls_large, min_token_prob, parse_cascade
from duetlm.errors import DuetError
from duetlm.protocol import boxed_answer

SURE = [f"What is {a} + {a}?" for a in range(1, 7)]  # always answered \boxed{7}
UNSURE = [f"Compute {a} * {a} now." for a in range(1, 7)]  # a random digit each time
STEPS = 150


# --------------------------------------------------------------------------------------------------
# Pure parts


def test_parse_cascade_names_and_errors():
    assert parse_cascade("logprob@0.5") == CascadeSpec("logprob", 0.5)
    assert parse_cascade("consistency@4@0.75") == CascadeSpec("consistency", 0.75, votes=4)
    assert parse_cascade(" logprob @ 1 ").name == "logprob@1"
    assert parse_cascade("consistency@4@0.75").name == "consistency@4@0.75"
    for text, message in [
        ("entropy@0.5", "valid: logprob, consistency"),
        ("logprob@1.5", "in [0, 1]"),
        ("logprob@-0.1", "in [0, 1]"),
        ("logprob@high", "not a number"),
        ("logprob", "expected logprob@T"),
        ("consistency@0.5", "expected"),
        ("consistency@1@0.5", "K must be a whole number >= 2"),
        ("logprob@4@0.5", "expected"),
    ]:
        with pytest.raises(DuetError, match=message.replace("[", r"\[").replace("]", r"\]")):
            parse_cascade(text)
    assert set(ESTIMATORS) == {"logprob", "consistency"}


def test_estimators_read_the_box_and_count_no_box_as_unsure():
    assert boxed_answer("so \\boxed{ 4 2 }.") == "42"
    assert boxed_answer("no answer here") is None
    assert min_token_prob("\\boxed{7}", [-0.1, -2.0, -0.3]) == pytest.approx(math.exp(-2.0))
    assert min_token_prob("it is 7", [-0.01]) == 0.0  # no box: unsure, however likely its tokens
    assert min_token_prob("\\boxed{7}", None) == 0.0
    votes = ["\\boxed{7}", "x \\boxed{ 7}", "\\boxed{8}", "nothing"]
    assert agreement("\\boxed{7}", None, votes) == pytest.approx(0.5)
    assert agreement("7", None, votes) == 0.0
    assert agreement("\\boxed{7}", None, []) == 0.0


def test_thresholds_zero_never_and_one_always():
    for c in (0.0, 0.3, 1.0):
        assert not calls_large(c, 0.0)
        assert calls_large(c, 1.0)
    assert calls_large(0.29, 0.3) and not calls_large(0.3, 0.3)


# --------------------------------------------------------------------------------------------------
# The pipeline, on a taught m


@pytest.fixture(scope="module")
def taught_small(tiny_llama_dir):
    """The tiny Llama after `STEPS` batches of boxing answers (a few seconds)."""
    import torch

    from duetlm.engines.hf import HFEngine
    from duetlm.models import load_model
    from duetlm.protocol import small_prompt

    model, tok = load_model(str(tiny_llama_dir), device="cpu")
    torch.manual_seed(0)
    rng = random.Random(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.requires_grad_(True)  # loaded for inference
    model.train()
    for _ in range(STEPS):
        rows = []
        for q in SURE + UNSURE:  # one batch of every question, right-padded
            target = f"\\boxed{{{7 if q in SURE else rng.randrange(10)}}}"
            prompt = tok(small_prompt(tok, q), add_special_tokens=False)["input_ids"]
            answer = tok(target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            rows.append((prompt + answer, [-100] * len(prompt) + answer))
        width = max(len(ids) for ids, _ in rows)
        ids = torch.tensor([x + [0] * (width - len(x)) for x, _ in rows])
        labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in rows])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in rows])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return HFEngine(model, tok)


@pytest.fixture(scope="module")
def cascade_pipe(tiny_engine, taught_small):
    from duetlm.engines.base import SamplingParams
    from duetlm.pipeline import DuetPipeline

    return DuetPipeline(
        tiny_engine,
        taught_small,
        large_sampling=SamplingParams(temperature=0.0, max_new_tokens=8),
        small_sampling=SamplingParams(temperature=0.0, max_new_tokens=6),
    )


QUESTIONS = SURE + UNSURE


def test_logprob_confidence_spreads_and_the_decision_follows_it(cascade_pipe):
    alone = cascade_pipe.small_only(QUESTIONS)
    assert all(boxed_answer(r.answer) is not None for r in alone[:6])  # m learnt to box its answers
    out = cascade_pipe.cascade(QUESTIONS, CascadeSpec("logprob", 0.0))
    conf = [r.confidence for r in out]
    sure, unsure = sum(conf[:6]) / 6, sum(conf[6:]) / 6
    assert sure > unsure + 0.2, conf  # m is surer of the questions it always saw answered alike
    threshold = sorted(conf)[len(conf) // 2]  # the median: some below, some not
    routed = cascade_pipe.cascade(QUESTIONS, CascadeSpec("logprob", threshold))
    assert [r.confidence for r in routed] == conf  # the same greedy first answers
    called = [r.large_called for r in routed]
    assert called == [c < threshold for c in conf] and 0 < sum(called) < len(QUESTIONS)
    duet = cascade_pipe.run([q for q, c in zip(QUESTIONS, called, strict=True) if c])
    asked = [r for r in routed if r.large_called]
    assert [r.answer for r in asked] == [r.answer for r in duet]
    assert [r.large_tokens for r in asked] == [r.large_tokens for r in duet]
    assert all(r.large_tokens == 0 and r.signal.text == "" for r in routed if not r.large_called)


def test_threshold_zero_is_m_alone_and_one_is_duet_exactly(cascade_pipe):
    alone = cascade_pipe.small_only(QUESTIONS, seed=5)
    never = cascade_pipe.cascade(QUESTIONS, CascadeSpec("logprob", 0.0), seed=5)
    assert not any(r.large_called for r in never)
    assert [r.answer for r in never] == [r.answer for r in alone]
    assert [r.small_tokens for r in never] == [r.small_tokens for r in alone]
    assert all(r.large_tokens == 0 for r in never)
    duet = cascade_pipe.run(QUESTIONS, seed=5)
    always = cascade_pipe.cascade(QUESTIONS, CascadeSpec("logprob", 1.0), seed=5)
    assert all(r.large_called for r in always)
    for a, d, m in zip(always, duet, alone, strict=True):
        assert (a.signal, a.answer, a.large_tokens) == (d.signal, d.answer, d.large_tokens)
        assert a.small_tokens == d.small_tokens + m.small_tokens  # m's first attempt counts too


def test_consistency_votes_decide_and_count(cascade_pipe):
    k = 4
    out = cascade_pipe.cascade(QUESTIONS, CascadeSpec("consistency", 0.0, votes=k), seed=1)
    conf = [r.confidence for r in out]
    assert all(c in {i / k for i in range(k + 1)} for c in conf)
    assert sum(conf[:6]) > sum(conf[6:]), conf  # the sure questions' votes agree more
    alone = cascade_pipe.small_only(QUESTIONS, seed=1)
    # every answer m wrote counts: its first and its k votes (each at least one token)
    assert all(r.small_tokens >= a.small_tokens + k for r, a in zip(out, alone, strict=True))
    threshold = 0.75
    routed = cascade_pipe.cascade(QUESTIONS, CascadeSpec("consistency", threshold, votes=k), seed=1)
    assert [r.large_called for r in routed] == [c < threshold for c in conf]


def test_cascade_needs_m(tiny_engine):
    from duetlm.pipeline import DuetPipeline

    with pytest.raises(DuetError, match="needs a small model"):
        DuetPipeline(tiny_engine, None).cascade(["What is 1 + 1?"], CascadeSpec("logprob", 0.5))


# --------------------------------------------------------------------------------------------------
# duetlm eval and the report


def duetlm(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "duetlm.cli", *args], capture_output=True, text=True, timeout=300, env=env
    )


def test_eval_cascade_and_oracle_route(tmp_path, tiny_dir, taught_small):
    from duetlm.models import save_pretrained
    from duetlm.report import read_records

    small_dir = save_pretrained(taught_small.model, taught_small.tokenizer, tmp_path / "m")
    bench = tmp_path / "bench.jsonl"
    rows = [{"id": f"s{i}", "problem": q, "answer": "7"} for i, q in enumerate(SURE)]
    rows += [{"id": f"u{i}", "problem": q, "answer": "3"} for i, q in enumerate(UNSURE)]
    bench.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "eval"
    methods = "cascade:logprob@0.5,cascade:logprob@0,cascade:logprob@1,oracle-route"
    r = duetlm(
        "eval", "--large", str(tiny_dir), "--small", str(small_dir), "--benchmarks", str(bench),
        "--methods", methods, "--max-signal-tokens", "6", "--max-answer-tokens", "6",
        "--output", str(out), "--no-progress",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    records = read_records(out / "results.jsonl")
    ran = {x.method for x in records}
    assert ran == {"cascade:logprob@0.5", "cascade:logprob@0", "cascade:logprob@1", "small", "duet"}
    by = {(x.method, x.problem_id): x for x in records}
    for x in records:
        if x.method.startswith("cascade:"):
            threshold = float(x.method.rpartition("@")[2])
            assert x.confidence is not None and x.large_called == calls_large(x.confidence, threshold)
    metrics = {m["method"]: m for m in json.loads((out / "results.json").read_text())["metrics"]}
    assert metrics["cascade:logprob@0"]["large_call_rate"] == 0.0
    assert metrics["cascade:logprob@1"]["large_call_rate"] == 1.0
    assert metrics["cascade:logprob@1"]["large_tokens"] == metrics["duet"]["large_tokens"]
    assert metrics["cascade:logprob@0"]["accuracy"] == metrics["small"]["accuracy"]
    # oracle-route: from the same samples, M exactly where m alone was wrong
    oracle = metrics["oracle-route"]
    wrong = [p for (m, p), x in by.items() if m == "small" and x.correct < 1]
    assert oracle["large_call_rate"] == pytest.approx(len(wrong) / len(rows))
    expect = sum(
        by[("small", p)].correct or by[("duet", p)].correct for _, p in (k for k in by if k[0] == "small")
    )
    assert oracle["accuracy"] == pytest.approx(expect / len(rows))
    assert oracle["large_tokens"] == pytest.approx(
        sum(by[("duet", p)].large_tokens for p in wrong) / len(rows)
    )
    table = (out / "table.md").read_text()
    assert "| oracle-route |" in table and "M called" in table


def test_eval_rejects_bad_cascade_methods(tmp_path):
    from duetlm.evaluate import parse_method

    assert parse_method("cascade:consistency@3@0.5").name == "cascade:consistency@3@0.5"
    with pytest.raises(DuetError, match="valid: logprob, consistency"):
        parse_method("cascade:margin@0.5")
    with pytest.raises(DuetError, match="needs an estimator"):
        parse_method("cascade")


# --------------------------------------------------------------------------------------------------
# duetlm serve --cascade, through the official client


def test_served_cascade_says_whether_m_called_m(tiny_dir, tiny_engine, taught_small, cascade_pipe):
    import httpx
    import openai

    from duetlm.serve import DuetService, ServeConfig, ServerThread, create_app

    conf = [r.confidence for r in cascade_pipe.cascade(QUESTIONS, CascadeSpec("logprob", 0.0))]
    threshold = sorted(conf)[len(conf) // 2]
    expected = cascade_pipe.cascade(QUESTIONS, CascadeSpec("logprob", threshold))
    cfg = ServeConfig(
        large=str(tiny_dir),
        small="m",
        max_signal_tokens=8,
        max_answer_tokens=6,
        cascade=f"logprob@{threshold!r}",
    )
    with ServerThread(create_app(DuetService(cfg, tiny_engine, taught_small))) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        replies = []
        for q in QUESTIONS:
            raw = client.chat.completions.with_raw_response.create(
                model="duet", messages=[{"role": "user", "content": q}]
            )
            replies.append((raw.headers["x-duet-large-called"], raw.parse()))
        streams = {}
        for want in (True, False):  # one question of each kind, streamed
            i = next(i for i, r in enumerate(expected) if r.large_called is want)
            chunks = list(
                client.chat.completions.create(
                    model="duet", messages=[{"role": "user", "content": QUESTIONS[i]}], stream=True
                )
            )
            streams[i] = chunks
        metrics = httpx.get(server.url + "/metrics").text
    for (header, r), e in zip(replies, expected, strict=True):
        duet = r.model_extra["duet"]
        assert duet["large_called"] is e.large_called and header == f"{int(e.large_called)}/1"
        assert duet["confidence"] == pytest.approx(e.confidence, abs=1e-5)
        assert r.choices[0].message.content == e.answer
        assert r.choices[0].message.reasoning_content == e.signal.text
        assert r.usage.large["completion_tokens"] == e.large_tokens
        assert r.usage.small["completion_tokens"] == e.small_tokens  # m's first answer counted too
    for i, chunks in streams.items():
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        reasoning = "".join(
            (c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in chunks if c.choices
        )
        assert (content, reasoning) == (expected[i].answer, expected[i].signal.text)
        last = [c for c in chunks if c.choices and c.choices[0].finish_reason][-1]
        assert last.choices[0].model_extra["duet"]["large_called"] is expected[i].large_called
    called = sum(r.large_called for r in expected) + 1  # the streamed ones: one of each
    skipped = len(expected) - called + 2
    assert f'duetlm_cascade_choices_total{{decision="called"}} {called:.1f}' in metrics
    assert f'duetlm_cascade_choices_total{{decision="skipped"}} {skipped:.1f}' in metrics


def test_serve_cascade_refused_at_start_up(tiny_dir):
    from pydantic import ValidationError

    from duetlm.serve import ServeConfig

    with pytest.raises(ValidationError, match="valid: logprob, consistency"):
        ServeConfig(large=str(tiny_dir), small="m", cascade="entropy@0.5")
    with pytest.raises(ValidationError, match=r"in \[0, 1\]"):
        ServeConfig(large=str(tiny_dir), small="m", cascade="logprob@2")
    with pytest.raises(ValidationError, match="cascade needs role duet"):
        ServeConfig(large=str(tiny_dir), role="large", cascade="logprob@0.5")
