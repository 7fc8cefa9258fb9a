"""`duetlm serve` for real: uvicorn on 127.0.0.1 (ephemeral ports), tiny models, the official `openai`
client; a `--role large` server started by the CLI with a duet server using it as its remote M; the
4xx / 502 / 503 answers. Each server starts once per module."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Literal

import httpx
import openai
import pydantic
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from conftest import start_cli_server
from duetlm import protocol
from duetlm.cli import app as cli_app
from duetlm.engines.base import SamplingParams
from duetlm.engines.remote import RemoteEngine
from duetlm.pipeline import DuetPipeline, build_hf_engine
from duetlm.serve import DuetService, ServeConfig, ServerThread, build_service, create_app
from test_remote import Upstream

Q = "What is 12 + 7?"
SIGNAL_TOKENS, ANSWER_TOKENS, SEED = 16, 12, 3


class Verdict(pydantic.BaseModel):
    """What the JSON-schema tests ask m for: finite, so an untrained m always finishes it."""

    model_config = {"extra": "forbid"}
    answer: Literal["yes", "no", "maybe"]
    sure: bool


@pytest.fixture(scope="module")
def engines(tiny_dir, tiny_llama_dir):
    return build_hf_engine(str(tiny_dir), device="cpu"), build_hf_engine(str(tiny_llama_dir), device="cpu")


@pytest.fixture(scope="module")
def local(engines):
    """The pipeline the servers must reproduce: sampled (so outputs are not degenerate), seeded."""
    large, small = engines
    return DuetPipeline(
        large,
        small,
        large_sampling=SamplingParams(temperature=1.0, max_new_tokens=SIGNAL_TOKENS, seed=SEED),
        small_sampling=SamplingParams(temperature=1.0, max_new_tokens=ANSWER_TOKENS, seed=SEED),
    )


def start(cfg: ServeConfig, large, small=None) -> ServerThread:
    return ServerThread(create_app(DuetService(cfg, large, small))).__enter__()


@pytest.fixture(scope="module")
def duet_url(tiny_dir, tiny_llama_dir):
    cfg = ServeConfig(
        large=str(tiny_dir),
        small=str(tiny_llama_dir),
        device="cpu",
        max_signal_tokens=SIGNAL_TOKENS,
        max_answer_tokens=ANSWER_TOKENS,
        batch_window_ms=10,
        max_tokens_limit=512,
        max_body_bytes=20_000,
    )
    server = ServerThread(create_app(build_service(cfg))).__enter__()
    yield server.url
    server.__exit__()


@pytest.fixture(scope="module")
def client(duet_url):
    return openai.OpenAI(base_url=duet_url + "/v1", api_key="unused", max_retries=0)


def ask(client, stream=False, **kwargs):
    return client.chat.completions.create(
        model=kwargs.pop("model", "duet"),
        messages=[{"role": "user", "content": kwargs.pop("question", Q)}],
        temperature=kwargs.pop("temperature", 1.0),
        seed=SEED,
        max_tokens=kwargs.pop("max_tokens", ANSWER_TOKENS),
        stream=stream,
        **kwargs,
    )


def test_openai_client_gets_signal_answer_and_usage(client, local):
    (expected,) = local.run([Q])
    r = ask(client)
    msg = r.choices[0].message
    assert msg.reasoning_content == expected.signal.text
    assert msg.reasoning == expected.signal.text  # vLLM's name for it, for clients that read that one
    assert msg.content == expected.answer
    assert r.choices[0].finish_reason == expected.small_finish
    u = r.usage
    large = {
        "prompt_tokens": len(expected.large.prompt_token_ids),
        "completion_tokens": expected.large_tokens,
    }
    small = {
        "prompt_tokens": len(expected.small.prompt_token_ids),
        "completion_tokens": expected.small_tokens,
    }
    assert (u.large, u.small) == (large, small)
    assert u.prompt_tokens == large["prompt_tokens"] + small["prompt_tokens"]
    assert u.completion_tokens == expected.large_tokens + expected.small_tokens
    assert u.completion_tokens_details.reasoning_tokens == expected.large_tokens


def test_streaming_matches_the_plain_answer(client):
    plain = ask(client)
    chunks = list(ask(client, stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert (
        "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
        == plain.choices[0].message.reasoning_content
    )
    assert [getattr(d, "reasoning", None) for d in deltas] == [
        getattr(d, "reasoning_content", None) for d in deltas
    ]
    assert "".join(d.content or "" for d in deltas) == plain.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        plain.choices[0].finish_reason
    ]
    assert chunks[-1].usage.model_dump() == plain.usage.model_dump()
    # token by token: M's signal and m's answer each arrive in several deltas, the signal first
    kinds = [
        ("r" if getattr(d, "reasoning_content", None) else "c")
        for d in deltas
        if d.content or getattr(d, "reasoning_content", None)
    ]
    assert kinds.count("r") >= 3 and kinds.count("c") >= 3, kinds
    assert kinds == sorted(kinds, key=lambda k: k == "c"), kinds


def test_n_choices_streamed_or_not(client):
    one = ask(client)
    many = ask(client, n=3)
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert many.choices[0].message.content == one.choices[0].message.content  # choice i: seed + i
    assert many.choices[0].message.reasoning_content == one.choices[0].message.reasoning_content
    signals = {c.message.reasoning_content for c in many.choices}
    assert len(signals) == 3  # sampled with different seeds
    u = many.usage
    assert u.large["prompt_tokens"] == one.usage.large["prompt_tokens"]  # M's prompt counted once
    assert u.completion_tokens == u.large["completion_tokens"] + u.small["completion_tokens"]
    assert u.completion_tokens_details.reasoning_tokens == u.large["completion_tokens"]
    chunks = list(ask(client, n=3, stream=True, stream_options={"include_usage": True}))
    for c in many.choices:
        mine = [ch.choices[0] for ch in chunks if ch.choices and ch.choices[0].index == c.index]
        assert "".join(x.delta.content or "" for x in mine) == c.message.content
        assert "".join(x.delta.model_extra.get("reasoning_content") or "" for x in mine) == (
            c.message.reasoning_content
        )
        assert [x.finish_reason for x in mine if x.finish_reason] == [c.finish_reason]
    assert chunks[-1].usage.model_dump() == many.usage.model_dump()


def test_stop_strings_cut_the_answer_streamed_or_not(client):
    full = ask(client).choices[0].message.content
    # a stop string from the (random) answer: its first two printable ASCII characters after the start
    at = next(i for i in range(1, len(full) - 1) if full[i : i + 2].isascii() and full[i : i + 2].isalnum())
    stop = full[at : at + 2]
    cut = full[: full.find(stop)].strip()
    plain = ask(client, stop=[stop]).choices[0].message.content
    streamed = "".join(
        c.choices[0].delta.content or "" for c in ask(client, stream=True, stop=[stop]) if c.choices
    )
    assert plain == streamed == cut


def test_a_client_that_leaves_mid_stream_frees_its_slot(duet_url):
    body = {**user("What is 3 + 4?"), "stream": True, "max_tokens": 200}
    with httpx.stream("POST", duet_url + "/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        first = next(r.iter_lines())
        assert first.startswith("data: ")
    deadline = time.monotonic() + 30
    while httpx.get(duet_url + "/health").json()["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert httpx.get(duet_url + "/health").json()["in_flight"] == 0


def test_models_and_health(client, duet_url):
    assert [m.id for m in client.models.list().data] == ["duet", "duet:small", "duet:large"]
    health = httpx.get(duet_url + "/health").json()
    assert health["status"] == "ok" and health["role"] == "duet" and health["in_flight"] == 0


def test_concurrent_requests_share_engine_calls(engines, tiny_dir):
    large, small = engines
    cfg = ServeConfig(
        large=str(tiny_dir),
        small="m",
        batching="window",
        max_batch=4,
        batch_window_ms=3000,
        max_answer_tokens=4,
    )
    server = start(cfg, large, small)
    questions = ["What is 1 + 1?", "Compute 3 * (4 + 5) please.", "A train travels 60 miles.", "hmm, 6 * 7?"]
    try:
        with ThreadPoolExecutor(4) as pool:
            replies = list(
                pool.map(
                    lambda q: httpx.post(
                        server.url + "/v1/chat/completions",
                        json={
                            "model": "duet",
                            "messages": [{"role": "user", "content": q}],
                            "max_signal_tokens": 4,
                        },
                        timeout=120,
                    ).json(),
                    questions,
                )
            )
        stages = httpx.get(server.url + "/health").json()["stages"]
    finally:
        server.__exit__()
    assert stages["large"] == {"calls": 1, "requests": 4, "mean_batch": 4.0}
    assert stages["small"] == {"calls": 1, "requests": 4, "mean_batch": 4.0}
    # Each reply belongs to its own question: its M prompt length is that question's.
    for q, reply in zip(questions, replies, strict=True):
        prompt = protocol.large_prompt(large.tokenizer, q)
        assert reply["usage"]["large"]["prompt_tokens"] == large.count_tokens(prompt)


def test_system_messages_ignored_or_refused_when_the_server_says_so(engines):
    """--system-messages ignore: a [system, user] request gets what the user message alone gets
    (seeded); reject: a 400 that names the option."""
    server = start(ServeConfig(large="M", small="m", max_signal_tokens=8, system_messages="ignore"), *engines)
    seeded = {"temperature": 1.0, "seed": SEED, "max_tokens": 8}
    try:
        system = {"role": "system", "content": "You are a helpful assistant."}
        with_system = post(server.url, {**user(Q), **seeded, "messages": [system, user(Q)["messages"][0]]})
        alone = post(server.url, {**user(Q), **seeded})
        two_users = post(server.url, {**user(Q), "messages": [user(Q)["messages"][0]] * 2})
    finally:
        server.__exit__()
    assert with_system.status_code == alone.status_code == 200
    pick = lambda r: r.json()["choices"][0]["message"]  # noqa: E731
    assert pick(with_system) == pick(alone)
    assert two_users.status_code == 400 and "alternate" in two_users.json()["error"]["message"]
    server = start(ServeConfig(large="M", small="m", max_signal_tokens=8, system_messages="reject"), *engines)
    try:
        refused = post(server.url, {**user(Q), "messages": [system, user(Q)["messages"][0]]})
    finally:
        server.__exit__()
    assert refused.status_code == 400 and "--system-messages reject" in refused.json()["error"]["message"]


def test_a_conversation_reaches_both_models_through_their_templates(engines):
    """Two turns and a system message: the served answer is the pipeline's on the same conversation
    (protocol.conversation_question), and the prompts hold the history as the protocol says."""
    large, small = engines
    greedy = {"max_signal_tokens": SIGNAL_TOKENS, "max_answer_tokens": ANSWER_TOKENS}
    history = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And times 3?"},
    ]
    pipe = DuetPipeline(
        large,
        small,
        large_sampling=SamplingParams(temperature=0.0, max_new_tokens=SIGNAL_TOKENS),
        small_sampling=SamplingParams(temperature=0.0, max_new_tokens=ANSWER_TOKENS),
    )
    results = {}
    for mode in ("both", "small"):
        server = start(ServeConfig(large="M", small="m", system_messages=mode, **greedy), *engines)
        try:
            c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
            results[mode] = c.chat.completions.create(model="duet", messages=history).choices[0].message
            streamed = [
                ch
                for ch in c.chat.completions.create(model="duet", messages=history, stream=True)
                if ch.choices
            ]
        finally:
            server.__exit__()
        assert "".join(ch.choices[0].delta.content or "" for ch in streamed) == results[mode].content
    for mode, marked in (
        ("both", history),
        ("small", [{**history[0], protocol.SMALL_ONLY: True}, *history[1:]]),
    ):
        expected = pipe.run([protocol.conversation_question(marked)])[0]
        assert (results[mode].reasoning_content, results[mode].content) == (
            expected.signal.text,
            expected.answer,
        )
    # the prompts: history in order, M's instruction on the last user turn only, z opening m's last turn
    question = protocol.conversation_question(history)
    large_prompt = pipe.think_prompts([question])[0]
    small_prompt = pipe.answer_prompts([question], ["S1 +1 5"])[0]
    assert large_prompt.count(protocol.LARGE_INSTRUCTION.strip()) == 1
    assert large_prompt.index("What is 2 + 2?") < large_prompt.index("And times 3?")
    assert protocol.LARGE_INSTRUCTION.strip() in large_prompt[large_prompt.index("And times 3?") :]
    assert "Answer briefly." in small_prompt and small_prompt.endswith(protocol.thinking_block("S1 +1 5"))
    only_m = protocol.conversation_question([{**history[0], protocol.SMALL_ONLY: True}, *history[1:]])
    assert "Answer briefly." not in pipe.think_prompts([only_m])[0]
    assert "Answer briefly." in pipe.answer_prompts([only_m], [""])[0]
    # a single user message is the bare question: single-turn prompts are what they always were
    assert protocol.conversation_question([{"role": "user", "content": Q}]) == Q


def test_continuous_batching_lets_a_late_short_request_overtake_a_long_one(engines):
    """A short request sent while a long answer is being written joins m's running batch and is done
    first; with windowed batching it would wait for the long answer's batch to end."""
    cfg = ServeConfig(large="M", small="m", max_signal_tokens=4, max_tokens_limit=1000)
    server = start(cfg, *engines)
    events: dict[str, float] = {}
    writing = threading.Event()

    def long_request() -> None:
        # Seed 0: the tiny m writes all 300 tokens (sampled: greedy would repeat a newline, not shown).
        body = {**user(Q), "stream": True, "max_tokens": 300, "temperature": 1.0, "seed": 0}
        body["stream_options"] = {"include_usage": True}
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if '"content": "' in line and '"content": ""' not in line:
                    writing.set()
                if '"usage"' in line and '"choices": []' in line:
                    events["long_tokens"] = json.loads(line[6:])["usage"]["small"]["completion_tokens"]
        events["long_done"] = time.monotonic()

    try:
        thread = threading.Thread(target=long_request)
        thread.start()
        assert writing.wait(60), "the long answer never started"
        short = post(server.url, {**user("What is 3 + 4?"), "max_tokens": 2})
        events["short_done"] = time.monotonic()
        thread.join(120)
        stats = httpx.get(server.url + "/health").json()["stages"]["small"]
    finally:
        server.__exit__()
    assert short.status_code == 200
    assert events["long_tokens"] == 300
    assert events["short_done"] < events["long_done"]
    assert stats["peak_batch"] >= 2 and stats["requests"] == 2


def post(url, body=None, **kwargs):
    kwargs.setdefault("json", body)
    return httpx.post(url + "/v1/chat/completions", timeout=60, **kwargs)


def user(content="hi"):
    return {"model": "duet", "messages": [{"role": "user", "content": content}]}


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"model": "duet"}, 400, "messages is required"),
        ({"model": "duet", "messages": []}, 400, "messages is empty"),
        ({"model": "duet", "messages": "hi"}, 400, "messages: Input should be a valid list"),
        ({"messages": [{"role": "user", "content": "hi"}]}, 400, "model: Field required"),
        (
            {"model": "duet", "messages": [{"role": "robot", "content": "hi"}]},
            400,
            "messages[0].role 'robot'",
        ),
        ({"model": "duet", "messages": [{"role": "user"}]}, 400, "messages[0].content is missing"),
        (
            {"model": "duet", "messages": [{"role": "user", "content": "  "}]},
            400,
            "messages[0].content is empty",
        ),
        (
            {
                "model": "duet",
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
            },
            400,
            "messages[0].content[0]: only text parts",
        ),
        (
            {
                "model": "duet",
                "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
            },
            400,
            "the last message must come from the user",
        ),
        (
            {
                "model": "duet",
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "system", "content": "b"},
                    {"role": "user", "content": "c"},
                ],
            },
            400,
            "messages[1]: system messages must come first",
        ),
        ({**user(), "max_tokens": 10**9}, 400, "max_tokens must be between 1 and 512 (got 1000000000)"),
        ({**user(), "max_tokens": 0}, 400, "max_tokens must be between 1 and 512"),
        ({**user(), "max_signal_tokens": 100000}, 400, "max_signal_tokens must be between 1 and 512"),
        ({**user(), "temperature": "hot"}, 400, "temperature: Input should be a valid number"),
        ({**user(), "n": 99}, 400, "n must be between 1 and 8"),
        ({**user(), "model": "gpt-9"}, 404, "model 'gpt-9' is not served here; this server serves 'duet'"),
        ([1, 2], 400, "the body must be a JSON object"),
        # fields the server does not honour: a 400 naming them, never a 200 that ignored them
        (
            {**user(), "tools": [{"type": "function", "function": {"name": "f"}}]},
            400,
            "tools is not supported",
        ),
        ({**user(), "reasoning_effort": "low"}, 400, "reasoning_effort is not supported"),
        # decoding controls: honoured (test_served_decoding_controls_*), out of range a 400
        ({**user(), "response_format": {"type": "xml"}}, 400, "response_format.type 'xml' is not supported"),
        ({**user(), "response_format": {}}, 400, "response_format.type is required"),
        (
            {**user(), "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            400,
            "response_format.json_schema.schema must be a JSON schema object",
        ),
        (
            {
                **user(),
                "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}},
            },
            400,
            "the JSON schema cannot be compiled",
        ),
        (
            {**user(), "presence_penalty": 2.5},
            400,
            "presence_penalty: Input should be less than or equal to 2",
        ),
        (
            {**user(), "frequency_penalty": -3},
            400,
            "frequency_penalty: Input should be greater than or equal",
        ),
        ({**user(), "logit_bias": {"42": 500}}, 400, "logit_bias['42'] must be between -100 and 100"),
        ({**user(), "logit_bias": {"x": 1}}, 400, "logit_bias key 'x' is not a token id"),
        ({**user(), "logit_bias": {"99999": 1}}, 400, "logit_bias token id 99999 is outside the vocabulary"),
        ({**user(), "repetition_penalty": 0}, 400, "repetition_penalty: Input should be greater than 0"),
        ({**user(), "min_p": 1.5}, 400, "min_p: Input should be less than or equal to 1"),
        (
            {**user(), "model": "duet:large", "response_format": {"type": "json_object"}},
            400,
            "response_format is not served on the :large route",
        ),
        ({**user(), "best_of": 3}, 400, "unknown field 'best_of'; this server reads: model, messages,"),
    ],
)
def test_bad_requests_get_clear_4xx(duet_url, body, status, needle):
    r = post(duet_url, body)
    assert r.status_code == status
    err = r.json()["error"]
    assert needle in err["message"] and err["type"]


def test_unsupported_fields_at_their_neutral_value_and_bookkeeping_fields_are_accepted(duet_url):
    neutral = {
        "response_format": {"type": "text"},
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
        "repetition_penalty": 1,
        "min_p": 0,
        "logit_bias": {},
        "tools": [],
        "tool_choice": "none",
        "user": "someone",
        "metadata": {"k": "v"},
    }
    plain = post(duet_url, {**user(), "max_tokens": 4})
    r = post(duet_url, {**user(), "max_tokens": 4, **neutral})
    assert r.status_code == 200 and plain.status_code == 200, r.text
    assert r.json()["choices"][0]["message"] == plain.json()["choices"][0]["message"]


def test_every_response_has_a_request_id_and_an_access_log_line(duet_url, client):
    import logging

    from duetlm.serve.app import ACCESS_LOG

    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    ACCESS_LOG.addHandler(handler)
    ACCESS_LOG.setLevel(logging.INFO)
    try:
        mine = post(duet_url, {**user(), "max_tokens": 4}, headers={"x-request-id": "trace-42"})
        assert mine.status_code == 200 and mine.headers["x-request-id"] == "trace-42"
        fresh = [post(duet_url, {**user(), "max_tokens": 4}).headers["x-request-id"] for _ in range(2)]
        assert len(set(fresh)) == 2 and all(re.fullmatch(r"[0-9a-f]{32}", f) for f in fresh)
        forged = post(duet_url, {**user(), "max_tokens": 4}, headers={"x-request-id": 'x" injected'})
        assert re.fullmatch(r"[0-9a-f]{32}", forged.headers["x-request-id"])  # not a plain token: replaced
        assert (
            httpx.get(duet_url + "/nowhere", headers={"x-request-id": "r404"}).headers["x-request-id"]
            == "r404"
        )
        raw = client.chat.completions.with_raw_response.create(
            model="duet", messages=[{"role": "user", "content": Q}], max_tokens=4, stream=True
        )
        streamed_id = raw.headers["x-request-id"]
        list(raw.parse())
    finally:
        ACCESS_LOG.removeHandler(handler)
    entries = [json.loads(line) for line in lines]
    by_id = {e["request_id"]: e for e in entries}
    assert by_id["trace-42"]["status"] == 200 and by_id["trace-42"]["path"] == "/v1/chat/completions"
    assert by_id["r404"]["status"] == 404 and by_id[streamed_id]["stream"] is True
    assert all(e["ms"] >= 0 and e["method"] in ("GET", "POST") for e in entries)


def test_unparseable_and_oversized_bodies(duet_url, client):
    r = post(
        duet_url, content=b'{"model": "duet", "messages": [', headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = post(duet_url, user("x" * 30_000))
    assert r.status_code == 413 and "limit is 20000" in r.json()["error"]["message"]

    def chunked():  # no Content-Length: the limit holds while reading
        yield b'{"model": "duet", "messages": [{"role": "user", "content": "'
        for _ in range(30):
            yield b"x" * 1000
        yield b'"}]}'

    r = post(duet_url, content=chunked(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    r = httpx.get(duet_url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    with pytest.raises(openai.BadRequestError, match="messages\\[0\\].role"):
        client.chat.completions.create(model="duet", messages=[{"role": "robot", "content": "hi"}])
    assert httpx.get(duet_url + "/health").json()["in_flight"] == 0


# -- two servers: M behind `duetlm serve --role large`, m local in a duet server ------------------------


def cli_server(args: list[str]):
    """`duetlm serve ARGS` in its own process (`conftest.start_cli_server`): yields the URL."""
    proc, url, _ = start_cli_server(
        [*args, "--device", "cpu"], 120, {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    )
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def large_cli_url(tiny_dir):
    """`duetlm serve --role large` in its own process."""
    args = ["--role", "large", "--large", str(tiny_dir), "--max-signal-tokens", str(SIGNAL_TOKENS)]
    yield from cli_server(args)


@pytest.fixture(scope="module")
def small_cli_url(tiny_llama_dir):
    """`duetlm serve --role small` (m alone) in its own process."""
    args = ["--role", "small", "--small", str(tiny_llama_dir), "--max-answer-tokens", str(ANSWER_TOKENS)]
    yield from cli_server(args)


def test_role_large_serves_m_thinking(large_cli_url, local):
    c = openai.OpenAI(base_url=large_cli_url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in c.models.list().data] == ["large"]
    options = dict(model="large", messages=protocol.large_messages(Q), temperature=1.0, seed=SEED)
    r = c.chat.completions.create(**options, max_tokens=SIGNAL_TOKENS)
    (expected,) = local.think([Q])
    assert r.choices[0].message.reasoning_content == protocol.extract_signal(expected[0].text).text
    assert r.choices[0].message.content == ""
    streamed = c.chat.completions.create(**options, max_tokens=SIGNAL_TOKENS, stream=True)
    deltas = [ch.choices[0].delta.model_extra.get("reasoning_content") for ch in streamed if ch.choices]
    assert "".join(d or "" for d in deltas) == r.choices[0].message.reasoning_content
    assert sum(1 for d in deltas if d) >= 3
    assert r.usage.completion_tokens == expected[0].num_tokens
    assert r.usage.prompt_tokens == len(expected[0].prompt_token_ids)


def test_duet_server_with_a_remote_large_reproduces_the_local_pipeline(large_cli_url, engines, local):
    remote = RemoteEngine(large_cli_url, api_key="")
    assert remote.count_tokens("What is 12 + 7?") == engines[0].count_tokens("What is 12 + 7?")
    cfg = ServeConfig(
        large_url=large_cli_url, small="m", max_signal_tokens=SIGNAL_TOKENS, max_answer_tokens=ANSWER_TOKENS
    )
    server = start(cfg, remote, engines[1])
    try:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        r = ask(c)
        streamed = list(ask(c, stream=True))
        # The last int64 seed with n > 1: choice i's seed wraps within int64, which the remote accepts
        edge = c.chat.completions.create(
            model="duet", messages=[{"role": "user", "content": Q}], n=3, seed=2**63 - 1, max_tokens=4
        )
    finally:
        server.__exit__()
    assert len(edge.choices) == 3
    (expected,) = local.run([Q])
    assert r.choices[0].message.reasoning_content == expected.signal.text
    assert r.choices[0].message.content == expected.answer
    assert r.usage.large == {
        "prompt_tokens": len(expected.large.prompt_token_ids),
        "completion_tokens": expected.large_tokens,
    }
    assert r.model_extra["duet"]["signal_complete"] == expected.signal.complete
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices) == expected.answer
    # M's signal streams across both servers: the role-large server streams its tokens, the remote
    # engine relays the text as it comes
    thinking = [ch.choices[0].delta.model_extra.get("reasoning_content") for ch in streamed if ch.choices]
    assert "".join(t or "" for t in thinking) == expected.signal.text
    assert sum(1 for t in thinking if t) >= 3


# -- upstream failures and a full queue ----------------------------------------------------------------


def test_upstream_failure_is_a_502_naming_it(engines):
    up = Upstream(fail=99, status=500)
    remote = RemoteEngine(up.url, model="m", max_retries=1, backoff=0.01, api_key="")
    server = start(ServeConfig(large_url=up.url, small="m"), remote, engines[1])
    try:
        r = post(server.url, user())
    finally:
        server.__exit__()
        up.close()
    assert r.status_code == 502
    err = r.json()["error"]
    assert err["type"] == "upstream_error"
    assert (
        f"the large model (M) failed upstream: remote model at {up.url}/v1/chat/completions answered HTTP 500"
        in err["message"]
    )


def test_a_full_queue_answers_503_at_once_and_recovers(engines):
    up = Upstream()
    up.gate.clear()  # the upstream M holds every request until released
    remote = RemoteEngine(up.url, model="m", max_retries=0, api_key="")
    server = start(
        ServeConfig(large_url=up.url, small="m", max_queue=1, max_answer_tokens=4), remote, engines[1]
    )
    try:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(post, server.url, user("first"))
            deadline = time.monotonic() + 30
            while httpx.get(server.url + "/health").json()["in_flight"] < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            second = post(server.url, user("second"))
            up.gate.set()
            first = first.result()
        after = post(server.url, user("third"))
    finally:
        server.__exit__()
        up.close()
    assert second.status_code == 503
    assert second.headers["retry-after"] == "1"
    assert second.json()["error"]["type"] == "server_overloaded"
    assert first.status_code == 200 and after.status_code == 200
    assert first.json()["choices"][0]["message"]["reasoning_content"] == "I read: first Let's"


# -- the command line ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--small", "m"], "exactly one of large"),
        (["--large", "M", "--large-url", "http://x:1", "--small", "m"], "exactly one of large"),
        (["--large", "M"], "role duet needs exactly one of small (m) and small_url"),
        (
            ["--large", "M", "--small", "m", "--small-url", "http://x:1"],
            "exactly one of small (m) and small_url",
        ),
        (["--role", "large", "--large", "M", "--small", "m"], "drop small"),
        (["--role", "large", "--large", "M", "--small-url", "http://x:1"], "drop small"),
        (["--role", "small", "--large", "M", "--small", "m"], "role small serves m alone"),
        (["--role", "small"], "role small serves m alone"),
        (["--role", "both", "--large", "M"], "role"),
        (["--large", "M", "--small", "m", "--max-batch", "0"], "max_batch"),
    ],
)
def test_serve_cli_rejects_bad_options(args, needle):
    result = CliRunner().invoke(cli_app, ["serve", *args])
    assert result.exit_code == 1
    assert needle in result.output


def test_an_api_key_guards_every_route_but_health(engines):
    cfg = ServeConfig(large="M", small="m", api_key="s3cret", max_signal_tokens=4, max_answer_tokens=4)
    server = start(cfg, *engines)
    try:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as err:
            c.chat.completions.create(model="duet", messages=[{"role": "user", "content": Q}])
        assert err.value.body["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            c.models.list()
        anonymous = httpx.post(server.url + "/v1/chat/completions", json=user(Q))
        assert (
            anonymous.status_code == 401 and "Authorization: Bearer" in anonymous.json()["error"]["message"]
        )
        assert httpx.get(server.url + "/health").status_code == 200
        ok = openai.OpenAI(base_url=server.url + "/v1", api_key="s3cret", max_retries=0)
        assert ok.chat.completions.create(model="duet", messages=[{"role": "user", "content": Q}]).choices
    finally:
        server.__exit__()


def test_prometheus_metrics_count_requests_tokens_and_signals(engines):
    from prometheus_client.parser import text_string_to_metric_families

    server = start(ServeConfig(large="M", small="m", max_signal_tokens=8, max_answer_tokens=8), *engines)
    try:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        plain = ask(c)
        chunks = list(ask(c, stream=True, stream_options={"include_usage": True}))
        assert post(server.url, {"model": "duet"}).status_code == 400
        c.models.list()
        scraped = httpx.get(server.url + "/metrics")
    finally:
        server.__exit__()
    assert scraped.status_code == 200 and scraped.headers["content-type"].startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(scraped.text)
        for s in family.samples
    }

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    route = "/v1/chat/completions"
    assert value("duetlm_http_requests_total", route=route, status="200") == 2
    assert value("duetlm_http_requests_total", route=route, status="400") == 1
    assert value("duetlm_http_requests_total", route="/v1/models", status="200") == 1
    assert value("duetlm_request_seconds_count", stream="false") == 1
    assert value("duetlm_request_seconds_count", stream="true") == 1
    streamed_usage = chunks[-1].usage
    for model in ("large", "small"):
        for kind in ("prompt", "completion"):
            expected = (
                getattr(plain.usage, model)[f"{kind}_tokens"]
                + getattr(streamed_usage, model)[f"{kind}_tokens"]
            )
            assert value("duetlm_tokens_total", model=model, kind=kind) == expected
    assert value("duetlm_signal_tokens_count") == 2
    assert (
        value("duetlm_signal_tokens_sum") == plain.usage.large["completion_tokens"] * 2
    )  # same seed, same z
    if plain.choices[0].message.reasoning_content:  # the stream showed signal text once
        assert value("duetlm_time_to_first_output_seconds_count", part="signal") == 1
    assert value("duetlm_requests_in_flight") == 0
    assert value("duetlm_batch_mean", stage="small") > 0


def test_logprobs_of_m_answer_streamed_or_not(client, local, engines):
    r = ask(client, logprobs=True)
    (expected,) = replace(local, small_sampling=replace(local.small_sampling, logprobs=True)).run([Q])
    ids = expected.small.token_ids
    if ids and ids[-1] in engines[1].eos_ids:
        ids = ids[:-1]
    entries = r.choices[0].logprobs.content
    assert [e.logprob for e in entries] == pytest.approx(expected.small.logprobs[: len(ids)], abs=1e-6)
    assert [e.token for e in entries] == [engines[1].tokenizer.decode([t]) for t in ids]
    assert all(e.logprob <= 0 and e.top_logprobs == [] for e in entries)
    chunks = list(ask(client, logprobs=True, stream=True))
    streamed = [
        e for ch in chunks if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content
    ]
    assert [e.logprob for e in streamed] == [e.logprob for e in entries]
    assert ask(client).choices[0].logprobs is None


def test_top_logprobs_of_m_answer(client, local, engines):
    """top_logprobs: the k most likely tokens at each answer position, most likely first, under the
    distribution the sampled token's log-prob comes from; asking for them changes no sampled token."""
    r = ask(client, logprobs=True, top_logprobs=3)
    plain = ask(client, logprobs=True)
    sp = replace(local.small_sampling, logprobs=True, top_logprobs=3)
    (expected,) = replace(local, small_sampling=sp).run([Q])
    entries = r.choices[0].logprobs.content
    assert [e.token for e in entries] == [e.token for e in plain.choices[0].logprobs.content]
    assert entries, "m wrote no answer token"
    tok = engines[1].tokenizer
    for k, e in enumerate(entries):
        tops = e.top_logprobs
        assert len(tops) == 3
        assert [t.logprob for t in tops] == sorted((t.logprob for t in tops), reverse=True)
        assert [t.token for t in tops] == [tok.decode([i]) for i, _ in expected.small.top_logprobs[k]]
        assert [t.logprob for t in tops] == pytest.approx(
            [v for _, v in expected.small.top_logprobs[k]], abs=1e-6
        )
        assert e.logprob <= tops[0].logprob + 1e-6
        sampled = expected.small.token_ids[k]  # where it is among the top 3: the same log-prob there
        for token_id, value in expected.small.top_logprobs[k]:
            if token_id == sampled:
                assert value == pytest.approx(e.logprob, abs=1e-6)
    streamed = [
        e
        for ch in ask(client, logprobs=True, top_logprobs=3, stream=True)
        if ch.choices and ch.choices[0].logprobs
        for e in ch.choices[0].logprobs.content
    ]
    assert [[t.token for t in e.top_logprobs] for e in streamed] == [
        [t.token for t in e.top_logprobs] for e in entries
    ]
    base = str(client.base_url).removesuffix("/v1/")
    bad = post(base, {**user(), "top_logprobs": 2})
    assert bad.status_code == 400 and "top_logprobs needs logprobs" in bad.json()["error"]["message"]
    bad = post(base, {**user(), "logprobs": True, "top_logprobs": 21})
    assert bad.status_code == 400 and "top_logprobs" in bad.json()["error"]["message"]


@pytest.mark.parametrize("batching", ["continuous", "window"])
def test_an_over_long_question_is_a_400_naming_the_limit(engines, batching):
    server = start(ServeConfig(large="M", small="m", batching=batching), *engines)
    try:
        # ~1,500 tokens of the tiny vocabulary: more than the tiny M's 1,024 positions
        r = post(server.url, user("What is 12 + 7? " * 300))
        in_flight = httpx.get(server.url + "/health").json()["in_flight"]
    finally:
        server.__exit__()
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    assert (
        "the large model cannot take this request" in message and "max_position_embeddings (1024)" in message
    )
    assert in_flight == 0


_OPTIONS = {
    "max_tokens": st.one_of(st.none(), st.integers(-5, 600)),
    "max_completion_tokens": st.one_of(st.none(), st.integers(-5, 600)),
    "max_signal_tokens": st.one_of(st.none(), st.integers(-5, 600)),
    "temperature": st.one_of(st.none(), st.floats(-1, 3, allow_nan=False)),
    "top_p": st.floats(-0.5, 1.5, allow_nan=False),
    "top_k": st.integers(-3, 100_000),
    "n": st.integers(-1, 10),
    "seed": st.one_of(st.none(), st.integers(-(2**70), 2**70)),
    "stop": st.one_of(st.none(), st.text(max_size=4), st.lists(st.text(max_size=4), max_size=5)),
    "stream": st.booleans(),
    "logprobs": st.booleans(),
    "top_logprobs": st.one_of(st.none(), st.integers(-2, 25)),
    "presence_penalty": st.floats(-3, 3, allow_nan=False),
    "frequency_penalty": st.floats(-3, 3, allow_nan=False),
    "repetition_penalty": st.floats(-1, 12, allow_nan=False),
    "min_p": st.floats(-0.5, 1.5, allow_nan=False),
    "logit_bias": st.dictionaries(
        st.one_of(st.integers(-5, 400).map(str), st.text(max_size=3)), st.floats(-150, 150), max_size=4
    ),
    "response_format": st.sampled_from(
        [
            {"type": "text"},
            {"type": "json_object"},
            {"type": "json_schema", "json_schema": {"name": "v", "schema": Verdict.model_json_schema()}},
            {"type": "json_schema", "json_schema": {"schema": {"type": "string", "maxLength": 3}}},
            {"type": "regex"},
        ]
    ),
}


# derandomize: the same examples in every run (CI stays reproducible); the @examples are cases this
# test once found: a temperature whose inverse overflows, and seeds beyond int64.
@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@example(options={"temperature": 4e-69}, content="0", system=None)
@example(options={"seed": 2**64, "n": 2, "temperature": 1.0}, content="hi", system=None)
@example(options={"seed": 2**63 - 1, "n": 8, "temperature": 1.0, "stream": True}, content="hi", system=None)
@given(
    options=st.fixed_dictionaries({}, optional=_OPTIONS),
    content=st.text(max_size=40),
    system=st.one_of(st.none(), st.text(max_size=20)),
)
def test_any_options_get_an_answer_or_a_400(duet_url, options, content, system):
    """Fuzzed request options (out-of-range numbers, huge seeds, odd stop strings, streaming or not)
    get a complete answer or a 400 that says what is wrong: never a 5xx, never a broken stream."""
    messages = [{"role": "system", "content": system}] if system is not None else []
    body = {"model": "duet", "messages": [*messages, {"role": "user", "content": content}], **options}
    r = post(duet_url, body)
    assert r.status_code in (200, 400), (body, r.status_code, r.text)
    if r.status_code == 400:
        assert r.json()["error"]["message"]
    elif options.get("stream"):
        events = [line.removeprefix("data: ") for line in r.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and not any('"error"' in e for e in events), r.text[-500:]
    else:
        assert len(r.json()["choices"]) == options.get("n", 1)


def test_openapi_documents_the_chat_body_and_errors(duet_url):
    """/openapi.json describes the request body (the handler parses it itself) and the error answers,
    so clients and schema fuzzers (schemathesis) see the real API; a 405 names the allowed methods."""
    spec = httpx.get(duet_url + "/openapi.json", timeout=10).json()
    op = spec["paths"]["/v1/chat/completions"]["post"]
    body = op["requestBody"]["content"]["application/json"]["schema"]
    assert body["properties"]["model"]["enum"] == ["duet", "duet:small", "duet:large"]
    assert {"model", "messages"} <= set(body["required"])
    ref = body["properties"]["messages"]["items"]["$ref"].rsplit("/", 1)[-1]
    assert spec["components"]["schemas"][ref]["properties"]["role"]["enum"] == ["system", "user", "assistant"]
    assert body["properties"]["top_logprobs"]["anyOf"][0]["maximum"] == 20
    assert {"400", "401", "404", "413", "502", "503"} <= set(op["responses"])
    assert "text/plain" in spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    r = httpx.put(duet_url + "/v1/chat/completions", timeout=10)
    assert r.status_code == 405 and r.headers["allow"] == "POST"


def test_a_batcher_that_never_started_stops_cleanly():
    # A service that fails during start-up stops its batchers; those not yet started have nothing to stop.
    import asyncio

    from duetlm.serve.batching import WindowBatcher

    with ThreadPoolExecutor(1) as pool:
        batcher = WindowBatcher("m", lambda key, payloads, sinks: payloads, pool, max_batch=2, window_s=0.01)
        asyncio.run(batcher.stop())

        async def start_submit_stop():
            batcher.start()
            result = await batcher.submit("k", "payload")
            await batcher.stop()
            return result

        assert asyncio.run(start_submit_stop()) == "payload"


def test_the_signal_cache_reuses_m_for_identical_greedy_requests(engines):
    from prometheus_client.parser import text_string_to_metric_families

    cfg = ServeConfig(
        large="M", small="m", signal_cache=8, max_signal_tokens=SIGNAL_TOKENS, max_answer_tokens=6
    )
    server = start(cfg, *engines)

    def m_requests() -> int:
        return httpx.get(server.url + "/health").json()["stages"]["large"]["requests"]

    try:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        msgs = [{"role": "user", "content": Q}]
        first = c.chat.completions.create(model="duet", messages=msgs)
        before = m_requests()
        again = c.chat.completions.create(model="duet", messages=msgs)
        assert m_requests() == before  # M was not called
        assert again.choices[0].message.content == first.choices[0].message.content
        assert again.choices[0].message.reasoning_content == first.choices[0].message.reasoning_content
        assert (
            again.model_extra["duet"]["signal_cached"] is True
            and "signal_cached" not in first.model_extra["duet"]
        )
        # streamed, a cached signal arrives as one reasoning delta; the deltas add up to the same response
        chunks = list(c.chat.completions.create(model="duet", messages=msgs, stream=True))
        reasoning = "".join(
            getattr(ch.choices[0].delta, "reasoning_content", None) or "" for ch in chunks if ch.choices
        )
        content = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert (reasoning, content) == (
            first.choices[0].message.reasoning_content,
            first.choices[0].message.content,
        )
        assert m_requests() == before
        # other sampling options, or sampling at all, run M
        c.chat.completions.create(model="duet", messages=msgs, extra_body={"max_signal_tokens": 5})
        c.chat.completions.create(model="duet", messages=msgs, temperature=1.0, seed=1)
        assert m_requests() == before + 2
        text = httpx.get(server.url + "/metrics").text
    finally:
        server.__exit__()
    counts = {
        s.labels["result"]: s.value
        for f in text_string_to_metric_families(text)
        if f.name == "duetlm_signal_cache"
        for s in f.samples
        if s.name.endswith("_total")
    }
    assert counts == {"hit": 2.0, "miss": 2.0}  # the sampled request neither hits nor stores


def test_the_signal_cache_is_a_bounded_lru():
    from duetlm.engines.base import Generation
    from duetlm.serve.cache import SignalCache, cache_key

    greedy = SamplingParams(temperature=0.0, max_new_tokens=8, seed=3)
    assert cache_key("q", greedy) == cache_key("q", replace(greedy, seed=4))  # greedy ignores the seed
    assert cache_key("q", replace(greedy, temperature=0.7)) is None
    cache = SignalCache(2)
    gen = {q: Generation(prompt_index=0, token_ids=[1], text=q, finish_reason="stop") for q in "abc"}
    for q in "ab":
        cache.put(cache_key(q, greedy), gen[q])
    assert cache.get(cache_key("a", greedy)) is gen["a"]  # a is now the most recent
    cache.put(cache_key("c", greedy), gen["c"])  # evicts b, the least recently used
    assert len(cache) == 2 and cache.get(cache_key("b", greedy)) is None
    assert cache.get(cache_key("a", greedy)) is gen["a"] and cache.get(cache_key("c", greedy)) is gen["c"]
    off = SignalCache(0)
    off.put(cache_key("a", greedy), gen["a"])
    assert off.get(cache_key("a", greedy)) is None and len(off) == 0


def test_sigterm_lets_admitted_requests_finish_and_refuses_new_ones(tiny_dir, tiny_llama_dir):
    """`duetlm serve` in its own process, 8 requests in flight (half streamed), then SIGTERM: every
    admitted request completes, /health says draining, and the process exits 0."""
    import signal as signals

    cmd = [
        sys.executable,
        "-m",
        "duetlm.cli",
        "serve",
        "--large",
        str(tiny_dir),
        "--small",
        str(tiny_llama_dir),
    ]
    cmd += ["--port", "0", "--device", "cpu", "--max-signal-tokens", "256", "--max-answer-tokens", "64"]
    cmd += ["--max-tokens-limit", "512", "--drain-timeout-s", "120"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    found: list[str] = []
    log: list[str] = []

    def read() -> None:
        for line in proc.stderr:
            log.append(line)
            m = re.search(r"running on (http://\S+)", line)
            if m:
                found.append(m.group(1))

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + 120
    while not found and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if not found:
        proc.kill()
        pytest.fail("duetlm serve did not start:\n" + "".join(log))
    url = found[0]
    body = {**user(Q), "temperature": 1.0, "max_signal_tokens": 256, "max_tokens": 64}

    def one(i: int) -> tuple[int, str]:
        if i % 2:
            with httpx.stream(
                "POST", url + "/v1/chat/completions", json={**body, "stream": True, "seed": i}, timeout=300
            ) as r:
                text = "".join(r.iter_text())
            return r.status_code, text
        r = httpx.post(url + "/v1/chat/completions", json={**body, "seed": i}, timeout=300)
        return r.status_code, r.text

    try:
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(one, i) for i in range(8)]
            deadline = time.monotonic() + 60
            while httpx.get(url + "/health").json()["in_flight"] < 8 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert httpx.get(url + "/health").json()["in_flight"] == 8, "the requests finished too fast"
            proc.send_signal(signals.SIGTERM)
            try:  # a new request: refused (the socket closes at once) or a 503 while it closes
                late = httpx.post(url + "/v1/chat/completions", json=body, timeout=60).status_code
            except httpx.TransportError:
                late = None
            results = [f.result() for f in futures]
        code = proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    for status, text in results:
        assert status == 200, text
        if text.startswith("data:"):  # a stream: whole, to its end
            assert text.rstrip().endswith("data: [DONE]") and '"finish_reason":"' in text.replace(" ", "")
        else:
            assert json.loads(text)["choices"][0]["finish_reason"] in ("stop", "length")
    assert late in (None, 503)
    # uvicorn shuts down cleanly, then ends by the signal it caught (what process managers expect)
    assert code in (0, -signals.SIGTERM) and any("Application shutdown complete" in x for x in log), log[-30:]
    accessed = [json.loads(line) for line in log if line.startswith("{")]
    assert sum(e["path"] == "/v1/chat/completions" and e["status"] == 200 for e in accessed) == 8


def test_a_draining_server_answers_503_and_says_so_on_health(engines):
    service = DuetService(
        ServeConfig(large="M", small="m", max_signal_tokens=4, max_answer_tokens=4), *engines
    )
    server = ServerThread(create_app(service)).__enter__()
    try:
        assert post(server.url, user(Q)).status_code == 200
        service.draining = True  # what SIGTERM sets (run_server's handle_exit)
        r = post(server.url, user(Q))
        health = httpx.get(server.url + "/health")
    finally:
        server.__exit__()
    assert (
        r.status_code == 503
        and r.headers["Retry-After"] == "1"
        and "shutting down" in r.json()["error"]["message"]
    )
    assert health.status_code == 503 and health.json()["status"] == "draining"


def test_the_model_name_routes_a_request_to_duet_m_alone_or_m_alone(client, duet_url, engines):
    ids = {m.id: m.model_extra["route"] for m in client.models.list().data}
    assert ids == {"duet": "duet", "duet:small": "small", "duet:large": "large"}
    large, small = engines
    msgs = [{"role": "user", "content": Q}]
    # duet:small is m alone: the pipeline's small_only, no M tokens
    alone = DuetPipeline(
        large, small, small_sampling=SamplingParams(temperature=0.0, max_new_tokens=ANSWER_TOKENS)
    )
    r = client.chat.completions.create(model="duet:small", messages=msgs)
    assert r.choices[0].message.content == alone.small_only([Q])[0].answer
    assert r.usage.model_extra["large"] == {"prompt_tokens": 0, "completion_tokens": 0}
    assert not r.choices[0].message.reasoning_content
    # duet:large is M alone: the pipeline's original (thinking, then its own answer), no m tokens
    original = DuetPipeline(
        large,
        small,
        large_sampling=SamplingParams(temperature=0.0, max_new_tokens=SIGNAL_TOKENS),
        small_sampling=SamplingParams(temperature=0.0, max_new_tokens=ANSWER_TOKENS),
    ).original([Q])[0]
    r = client.chat.completions.create(model="duet:large", messages=msgs)
    assert r.choices[0].message.content == original.answer
    assert r.choices[0].message.reasoning_content == original.signal.text
    assert r.usage.model_extra["small"]["completion_tokens"] == 0
    assert r.usage.model_extra["large"]["completion_tokens"] == original.large_tokens
    # streamed, each route's deltas add up to its plain response
    for model in ("duet:small", "duet:large"):
        plain = client.chat.completions.create(model=model, messages=msgs).choices[0].message
        chunks = [
            c for c in client.chat.completions.create(model=model, messages=msgs, stream=True) if c.choices
        ]
        content = "".join(c.choices[0].delta.content or "" for c in chunks)
        reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks)
        assert (content, reasoning) == (plain.content, plain.reasoning_content or ""), model
    # a name it does not serve lists the ones it does; logprobs are not served for M alone
    r = post(duet_url, {**user(), "model": "duet:tiny"})
    assert r.status_code == 404 and "'duet:small'" in r.json()["error"]["message"]
    r = post(duet_url, {**user(), "model": "duet:large", "logprobs": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"


@pytest.mark.parametrize("failure", ["error", "timeout"])
def test_large_fallback_small_answers_with_m_when_m_fails_or_is_slow(engines, failure):
    from prometheus_client.parser import text_string_to_metric_families

    up = Upstream(fail=99, status=500) if failure == "error" else Upstream(slow=99, delay=3.0)
    remote = RemoteEngine(up.url, model="m", max_retries=0, api_key="")
    options = {"large_url": up.url, "small": "m", "max_answer_tokens": ANSWER_TOKENS}
    fall = start(ServeConfig(**options, large_fallback="small", large_timeout_s=0.5), remote, engines[1])
    fail = start(ServeConfig(**options, large_timeout_s=0.5), remote, engines[1])
    try:
        c = openai.OpenAI(base_url=fall.url + "/v1", api_key="unused", max_retries=0)
        msgs = [{"role": "user", "content": Q}]
        raw = c.chat.completions.with_raw_response.create(model="duet", messages=msgs)
        r = raw.parse()
        streamed = [
            ch for ch in c.chat.completions.create(model="duet", messages=msgs, stream=True) if ch.choices
        ]
        text = httpx.get(fall.url + "/metrics").text
        failed = post(fail.url, user(Q))
    finally:
        fall.__exit__()
        fail.__exit__()
        up.close()
    alone = DuetPipeline(
        engines[0], engines[1], small_sampling=SamplingParams(temperature=0.0, max_new_tokens=ANSWER_TOKENS)
    )
    assert r.choices[0].message.content == alone.small_only([Q])[0].answer  # m alone answered
    assert r.model_extra["duet"]["fallback"] == failure and raw.headers["X-Duet-Fallback"] == "1/1"
    assert r.usage.model_extra["large"]["completion_tokens"] == 0
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed) == r.choices[0].message.content
    assert streamed[-1].choices[0].model_extra["duet"]["fallback"] == failure
    counts = {
        s.labels["reason"]: s.value
        for f in text_string_to_metric_families(text)
        if f.name == "duetlm_large_fallbacks"
        for s in f.samples
        if s.name.endswith("_total")
    }
    assert counts == {failure: 2.0}
    # the default policy fails: 502 naming the upstream, or 504 naming the limit
    assert failed.status_code == (502 if failure == "error" else 504), failed.text
    if failure == "timeout":
        assert "--large-timeout-s 0.5" in failed.json()["error"]["message"]


# -- decoding controls (issue 16 item 2) --------------------------------------------------------------


def test_served_json_schema_answer_validates_and_parses_with_the_openai_client(client, local):
    """`client.chat.completions.parse` with a pydantic model: the server constrains m's answer to the
    schema the client sends, so it parses; duet and duet:small, streamed and not, and the answer is
    the pipeline's with the same schema."""
    import jsonschema

    schema_text = None
    for model in ("duet", "duet:small"):
        r = client.chat.completions.parse(
            model=model,
            messages=[{"role": "user", "content": Q}],
            temperature=1.0,
            seed=SEED,
            max_tokens=60,
            response_format=Verdict,
        )
        choice = r.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        assert isinstance(choice.message.parsed, Verdict)
        jsonschema.validate(json.loads(choice.message.content), Verdict.model_json_schema())
        streamed = ask(
            client,
            stream=True,
            model=model,
            max_tokens=60,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "v", "schema": Verdict.model_json_schema()},
            },
        )
        text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        if model == "duet":
            assert json.loads(text) == json.loads(choice.message.content)
            schema_text = choice.message.content
    # the pipeline, m's sampling constrained by the schema the client sent, writes the same answer
    from duetlm.serve.openai import json_schema_of

    sent = {
        "type": "json_schema",
        "json_schema": {"name": "Verdict", "schema": openai.lib._pydantic.to_strict_json_schema(Verdict)},
    }
    pipe = replace(
        local,
        small_sampling=replace(local.small_sampling, max_new_tokens=60, json_schema=json_schema_of(sent)),
    )
    (expected,) = pipe.run([Q])
    assert expected.answer == schema_text


def test_served_json_object_mode(client):
    r = ask(client, max_tokens=80, response_format={"type": "json_object"}, n=4)
    finished = [c for c in r.choices if c.finish_reason == "stop"]
    assert all(c.message.content.startswith("{") for c in r.choices)
    for c in finished:
        assert isinstance(json.loads(c.message.content), dict)


def test_served_penalties_bias_and_min_p_equal_the_pipeline(client, local, engines):
    """Each control through the official client (repetition_penalty and min_p as vLLM's extensions,
    in extra_body) gives the pipeline's answer with m sampled under the same controls, and changes
    the answer (so the control reached m)."""
    for temperature in (1.0, 0.0):  # greedy m repeats itself, which the penalties act on
        plain = ask(client, temperature=temperature).choices[0].message.content
        greedy = replace(local.large_sampling, temperature=temperature)
        (base,) = replace(
            local,
            large_sampling=greedy,
            small_sampling=replace(local.small_sampling, temperature=temperature),
        ).run([Q])
        first = base.small.token_ids[0]  # m's first answer token, banned below
        other = 7 if first != 7 else 8
        cases = [
            (
                {"logit_bias": {str(first): -100, str(other): 4}},
                {"logit_bias": tuple(sorted(((other, 4.0), (first, -100.0))))},
            ),
            (
                {"presence_penalty": 1.5, "frequency_penalty": 1.0},
                {"presence_penalty": 1.5, "frequency_penalty": 1.0},
            ),
            ({"extra_body": {"repetition_penalty": 4.0}}, {"repetition_penalty": 4.0}),
            ({"extra_body": {"min_p": 1.0}}, {"min_p": 1.0}),
        ]
        for request, sampling in cases:
            if temperature == 0 and "min_p" in sampling:
                continue  # min_p filters a draw: greedy has none
            got = ask(client, temperature=temperature, **request).choices[0].message.content
            small = replace(local.small_sampling, temperature=temperature, **sampling)
            large = replace(local.large_sampling, temperature=temperature)
            (expected,) = replace(local, small_sampling=small, large_sampling=large).run([Q])
            assert got == expected.answer, (temperature, request)
            # At T=1 the untrained m's near-flat logits hardly repeat a token: only bias and min_p show.
            changed = temperature == 0 or "logit_bias" in sampling or "min_p" in sampling
            assert (got != plain) == changed, (temperature, request, got, plain)


# -- a remote m: `duetlm serve --role small`, and a duet server with --small-url (issue 16 item 4) -------


def test_role_small_continues_the_assistant_turn_it_is_sent(small_cli_url, engines, local):
    """m behind `--role small`: a final assistant message (m's turn opened with z, as `--small-url`
    sends it) is continued exactly as the local pipeline's answer; a conversation ending with the
    user's turn is m alone; log-probs and token ids come back."""
    from duetlm.streaming import answer_text

    c = openai.OpenAI(base_url=small_cli_url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in c.models.list().data] == ["small"]
    z = "12 + 7 = 19"
    messages = protocol.decode_messages(protocol.small_prompt(protocol.CHAT_ENDPOINT, Q, z))
    go_on = {"continue_final_message": True, "add_generation_prompt": False}
    options = dict(model="small", temperature=1.0, seed=SEED, max_tokens=ANSWER_TOKENS)
    r = c.chat.completions.create(messages=messages, logprobs=True, extra_body=go_on, **options)
    ((g,),) = replace(local, small_sampling=replace(local.small_sampling, logprobs=True)).answer(
        [Q], [z], n=1
    )
    choice = r.choices[0]
    assert choice.message.content == answer_text(g.text)
    assert "reasoning_content" not in (choice.message.model_extra or {})
    assert [t.logprob for t in choice.logprobs.content] == pytest.approx(
        g.logprobs[: len(choice.logprobs.content)]
    )
    assert choice.model_extra["token_ids"] == g.token_ids
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(g.prompt_token_ids), g.num_tokens)
    alone = c.chat.completions.create(messages=[{"role": "user", "content": Q}], **options)
    assert alone.choices[0].message.content == local.small_only([Q])[0].answer
    bad = [
        (
            {"messages": [{"role": "user", "content": Q}], "extra_body": go_on},
            "needs an assistant message last",
        ),
        (
            {"messages": messages, "extra_body": {"continue_final_message": True}},
            "add_generation_prompt must be false",
        ),
    ]
    for request, needle in bad:
        with pytest.raises(openai.BadRequestError, match=needle):
            c.chat.completions.create(**options, **request)


def test_duet_server_with_a_remote_small_reproduces_the_local_pipeline(
    small_cli_url, large_cli_url, engines, local
):
    """`--small-url`: m behind a role-small server; with M local, and with M remote too (a duet server
    holding no model at all). The answers, signals and usage are the local pipeline's, streamed (m's
    answer relayed as its server streams it) and not, for one question and a conversation."""
    convo = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": Q},
    ]
    (expected,) = local.run([Q])
    (expected_convo,) = local.run([protocol.conversation_question(convo)])
    remote_large = RemoteEngine(large_cli_url, api_key="")
    for large in (engines[0], remote_large):
        cfg = ServeConfig(
            large="M" if large is engines[0] else None,
            large_url=None if large is engines[0] else large_cli_url,
            small_url=small_cli_url,
            max_signal_tokens=SIGNAL_TOKENS,
            max_answer_tokens=ANSWER_TOKENS,
        )
        server = start(cfg, large, RemoteEngine(small_cli_url, api_key=""))
        try:
            c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
            r = ask(c)
            chunks = list(ask(c, stream=True))
            two = c.chat.completions.create(
                model="duet", messages=convo, temperature=1.0, seed=SEED, max_tokens=ANSWER_TOKENS
            )
            with pytest.raises(openai.BadRequestError, match="logprobs are not served with a remote m"):
                ask(c, logprobs=True)
            models = httpx.get(server.url + "/v1/models").json()["data"]
        finally:
            server.__exit__()
        assert r.choices[0].message.reasoning_content == expected.signal.text
        assert r.choices[0].message.content == expected.answer
        assert r.usage.small == {
            "prompt_tokens": len(expected.small.prompt_token_ids),
            "completion_tokens": expected.small_tokens,
        }
        answer_deltas = [
            ch.choices[0].delta.content for ch in chunks if ch.choices and ch.choices[0].delta.content
        ]
        assert "".join(answer_deltas) == expected.answer and len(answer_deltas) >= 2
        assert two.choices[0].message.content == expected_convo.answer
        assert two.choices[0].message.reasoning_content == expected_convo.signal.text
        assert models[0]["small"] == small_cli_url


def test_a_cascade_with_a_remote_small_reads_its_log_probs(small_cli_url, engines, local):
    """The cascade's logprob estimator on a remote m: its server's log-probs decide, as the local
    cascade's do."""
    from duetlm.cascade import parse_cascade

    spec = "logprob@0.5"
    cfg = ServeConfig(
        large="M",
        small_url=small_cli_url,
        cascade=spec,
        max_signal_tokens=SIGNAL_TOKENS,
        max_answer_tokens=ANSWER_TOKENS,
    )
    server = start(cfg, engines[0], RemoteEngine(small_cli_url, api_key=""))
    try:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        r = ask(c, temperature=0.0)
    finally:
        server.__exit__()
    greedy = replace(
        local,
        large_sampling=replace(local.large_sampling, temperature=0.0),
        small_sampling=replace(local.small_sampling, temperature=0.0),
    )
    (expected,) = greedy.cascade([Q], parse_cascade(spec))
    duet = r.choices[0].model_extra["duet"]
    assert duet["confidence"] == pytest.approx(expected.confidence, abs=1e-4)
    assert duet["large_called"] == expected.large_called
    assert r.choices[0].message.content == expected.answer


def test_large_fallback_small_when_the_upstream_is_killed_mid_request(tiny_dir, engines):
    """M behind a `--role large` process that is SIGKILLed while a request waits on it (frozen with
    SIGSTOP first, so the request is surely in flight there): with `--large-fallback small` the
    admitted request still gets m's answer alone (200, `fallback: error`), not a broken connection."""
    import signal as signals

    args = ["--role", "large", "--large", str(tiny_dir), "--device", "cpu", "--max-signal-tokens", "900"]
    proc, url, _ = start_cli_server(args, 120, {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    remote = RemoteEngine(url, max_retries=0, api_key="")
    cfg = ServeConfig(
        large_url=url,
        small="m",
        max_answer_tokens=ANSWER_TOKENS,
        max_signal_tokens=900,
        large_fallback="small",
    )
    server = start(cfg, remote, engines[1])
    try:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        ask_once = dict(model="duet", messages=[{"role": "user", "content": Q}], temperature=0.0)
        assert "fallback" not in c.chat.completions.create(**ask_once).model_extra["duet"]  # M is up
        # Freeze M, so the next request is in flight at M (sent, unanswered) when it is killed.
        proc.send_signal(signals.SIGSTOP)
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(c.chat.completions.create, **ask_once)
            time.sleep(1.0)
            assert not future.done()
            proc.send_signal(signals.SIGKILL)
            r = future.result(timeout=120)
    finally:
        server.__exit__()
        proc.kill()
        proc.wait()
    assert r.model_extra["duet"]["fallback"] == "error"
    alone = DuetPipeline(
        engines[0], engines[1], small_sampling=SamplingParams(temperature=0.0, max_new_tokens=ANSWER_TOKENS)
    )
    assert r.choices[0].message.content == alone.small_only([Q])[0].answer
    assert r.usage.model_extra["large"]["completion_tokens"] == 0
