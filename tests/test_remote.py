"""RemoteEngine against a tiny real HTTP server on 127.0.0.1 (no mocks): retries, timeouts, the
concurrency limit, the API key, reading the reasoning back, and a remote M in `DuetPipeline`."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from duetlm import protocol
from duetlm.engines.base import SamplingParams
from duetlm.engines.remote import (
    _ABSENT,
    RemoteEngine,
    RemoteEngineError,
    backoff_delay,
    base_url,
    response_text,
)
from duetlm.errors import DuetError
from duetlm.pipeline import DuetPipeline


def sse_chunks(reply: dict[str, Any]) -> list[dict[str, Any]]:
    """A chat completion as a server streams it: the role, the thinking and the content word by word,
    the finish (with `stop_reason`), then the usage."""
    choice = reply["choices"][0]
    message = choice["message"]
    base = {"id": reply["id"], "object": "chat.completion.chunk", "model": reply["model"]}

    def chunk(delta: dict[str, Any], **extra: Any) -> dict[str, Any]:
        return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None, **extra}]}

    out = [chunk({"role": "assistant", "content": ""})]
    for field in ("reasoning_content", "content"):
        for k, word in enumerate((message.get(field) or "").split(" ") if message.get(field) else []):
            out.append(chunk({field: word if k == 0 else " " + word}))
    finish = {k: v for k, v in choice.items() if k in ("stop_reason", "matched_stop", "logprobs")}
    out.append(chunk({}, **{**finish, "finish_reason": choice["finish_reason"]}))
    out.append({**base, "choices": [], "usage": reply["usage"]})
    return out


def chat_reply(body: dict[str, Any]) -> dict[str, Any]:
    """What a vLLM server with a reasoning parser answers: the thinking in `reasoning_content`, no
    content (it stopped at `</think>`), `stop_reason` naming the matched stop string."""
    question = body["messages"][-1]["content"]
    thinking = f"I read: {question[:12]}"
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": body["model"],
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": None, "reasoning_content": thinking},
                "finish_reason": "stop",
                "stop_reason": "</think>",
                "logprobs": {
                    "content": [{"token": "I", "logprob": -0.5}, {"token": " read", "logprob": -1.25}]
                },
            }
        ],
        "usage": {"prompt_tokens": 21, "completion_tokens": 7, "total_tokens": 28},
    }


class Upstream:
    """A tiny OpenAI-style server in a thread. The first `fail` POSTs answer `status` (with
    `Retry-After: retry_after` if given); the first `slow` POSTs sleep `delay` s before answering;
    every POST waits for `gate` (set by default). A request with `stream: true` gets SSE (`sse_chunks`).
    Records bodies, headers and peak concurrency."""

    def __init__(
        self,
        fail: int = 0,
        status: int = 503,
        retry_after: str | None = None,
        slow: int = 0,
        delay: float = 0.0,
        reply=chat_reply,
        cut_after: int | None = None,
    ) -> None:
        self.fail, self.status, self.retry_after = fail, status, retry_after
        self.cut_after = cut_after  # streamed replies: drop the connection after this many chunks
        self.slow, self.delay, self.reply = slow, delay, reply
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.active = self.peak = 0
        self.gate = threading.Event()
        self.gate.set()
        self.lock = threading.Lock()
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def _send(self, status: int, data: Any, headers: dict[str, str] | None = None) -> None:
                raw = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(raw)

            def _stream(self, reply: dict[str, Any]) -> None:
                events = [f"data: {json.dumps(c)}\n\n" for c in sse_chunks(reply)] + ["data: [DONE]\n\n"]
                raw = "".join(events).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                if upstream.cut_after is None:
                    self.wfile.write(raw)
                    return
                # Fewer bytes than announced, then the connection closes: a stream cut mid-way.
                self.wfile.write("".join(events[: upstream.cut_after]).encode())
                self.wfile.flush()
                self.close_connection = True

            def do_GET(self) -> None:
                self._send(200, {"object": "list", "data": [{"id": "big-model", "object": "model"}]})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with upstream.lock:
                    upstream.bodies.append(body)
                    upstream.headers.append(dict(self.headers))
                    n = len(upstream.bodies)
                    upstream.active += 1
                    upstream.peak = max(upstream.peak, upstream.active)
                try:
                    upstream.gate.wait(timeout=30)
                    if n <= upstream.fail:
                        extra = {"Retry-After": upstream.retry_after} if upstream.retry_after else {}
                        self._send(upstream.status, {"error": {"message": f"busy #{n}"}}, extra)
                        return
                    if n <= upstream.slow:
                        time.sleep(upstream.delay)
                    with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # client gave up
                        if body.get("stream"):
                            self._stream(upstream.reply(body))
                        else:
                            self._send(200, upstream.reply(body))
                finally:
                    with upstream.lock:
                        upstream.active -= 1

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def upstream_factory():
    made: list[Upstream] = []

    def make(**kwargs: Any) -> Upstream:
        made.append(Upstream(**kwargs))
        return made[-1]

    yield make
    for u in made:
        u.close()


def engine_for(url: str, **kwargs: Any) -> RemoteEngine:
    kwargs.setdefault("backoff", 0.01)
    kwargs.setdefault("max_backoff", 0.05)
    kwargs.setdefault("api_key", "")
    return RemoteEngine(url, **kwargs)


PROMPT = protocol.large_prompt(protocol.CHAT_ENDPOINT, "What is 12 + 7?")
THINK = SamplingParams(temperature=0.0, max_new_tokens=32, stop=protocol.large_stop())


# -- pure functions ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "finish", "stop_reason", "expected"),
    [
        ({"reasoning_content": "z1", "content": None}, "stop", "</think>", protocol.Signal("z1", True)),
        ({"reasoning": "z2", "content": ""}, "stop", _ABSENT, protocol.Signal("z2", True)),  # newer vLLM
        ({"reasoning_content": "z3 cut", "content": None}, "length", None, protocol.Signal("z3 cut", False)),
        # The server did not stop at </think>: M answered too; the answer is not part of the signal.
        ({"reasoning_content": "z4", "content": "19"}, "stop", None, protocol.Signal("z4", True)),
        # No reasoning parser: the tags are in the content (the matched stop string dropped).
        ({"content": "<think>\nz5\n"}, "stop", "</think>", protocol.Signal("z5", True)),
        ({"content": "<think>\nz6\n</think>\n\n19"}, "stop", None, protocol.Signal("z6", True)),
        ({"content": "z7 ran out"}, "length", _ABSENT, protocol.Signal("z7 ran out", False)),
        # End of sequence inside the thinking (vLLM says stop_reason None): not a closed block.
        ({"content": "<think>\nz8"}, "stop", None, protocol.Signal("z8", False)),
    ],
)
def test_response_text_rebuilds_what_a_local_engine_returns(message, finish, stop_reason, expected):
    assert protocol.extract_signal(response_text(message, finish, stop_reason, ("</think>",))) == expected


def test_backoff_grows_caps_jitters_and_obeys_retry_after():
    for attempt in range(6):
        d = backoff_delay(attempt, base=0.5, cap=4.0, jitter=0.5)
        full = min(0.5 * 2**attempt, 4.0)
        assert full * 0.5 <= d <= full
    assert backoff_delay(0, base=0.5, cap=4.0, jitter=0.0) == 0.5
    assert backoff_delay(3, base=0.5, cap=4.0, jitter=0.0) == 4.0
    assert backoff_delay(0, base=0.5, cap=4.0, retry_after=2.0) == 2.0
    assert backoff_delay(0, base=0.5, cap=4.0, retry_after=60.0) == 4.0


def test_base_url():
    assert base_url("http://h:8000") == "http://h:8000/v1"
    assert base_url("http://h:8000/v1/") == "http://h:8000/v1"
    assert base_url("https://api.example.com/openai/v1") == "https://api.example.com/openai/v1"
    with pytest.raises(DuetError, match="http"):
        base_url("h:8000")


def test_messages_round_trip_and_chat_endpoint_limits(tiny_tokenizer):
    q = "π ≈ 3.14? \x00 odd"
    assert protocol.decode_messages(
        protocol.large_prompt(protocol.CHAT_ENDPOINT, q)
    ) == protocol.large_messages(q)
    # A local M sees the same user turn, templated.
    assert protocol.large_prompt(tiny_tokenizer, q) == protocol.large_chat_prompt(
        tiny_tokenizer, protocol.large_messages(q)
    )
    assert protocol.large_stop_token_ids(protocol.CHAT_ENDPOINT) == ()
    # m's prompt travels as its turns plus the assistant turn to continue, which a role-small server
    # templates back into exactly the local prompt (with and without z, a conversation too).
    convo = protocol.conversation_question(
        [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": q},
        ]
    )
    for question in (q, convo):
        for z in ("z", None):
            sent = protocol.decode_messages(protocol.small_prompt(protocol.CHAT_ENDPOINT, question, z))
            assert sent[-1] == {"role": "assistant", "content": protocol.thinking_block(z or "")}
            assert protocol.small_chat_prompt(tiny_tokenizer, sent) == protocol.small_prompt(
                tiny_tokenizer, question, z
            )
    alone = protocol.conversation(q)
    assert protocol.small_chat_prompt(tiny_tokenizer, alone) == protocol.small_prompt(tiny_tokenizer, q)
    with pytest.raises(DuetError, match="truncation"):
        protocol.large_answer_prompt(protocol.CHAT_ENDPOINT, q, "z")
    with pytest.raises(DuetError, match="not chat messages"):
        protocol.decode_messages(protocol.large_prompt(tiny_tokenizer, q))


# -- against a real HTTP server ---------------------------------------------------------------------


def test_request_reply_and_model_discovery(upstream_factory):
    up = upstream_factory()
    engine = engine_for(up.url)
    sp = SamplingParams(
        temperature=0.7, top_k=5, max_new_tokens=40, stop=("</think>",), n=2, seed=11, logprobs=True
    )
    (gens,) = engine.generate([PROMPT], sp)
    assert engine.model == "big-model"  # the first model GET /v1/models lists
    assert sorted(b["seed"] for b in up.bodies) == [11, 12]  # one request per sample, distinct seeds
    body = up.bodies[0]
    assert body["messages"] == protocol.large_messages("What is 12 + 7?")
    assert (body["max_tokens"], body["temperature"], body["top_k"], body["stop"]) == (
        40,
        0.7,
        5,
        ["</think>"],
    )
    assert "stop_token_ids" not in body  # extensions only when used
    g = gens[0]
    assert protocol.extract_signal(g.text) == protocol.Signal("I read: What is 12 +", True)
    assert (g.num_tokens, g.prompt_tokens, g.finish_reason, g.logprobs) == (7, 21, "stop", [-0.5, -1.25])


def test_retries_5xx_then_succeeds(upstream_factory):
    up = upstream_factory(fail=2, status=503)
    (gens,) = engine_for(up.url, model="m", max_retries=2).generate([PROMPT], THINK)
    assert len(up.bodies) == 3
    assert protocol.extract_signal(gens[0].text).complete


def test_429_with_retry_after_is_retried(upstream_factory):
    up = upstream_factory(fail=1, status=429, retry_after="0")
    engine_for(up.url, model="m", max_retries=1).generate([PROMPT], THINK)
    assert len(up.bodies) == 2


def test_retries_run_out_with_an_error_naming_the_url(upstream_factory):
    up = upstream_factory(fail=99, status=502)
    with pytest.raises(RemoteEngineError, match=r"HTTP 502: busy #3 \(after 3 attempts\)") as err:
        engine_for(up.url, model="m", max_retries=2).generate([PROMPT], THINK)
    assert up.url in str(err.value) and err.value.status == 502
    assert len(up.bodies) == 3


def test_client_errors_are_not_retried(upstream_factory):
    up = upstream_factory(fail=99, status=400)
    with pytest.raises(RemoteEngineError, match="HTTP 400: busy #1$"):
        engine_for(up.url, model="m", max_retries=3).generate([PROMPT], THINK)
    assert len(up.bodies) == 1


def test_connection_refused_is_retried_then_reported():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(
        RemoteEngineError, match=rf"127.0.0.1:{port}/v1/chat/completions: ConnectError.*2 attempts"
    ):
        engine_for(f"http://127.0.0.1:{port}", model="m", max_retries=1).generate([PROMPT], THINK)


def test_timeout_then_retry(upstream_factory):
    up = upstream_factory(slow=1, delay=2.0)
    (gens,) = engine_for(up.url, model="m", timeout=0.3, max_retries=1).generate([PROMPT], THINK)
    assert len(up.bodies) == 2 and gens[0].num_tokens == 7
    up2 = upstream_factory(slow=9, delay=2.0)
    with pytest.raises(RemoteEngineError, match="ReadTimeout"):
        engine_for(up2.url, model="m", timeout=0.3, max_retries=0).generate([PROMPT], THINK)


def test_concurrency_limit(upstream_factory):
    up = upstream_factory(slow=99, delay=0.2)
    out = engine_for(up.url, model="m", max_concurrency=2).generate([PROMPT] * 6, THINK)
    assert len(out) == 6 and up.peak == 2


def test_api_key_from_the_environment(upstream_factory, monkeypatch):
    up = upstream_factory()
    monkeypatch.delenv("DUETLM_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai")
    RemoteEngine(up.url, model="m").generate([PROMPT], THINK)
    monkeypatch.setenv("DUETLM_API_KEY", "sk-duet")
    RemoteEngine(up.url, model="m").generate([PROMPT], THINK)
    RemoteEngine(up.url, model="m", api_key="sk-given").generate([PROMPT], THINK)
    auth = [h.get("Authorization") for h in up.headers]
    assert auth == ["Bearer sk-openai", "Bearer sk-duet", "Bearer sk-given"]


def test_malformed_reply_is_an_error(upstream_factory):
    up = upstream_factory(reply=lambda body: {"choices": []})
    with pytest.raises(RemoteEngineError, match="without"):
        engine_for(up.url, model="m").generate([PROMPT], THINK)


def test_text_prompts_are_refused(upstream_factory, tiny_tokenizer):
    up = upstream_factory()
    with pytest.raises(DuetError, match="not chat messages"):
        engine_for(up.url, model="m").generate([protocol.large_prompt(tiny_tokenizer, "q")], THINK)
    assert up.bodies == []


def test_pipeline_with_a_remote_large_and_a_local_small(upstream_factory, tiny_engine):
    up = upstream_factory()
    pipe = DuetPipeline(
        engine_for(up.url),
        tiny_engine,
        large_sampling=SamplingParams(temperature=0.0, max_new_tokens=24),
        small_sampling=SamplingParams(temperature=0.0, max_new_tokens=8),
    )
    (result,) = pipe.run(["What is 12 + 7?"])
    assert up.bodies[0]["stop"] == ["</think>"]  # M stops at the end of its thinking
    assert up.bodies[0]["max_tokens"] == 24  # the cap on thinking tokens
    assert result.signal == protocol.Signal("I read: What is 12 +", True)
    assert result.large_tokens == 7
    # m's prompt carries the remote signal; m's output is what m alone generates from that prompt.
    expected = tiny_engine.generate(
        [protocol.small_prompt(tiny_engine.tokenizer, "What is 12 + 7?", result.signal.text)],
        pipe.small_sampling,
    )
    assert result.small.token_ids == expected[0][0].token_ids


def test_streamed_requests_report_the_raw_text_as_it_comes(upstream_factory):
    up = upstream_factory()
    eng = RemoteEngine(up.url, api_key="")
    sp = SamplingParams(max_new_tokens=32, stop=(protocol.THINK_CLOSE,), logprobs=True)
    prompts = [
        protocol.encode_messages([{"role": "user", "content": q}]) for q in ("What is 2+2?", "Hi there")
    ]
    plain = eng.generate(prompts, sp)
    pieces: dict[int, list[str]] = {}
    streamed = eng.generate(prompts, sp, on_text=lambda row, text: pieces.setdefault(row, []).append(text))
    assert up.bodies[-1]["stream"] is True and up.bodies[-1]["stream_options"] == {"include_usage": True}
    for row, (p, s) in enumerate(zip(plain, streamed, strict=True)):
        a, b = p[0], s[0]
        assert (b.text, b.finish_reason, b.num_tokens, b.prompt_tokens, b.logprobs) == (
            a.text,
            a.finish_reason,
            a.num_tokens,
            a.prompt_tokens,
            a.logprobs,
        )
        assert len(pieces[row]) >= 3 and a.text.startswith("".join(pieces[row]))
        assert protocol.extract_signal(a.text).text == "".join(pieces[row])


def test_a_stream_is_retried_before_its_first_piece_and_not_after(upstream_factory):
    up = upstream_factory(fail=2, status=503)
    eng = RemoteEngine(up.url, api_key="", backoff=0.01)
    prompt = protocol.encode_messages([{"role": "user", "content": "What is 2+2?"}])
    pieces: list[str] = []
    (gs,) = eng.generate([prompt], SamplingParams(max_new_tokens=8), on_text=lambda r, t: pieces.append(t))
    assert len(up.bodies) == 3 and gs[0].text.startswith("".join(pieces)) and pieces  # 2 failures, success
    cut = upstream_factory(cut_after=3)
    eng = RemoteEngine(cut.url, api_key="", backoff=0.01)
    seen: list[str] = []
    with pytest.raises(RemoteEngineError, match="mid-stream"):
        eng.generate([prompt], SamplingParams(max_new_tokens=8), on_text=lambda r, t: seen.append(t))
    assert seen and len(cut.bodies) == 1  # one streamed try: no retry after text went out
