"""`duetlm serve`: the two-stage pipeline behind an OpenAI-compatible HTTP API (FastAPI).

Routes: `POST /v1/chat/completions`, `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus; see
`ServeMetrics`), and, with `--role large`, `POST /tokenize` (vLLM's shape; `RemoteEngine.count_tokens`
uses it).

Roles.
- `duet` (default): the last (only) user message is the problem x; M writes the signal z, m answers.
  A system message is a 400, or dropped with `system_messages: ignore` (M and m read x through
  duetlm's own prompts, so a system prompt cannot reach them).
  The answer is `message.content`, z is `message.reasoning_content`; `usage` counts both models'
  tokens and breaks them down under `usage.large` / `usage.small` (`completion_tokens_details.
  reasoning_tokens` = M's tokens). Request options: `max_tokens` caps m's answer; the extension
  `max_signal_tokens` caps M's thinking (default `--max-signal-tokens`); `temperature`, `top_p`,
  `top_k` and `seed` apply to both models; `stop` to m; `n` choices (up to `max_n`); `logprobs` gives
  m's log-prob of each answer token, `top_logprobs` (up to 20) the most likely tokens at each.
- `large`: M alone, with the same API: the conversation is templated by `protocol.large_chat_prompt`
  (thinking on), M stops at the end of thinking, and its thinking is `reasoning_content` (content is
  empty). `max_tokens` caps the thinking. So one duetlm server can be another's remote M
  (`--large-url`): the prompt M sees is byte for byte the one a local M would see.

Batching (docs/serving.md has the measurements). `continuous` (default): a local HF model's requests go
into its `ContinuousBatcher` (one per model, M and m share it when they are one engine) and join the
running batch at the next decode step. `window`, and always for vLLM's offline engine and a remote M:
each stage (M, then m) takes the first waiting request, waits up to `batch_window_ms` for more (up to
`max_batch`), and runs one engine call for the batch (requests with different sampling options run as
separate calls; a seeded sampled request runs alone, so its seed reproduces it). Engine calls run in
worker threads, one per local engine, so torch work on an engine is serialised and never blocks the
event loop; while m answers one batch, M can think about the next. Admission is bounded: beyond
`max_queue` requests in the server, a request gets 503 with `Retry-After` at once instead of waiting.

Streaming (SSE) is token by token (`HFEngine`, `ContinuousBatcher`, `VLLMEngine`): M's signal as
`reasoning_content` deltas while M writes it, then m's answer as `content` deltas while m writes it;
each engine reports its tokens from its worker thread and `streaming.TextDeltas` turns them into text a
client never has to un-see (whole characters, no trailing whitespace or partial stop string until it is
certain). The deltas add up to exactly the non-streaming response. A remote M streams text rather than
tokens (`RemoteEngine(on_text=...)`): its pieces go through the same view. A request whose M fails
before its first output gets an HTTP error as without streaming; a failure later in the stream is an
`error` event. A client that disconnects cancels its request (continuous batching drops its row at the next token; a
windowed batch already running finishes).

`content` is m's answer cut before the first of the request's `stop` strings (OpenAI's rule).

Errors are OpenAI-style JSON (`{"error": {"message", "type", "param", "code"}}`): 401 for a missing or
wrong API key (with `api_key` set; `/health` stays open for load balancers), 400 for a bad request (the
message names the field), 404 for an unknown model or route, 413 for an oversized body,
503 when full, 502 when the remote large model fails (the message names its URL).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Hashable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.exceptions import HTTPException

from duetlm import protocol
from duetlm.config import DType, Strict
from duetlm.engines.base import Engine, Generation, OutputCallback, SamplingParams, generate_streaming
from duetlm.engines.hf import text_ids
from duetlm.errors import DuetError
from duetlm.streaming import TextDeltas, answer_text, answer_view

VALID_ROLES = ("system", "user", "assistant")


class ServeConfig(Strict):
    """Options of `duetlm serve` (the CLI flags of the same names)."""

    role: Literal["duet", "large"] = Field("duet", description="duet: M then m; large: M alone")
    large: str | None = Field(None, description="M: hub id, local dir, .gguf file or short name")
    large_url: str | None = Field(None, description="M behind an OpenAI-compatible server instead")
    small: str | None = Field(None, description="m (role duet): hub id, local dir, .gguf or short name")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    engine: Literal["hf", "vllm"] = Field("hf", description="engine of the local models (vllm: its own venv)")
    device: str = Field("auto", description="'auto', 'cpu', 'cuda', 'cuda:1', ...")
    dtype: DType = "auto"
    served_model_name: str | None = Field(None, description="the model name clients use (default: the role)")
    batching: Literal["continuous", "window"] = Field(
        "continuous", description="continuous: requests join a local HF model's running batch at each step"
    )
    max_batch: int = Field(16, ge=1, description="requests decoded together; 1 turns batching off")
    batch_window_ms: float = Field(5.0, ge=0, description="window batching: how long a batch waits for more")
    admit_ratio: float = Field(
        0.0, ge=0, description="continuous batching: new requests join once waiting >= ratio x running"
    )
    admit_max_wait: int = Field(
        16, ge=0, description="continuous batching: ... or once the oldest waited this many decode steps"
    )
    max_queue: int = Field(256, ge=1, description="requests admitted at once; beyond: 503 + Retry-After")
    retry_after_s: int = Field(1, ge=0, description="the Retry-After header of a 503")
    max_signal_tokens: int = Field(256, ge=1, description="default cap on M's thinking tokens")
    max_answer_tokens: int = Field(256, ge=1, description="default cap on m's answer tokens")
    max_tokens_limit: int = Field(8192, ge=1, description="largest max_tokens a request may ask for")
    max_n: int = Field(8, ge=1, description="largest n (samples per request) a request may ask for")
    system_messages: Literal["reject", "ignore"] = Field(
        "reject",
        description="role duet: a system message is a 400 (reject) or dropped (ignore); M and m read the "
        "question through duetlm's own prompts, so a system prompt cannot reach them",
    )
    temperature: float = Field(0.0, ge=0.0, description="default temperature (0 = greedy)")
    max_body_bytes: int = Field(1_000_000, ge=1, description="larger request bodies get 413")
    remote_timeout_s: float = Field(120.0, gt=0, description="per-request timeout towards --large-url")
    remote_max_retries: int = Field(4, ge=0, description="retries towards --large-url")
    remote_backoff_s: float = Field(0.5, ge=0, description="first backoff delay towards --large-url")
    remote_concurrency: int = Field(16, ge=1, description="requests in flight towards --large-url")
    api_key: str | None = Field(
        None, description="clients must send 'Authorization: Bearer <key>' (all routes but /health)"
    )

    @model_validator(mode="after")
    def _check_models(self) -> ServeConfig:
        if (self.large is None) == (self.large_url is None):
            raise ValueError("give exactly one of large (a model) and large_url (a server)")
        if self.role == "duet" and self.small is None:
            raise ValueError("role duet needs small (m); use role large to serve M alone")
        if self.role == "large" and self.small is not None:
            raise ValueError("role large serves M alone: drop small")
        return self

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.role


# -- errors ------------------------------------------------------------------------------------------


class ApiError(Exception):
    """An HTTP error with an OpenAI-style body; `param` names the offending field."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.kind = kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}
        }


def _upstream_error(err: Exception) -> ApiError:
    """What a failed engine call becomes: 502 for the remote large model, 500 otherwise."""
    from duetlm.engines.remote import RemoteEngineError

    if isinstance(err, RemoteEngineError):
        return ApiError(502, f"the large model (M) failed upstream: {err}", kind="upstream_error")
    return ApiError(500, f"generation failed: {type(err).__name__}: {err}", kind="server_error")


# -- requests ----------------------------------------------------------------------------------------


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    # parse_chat checks the role and says which are valid; the enum only documents them.
    role: str = Field(json_schema_extra={"enum": list(VALID_ROLES)})
    content: str | list[dict[str, Any]] | None = None


class _StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


# OpenAI's error body, as every 4xx/5xx of the API carries it.
_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["integer", "string", "null"]},
            },
        }
    },
}


class ChatRequest(BaseModel):
    """The fields of an OpenAI chat-completions request that duetlm reads (others are ignored, as
    vLLM does); `max_signal_tokens` and `top_k` are extensions."""

    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[_Message]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    max_signal_tokens: int | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    n: int = 1
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # int64, as OpenAI and vLLM take it
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: _StreamOptions | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


@dataclass(frozen=True)
class ParsedChat:
    """A validated request: the conversation as plain messages and the options with defaults."""

    request: ChatRequest
    messages: list[dict[str, str]]
    max_tokens: int

    @property
    def question(self) -> str:
        return self.messages[-1]["content"]


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _text(content: str | list[dict[str, Any]] | None, where: str) -> str:
    """A message's text; content parts must all be text."""
    if content is None:
        raise ApiError(400, f"{where}.content is missing", param=f"{where}.content")
    if isinstance(content, str):
        return content
    texts = []
    for k, part in enumerate(content):
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ApiError(
                400,
                f"{where}.content[{k}]: only text parts are supported (got type {part.get('type')!r})",
                param=f"{where}.content",
            )
        texts.append(part["text"])
    return "".join(texts)


def _bounded(value: int | None, default: int, name: str, limit: int) -> int:
    if value is None:
        return default
    if not 1 <= value <= limit:
        raise ApiError(400, f"{name} must be between 1 and {limit} (got {value})", param=name)
    return value


def parse_chat(data: Any, cfg: ServeConfig) -> ParsedChat:
    """Validate a request body for `cfg.role`; every failure is a 400 naming the field."""
    if not isinstance(data, dict):
        raise ApiError(400, f"the body must be a JSON object (got {type(data).__name__})")
    if "messages" not in data:
        raise ApiError(400, "messages is required: a list of {role, content} objects", param="messages")
    try:
        req = ChatRequest.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = _loc(first["loc"])
        raise ApiError(400, f"{where}: {first['msg']}", param=where) from None
    if not req.messages:
        raise ApiError(400, "messages is empty: send at least one user message", param="messages")
    messages = []
    for i, m in enumerate(req.messages):
        if m.role not in VALID_ROLES:
            raise ApiError(
                400,
                f"messages[{i}].role {m.role!r} is not supported; use one of {', '.join(VALID_ROLES)}",
                param=f"messages[{i}].role",
            )
        messages.append({"role": m.role, "content": _text(m.content, f"messages[{i}]")})
    if messages[-1]["role"] != "user":
        raise ApiError(
            400, f"the last message must come from the user (got {messages[-1]['role']!r})", param="messages"
        )
    if cfg.role == "duet" and cfg.system_messages == "ignore":
        messages = [m for m in messages if m["role"] != "system"]
    if cfg.role == "duet" and len(messages) != 1:
        roles = ", ".join(m["role"] for m in messages)
        hint = (
            " (a server started with --system-messages ignore drops system messages)"
            if "system" in roles
            else ""
        )
        raise ApiError(
            400,
            f"the duet pipeline answers one question: send exactly one user message (got roles {roles})"
            + hint,
            param="messages",
        )
    if not messages[-1]["content"].strip():
        raise ApiError(400, f"messages[{len(messages) - 1}].content is empty", param="messages")
    if not 1 <= req.n <= cfg.max_n:
        raise ApiError(400, f"n must be between 1 and {cfg.max_n} (got {req.n})", param="n")
    if req.top_logprobs and not req.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    default = cfg.max_answer_tokens if cfg.role == "duet" else cfg.max_signal_tokens
    requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = _bounded(requested, default, name, cfg.max_tokens_limit)
    _bounded(req.max_signal_tokens, cfg.max_signal_tokens, "max_signal_tokens", cfg.max_tokens_limit)
    return ParsedChat(req, messages, max_tokens)


# -- batching ----------------------------------------------------------------------------------------


@dataclass
class BatchStats:
    """Engine calls made by one stage and the requests they carried."""

    calls: int = 0
    requests: int = 0

    def to_json(self) -> dict[str, float]:
        mean = self.requests / self.calls if self.calls else 0.0
        return {"calls": self.calls, "requests": self.requests, "mean_batch": round(mean, 3)}


# Called with each token id (or, from a remote M, each piece of text) of one request's generation, from
# the engine's worker thread.
TokenSink = Callable[[Any], None]


@dataclass
class _Item:
    key: Hashable
    payload: Any
    future: asyncio.Future[Any]
    on_token: TokenSink | None = None


@dataclass
class WindowBatcher:
    """Windowed batching for one engine stage.

    `run(key, payloads, sinks) -> results` is called in `executor` with up to `max_batch` payloads that
    share `key` (their sampling options) and each one's token sink (None when it does not stream).
    A batch opens with the first waiting request and closes after
    `window_s` or at `max_batch` requests; up to `max_inflight` batches run at once (1 for a local
    engine: its worker thread serialises them anyway).
    """

    name: str
    run: Callable[[Hashable, list[Any], list[TokenSink | None]], list[Any]]
    executor: ThreadPoolExecutor
    max_batch: int
    window_s: float
    max_inflight: int = 1
    stats: BatchStats = field(default_factory=BatchStats)
    # Called with (key, payload) before a request is queued; raises ApiError for one that cannot run.
    check: Callable[[Hashable, Any], None] | None = None

    def start(self) -> None:
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._slots = asyncio.Semaphore(self.max_inflight)
        self._running: set[asyncio.Task[None]] = set()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher-{self.name}")

    async def stop(self) -> None:
        for task in [self._task, *self._running]:
            task.cancel()
        await asyncio.gather(self._task, *self._running, return_exceptions=True)
        while not self._queue.empty():  # nothing may wait forever
            item = self._queue.get_nowait()
            if not item.future.done():
                item.future.set_exception(ApiError(503, "the server is shutting down", kind="server_error"))

    async def submit(self, key: Hashable, payload: Any, on_token: TokenSink | None = None) -> Any:
        if self.check is not None:
            self.check(key, payload)
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Item(key, payload, future, on_token))
        return await future

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._slots.acquire()
            batch = [await self._queue.get()]
            deadline = loop.time() + self.window_s
            while len(batch) < self.max_batch:
                if not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except TimeoutError:
                    break
            task = loop.create_task(self._run_batch(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run_batch(self, batch: list[_Item]) -> None:
        loop = asyncio.get_running_loop()
        try:
            groups: dict[Hashable, list[_Item]] = {}
            for item in batch:
                groups.setdefault(item.key, []).append(item)
            for key, items in groups.items():
                live = [it for it in items if not it.future.done()]  # a cancelled request is skipped
                if not live:
                    continue
                self.stats.calls += 1
                self.stats.requests += len(live)
                try:
                    results = await loop.run_in_executor(
                        self.executor,
                        self.run,
                        key,
                        [it.payload for it in live],
                        [it.on_token for it in live],
                    )
                except Exception as err:  # the engine boundary: every waiting request gets the error
                    for it in live:
                        if not it.future.done():
                            it.future.set_exception(err)
                    continue
                for it, result in zip(live, results, strict=True):
                    if not it.future.done():
                        it.future.set_result(result)
        except asyncio.CancelledError:  # shutdown: no request may wait for a batch that is gone
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(
                        ApiError(503, "the server is shutting down", kind="server_error")
                    )
            raise
        finally:
            self._slots.release()


class _Withdrawn(Exception):
    """Raised from a request's token sink to take it out of a running continuous batch."""


@dataclass
class ContinuousStage:
    """Continuous batching for one stage on a local HF model: each request goes straight into the
    model's `ContinuousBatcher` (one per model, shared by M and m when they are the same engine) and
    joins the running batch at its next decode step; finished rows leave at once.

    `prepare(key, payload) -> (prompt ids, sampling)` turns a stage's request into the batcher's.
    A cancelled request (a client that went away) leaves the batch at its next token.
    """

    name: str
    prepare: Callable[[Hashable, Any], tuple[list[int], SamplingParams]]
    batcher: Any  # engines.continuous.ContinuousBatcher

    @property
    def stats(self) -> Any:
        return self.batcher.stats

    def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass  # the service closes the batchers, which fails what is still in them

    async def submit(self, key: Hashable, payload: Any, on_token: TokenSink | None = None) -> Any:
        from duetlm.engines.continuous import BatcherClosed

        prompt_ids, params = self.prepare(key, payload)
        withdrawn = threading.Event()

        def sink(token_id: int) -> None:
            if withdrawn.is_set():
                raise _Withdrawn
            if on_token is not None:
                on_token(token_id)

        try:
            future = self.batcher.submit(prompt_ids, params, sink)
        except ValueError as err:
            raise ApiError(400, f"the {self.name} model cannot take this request: {err}") from None
        except BatcherClosed:
            raise ApiError(503, "the server is shutting down", kind="server_error") from None
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            withdrawn.set()
            raise
        except BatcherClosed:
            raise ApiError(503, "the server is shutting down", kind="server_error") from None


# -- metrics -----------------------------------------------------------------------------------------

ROUTES = ("/v1/chat/completions", "/v1/models", "/health", "/metrics", "/tokenize")


class ServeMetrics:
    """Prometheus metrics of one server (`GET /metrics`), in a registry of its own so that several
    servers in one process keep theirs apart.

    - `duetlm_http_requests_total{route, status}`: every HTTP answer (unknown routes as "other");
    - `duetlm_request_seconds{stream}`: a chat completion from arrival to its last byte;
    - `duetlm_time_to_first_output_seconds{part}`: streams, arrival to the first signal / answer text;
    - `duetlm_tokens_total{model, kind}`: prompt and completion tokens of M ("large") and m ("small");
    - `duetlm_signal_tokens`: M's tokens per choice (|z|, what DUET makes short), and
      `duetlm_signals_total{complete}`: whether M closed its thinking within its cap;
    - `duetlm_requests_in_flight` and `duetlm_batch_mean{stage}` (requests per engine call, windowed;
      rows per decode step, continuous).
    """

    def __init__(self, service: DuetService) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        reg = self.registry = CollectorRegistry()
        self.http = Counter(
            "duetlm_http_requests", "HTTP answers by route and status", ["route", "status"], registry=reg
        )
        seconds = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)
        self.latency = Histogram(
            "duetlm_request_seconds",
            "chat completion, arrival to last byte",
            ["stream"],
            buckets=seconds,
            registry=reg,
        )
        self.first_output = Histogram(
            "duetlm_time_to_first_output_seconds",
            "streamed chat completion, arrival to the first text of the signal or the answer",
            ["part"],
            buckets=seconds,
            registry=reg,
        )
        self.tokens = Counter(
            "duetlm_tokens", "tokens by model (large: M, small: m) and kind", ["model", "kind"], registry=reg
        )
        self.signal_tokens = Histogram(
            "duetlm_signal_tokens",
            "M's tokens per choice (|z| and its end marker)",
            buckets=(4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192),
            registry=reg,
        )
        self.signals = Counter(
            "duetlm_signals", "signals by whether M closed its thinking", ["complete"], registry=reg
        )
        Gauge("duetlm_requests_in_flight", "requests admitted and not done", registry=reg).set_function(
            lambda: service.in_flight
        )
        batch = Gauge(
            "duetlm_batch_mean",
            "mean batch per stage (window: requests/call; continuous: rows/step)",
            ["stage"],
            registry=reg,
        )
        for stage in service.stages:
            batch.labels(stage.name).set_function(lambda stage=stage: stage.stats.to_json()["mean_batch"])

    def answered(self, route: str, status: int) -> None:
        self.http.labels(route if route in ROUTES else "other", str(status)).inc()

    def completed(
        self, outcomes: list[DuetOutcome], usage: dict[str, Any], seconds: float, stream: bool
    ) -> None:
        """A chat completion's figures (`usage` as the response reports it)."""
        self.latency.labels(str(stream).lower()).observe(seconds)
        for model in ("large", "small"):
            for kind in ("prompt", "completion"):
                self.tokens.labels(model, kind).inc(usage[model][f"{kind}_tokens"])
        for o in outcomes:
            self.signal_tokens.observe(o.large.num_tokens)
            self.signals.labels(str(o.signal.complete).lower()).inc()


# -- the service -------------------------------------------------------------------------------------


def _prompt_tokens(g: Generation) -> int:
    """Prompt tokens of a generation: counted locally, or reported by a remote server."""
    return len(g.prompt_token_ids) or int(getattr(g, "prompt_tokens", 0))


@dataclass(frozen=True)
class StageKey:
    """What a batch must share: the sampling options, and for a seeded sampled request its own id (so
    it runs alone and its seed reproduces it)."""

    params: SamplingParams
    alone: str | None = None


def _rows(sinks: list[TokenSink | None]) -> OutputCallback | None:
    """The engine's `on_token` for a batch: row i's tokens go to sinks[i] (one sample per request)."""
    if not any(sinks):
        return None

    def on_token(row: int, output: Any) -> None:
        sink = sinks[row]
        if sink is not None:
            sink(output)

    return on_token


def _stage_key(params: SamplingParams) -> StageKey:
    alone = uuid.uuid4().hex if params.seed is not None and params.temperature > 0 else None
    return StageKey(params, alone)


def _reasoning(text: str) -> dict[str, str]:
    """M's thinking under both names clients read: `reasoning_content` (DeepSeek's, most clients) and
    `reasoning` (vLLM's since it deprecated the other)."""
    return {"reasoning_content": text, "reasoning": text}


def _duet_fields(outcome: DuetOutcome) -> dict[str, Any]:
    return {"signal_complete": outcome.signal.complete, "large_finish": outcome.large.finish_reason}


@dataclass
class DuetOutcome:
    """One request's pass: M's generation and signal, and m's generation (None for role large)."""

    large: Generation
    signal: protocol.Signal
    small: Generation | None = None


class DuetService:
    """The engines, the pipeline, the batchers and the admission bound behind the HTTP routes."""

    def __init__(self, cfg: ServeConfig, large: Engine, small: Engine | None = None) -> None:
        from duetlm.pipeline import DuetPipeline

        self.cfg = cfg
        self.large = large
        self.small = small
        self.pipeline = DuetPipeline(large, small if small is not None else large)
        self.in_flight = 0
        self._executors: dict[int, ThreadPoolExecutor] = {}
        self._continuous: dict[int, Any] = {}
        window = cfg.batch_window_ms / 1000
        if cfg.role == "duet":
            self.large_stage = self._stage("large", self._run_think, self._prepare_think, large, window)
        else:
            self.large_stage = self._stage("large", self._run_large_chat, self._prepare_chat, large, window)
        self.small_stage = (
            self._stage("small", self._run_answer, self._prepare_answer, small, window)
            if small is not None
            else None
        )
        self.metrics = ServeMetrics(self)

    def _stage(
        self,
        name: str,
        run: Callable[..., list[Any]],
        prepare: Callable[[Hashable, Any], tuple[list[int], SamplingParams]],
        engine: Engine,
        window: float,
    ) -> WindowBatcher | ContinuousStage:
        """The stage's batching: continuous on a local HF model (unless `batching: window`), else
        windowed (vLLM's offline engine and a remote M take whole batches)."""
        from duetlm.engines.hf import HFEngine

        if self.cfg.batching == "continuous" and isinstance(engine, HFEngine):
            if id(engine) not in self._continuous:
                from duetlm.engines.continuous import ContinuousBatcher

                self._continuous[id(engine)] = ContinuousBatcher(
                    engine,
                    max_batch=self.cfg.max_batch,
                    admit_ratio=self.cfg.admit_ratio,
                    admit_max_wait=self.cfg.admit_max_wait,
                )
            return ContinuousStage(name, prepare, self._continuous[id(engine)])
        batcher = self._batcher(name, run, engine, window)
        if isinstance(engine, HFEngine):  # a request that does not fit the model is a 400 before it waits
            batcher.check = lambda key, payload: self._check_fits(name, engine, *prepare(key, payload))
        return batcher

    @staticmethod
    def _check_fits(name: str, engine: Any, prompt_ids: list[int], params: SamplingParams) -> None:
        from duetlm.engines.hf import check_fits

        try:
            check_fits(engine.model, len(prompt_ids), params.max_new_tokens)
        except ValueError as err:
            raise ApiError(400, f"the {name} model cannot take this request: {err}") from None

    def _batcher(
        self, name: str, run: Callable[..., list[Any]], engine: Engine, window: float
    ) -> WindowBatcher:
        # One worker per local engine: torch work on one model is serialised (M and m share it when
        # they are the same engine). A remote engine has no torch state: several batches may be out.
        workers = 4 if getattr(engine, "thread_safe", False) else 1
        if id(engine) not in self._executors:
            self._executors[id(engine)] = ThreadPoolExecutor(workers, thread_name_prefix=f"engine-{name}")
        return WindowBatcher(name, run, self._executors[id(engine)], self.cfg.max_batch, window, workers)

    @property
    def stages(self) -> list[WindowBatcher | ContinuousStage]:
        return [s for s in (self.large_stage, self.small_stage) if s is not None]

    async def start(self) -> None:
        for stage in self.stages:
            stage.start()

    async def stop(self) -> None:
        for stage in self.stages:
            await stage.stop()
        for batcher in self._continuous.values():
            await asyncio.get_running_loop().run_in_executor(None, batcher.close, 30.0)
        for pool in self._executors.values():
            pool.shutdown(wait=False, cancel_futures=True)

    # The batch functions run in the engines' worker threads.
    def _run_think(
        self, key: StageKey, questions: list[str], sinks: list[TokenSink | None]
    ) -> list[Generation]:
        pipe = replace(self.pipeline, large_sampling=key.params)
        return [gs[0] for gs in pipe.think(questions, on_token=_rows(sinks))]

    def _run_answer(
        self, key: StageKey, items: list[tuple[str, str]], sinks: list[TokenSink | None]
    ) -> list[Generation]:
        pipe = replace(self.pipeline, small_sampling=key.params)
        questions, signals = [q for q, _ in items], [z for _, z in items]
        return [gs[0] for gs in pipe.answer(questions, signals, n=1, on_token=_rows(sinks))]

    # What a continuous stage hands its batcher: the same prompts and sampling as the batch functions.
    def _prepare_think(self, key: StageKey, question: str) -> tuple[list[int], SamplingParams]:
        pipe = replace(self.pipeline, large_sampling=key.params)
        return self.large.encode(pipe.think_prompts([question]))[0], pipe.large_params()  # type: ignore[attr-defined]

    def _prepare_answer(self, key: StageKey, item: tuple[str, str]) -> tuple[list[int], SamplingParams]:
        prompt = self.pipeline.answer_prompts([item[0]], [item[1]])[0]
        return self.small.encode([prompt])[0], replace(key.params, n=1)  # type: ignore[union-attr]

    def _prepare_chat(self, key: StageKey, prompt: str) -> tuple[list[int], SamplingParams]:
        return self.large.encode([prompt])[0], key.params  # type: ignore[attr-defined]

    def _run_large_chat(
        self, key: StageKey, prompts: list[str], sinks: list[TokenSink | None]
    ) -> list[Generation]:
        return [gs[0] for gs in generate_streaming(self.large, prompts, key.params, _rows(sinks))]

    @contextlib.contextmanager
    def admitted(self) -> Iterator[Callable[[], None]]:
        """Admission: a slot for the request, or a 503 at once when `max_queue` are in the server.

        Yields `keep()`: call it to hand the slot to a streaming response, which releases it itself.
        """
        if self.in_flight >= self.cfg.max_queue:
            raise ApiError(
                503,
                f"the server is busy ({self.in_flight} requests in flight, queue limit {self.cfg.max_queue}); "
                f"retry after {self.cfg.retry_after_s} s",
                kind="server_overloaded",
                headers={"Retry-After": str(self.cfg.retry_after_s)},
            )
        self.in_flight += 1
        kept = False

        def keep() -> None:
            nonlocal kept
            kept = True

        try:
            yield keep
        finally:
            if not kept:
                self.in_flight -= 1

    def answered(self, task: asyncio.Task[Any]) -> None:
        """Done-callback of a streamed answer: free its slot (and mark its error as seen: the stream
        reports it, or nobody is listening any more)."""
        self.in_flight -= 1
        if not task.cancelled():
            task.exception()

    def _sampling(
        self,
        chat: ParsedChat,
        max_tokens: int,
        stop: tuple[str, ...] = (),
        index: int = 0,
        logprobs: bool = False,
    ) -> SamplingParams:
        """The sampling options of choice `index` (with n > 1 and a seed, choice i samples with seed + i,
        so choice 0 is what the same request with n = 1 gets)."""
        req = chat.request
        # Choice i samples with seed + i, wrapped into int64 (what the request's seed is, and what a
        # remote M's server accepts).
        seed = None if req.seed is None else (req.seed + index + 2**63) % 2**64 - 2**63
        return SamplingParams(
            temperature=self.cfg.temperature if req.temperature is None else req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            max_new_tokens=max_tokens,
            stop=stop,
            seed=seed,
            logprobs=logprobs,
            top_logprobs=req.top_logprobs or 0,  # SamplingParams drops it without logprobs
        )

    def _user_stop(self, chat: ParsedChat) -> tuple[str, ...]:
        stop = chat.request.stop
        return (stop,) if isinstance(stop, str) else tuple(stop or ())

    async def think(self, chat: ParsedChat, on_token: TokenSink | None = None, index: int = 0) -> DuetOutcome:
        """Stage 1: M's signal (role duet), or M's thinking on the conversation (role large)."""
        if self.cfg.role == "duet":
            signal_cap = chat.request.max_signal_tokens or self.cfg.max_signal_tokens
            key = _stage_key(self._sampling(chat, signal_cap, index=index))
            payload: Any = chat.question
        else:
            base = self._sampling(chat, chat.max_tokens, self._user_stop(chat), index, chat.request.logprobs)
            key = _stage_key(replace(self.pipeline, large_sampling=base).large_params())
            try:
                payload = protocol.large_chat_prompt(getattr(self.large, "tokenizer", None), chat.messages)
            except DuetError as err:
                raise ApiError(400, str(err), param="messages") from None
        try:
            g = await self.large_stage.submit(key, payload, on_token)
        except ApiError:
            raise
        except Exception as err:
            raise _upstream_error(err) from err
        return DuetOutcome(g, protocol.extract_signal(g.text))

    async def answer(
        self, chat: ParsedChat, outcome: DuetOutcome, on_token: TokenSink | None = None, index: int = 0
    ) -> DuetOutcome:
        """Stage 2: m's answer to (x, z)."""
        assert self.small_stage is not None
        key = _stage_key(
            self._sampling(chat, chat.max_tokens, self._user_stop(chat), index, chat.request.logprobs)
        )
        try:
            payload = (chat.question, outcome.signal.text)
            outcome.small = await self.small_stage.submit(key, payload, on_token)
        except ApiError:
            raise
        except Exception as err:
            raise _upstream_error(err) from err
        return outcome

    async def run(
        self, chat: ParsedChat, index: int = 0, events: asyncio.Queue[tuple[int, str, Any]] | None = None
    ) -> DuetOutcome:
        """Choice `index` of a request: M's pass, then m's (role duet). With `events` (a stream), its
        progress goes there as (index, kind, value), in order: ("large", token id or text)*,
        ("signal", outcome), ("small", token id)*, ("done", outcome)."""
        loop = asyncio.get_running_loop()

        def sink(kind: str) -> TokenSink | None:
            if events is None:
                return None
            # From the engine's worker thread: hand each output to the event loop, in order (the batch's
            # result is set after its tokens, through the same loop, so it cannot overtake them).
            return lambda output: loop.call_soon_threadsafe(events.put_nowait, (index, kind, output))

        outcome = await self.think(chat, sink("large"), index)
        if events is not None:
            events.put_nowait((index, "signal", outcome))
        if self.cfg.role == "duet":
            outcome = await self.answer(chat, outcome, sink("small"), index)
        if events is not None:
            events.put_nowait((index, "done", outcome))
        return outcome

    async def run_all(
        self, chat: ParsedChat, events: asyncio.Queue[tuple[int, str, Any]] | None = None
    ) -> list[DuetOutcome]:
        """The request's n choices, concurrently (they batch with each other); the first failure
        cancels the rest and is raised."""
        if chat.request.n == 1:
            return [await self.run(chat, 0, events)]
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(self.run(chat, i, events)) for i in range(chat.request.n)]
        except* Exception as errors:
            raise errors.exceptions[0] from None
        return [t.result() for t in tasks]

    # -- responses ----------------------------------------------------------------------------------

    def usage(self, outcomes: list[DuetOutcome]) -> dict[str, Any]:
        """Tokens of all choices: M's prompt once (every choice shares it), m's prompts (each holds its
        own signal) and both models' completions summed."""
        large = {
            "prompt_tokens": _prompt_tokens(outcomes[0].large),
            "completion_tokens": sum(o.large.num_tokens for o in outcomes),
        }
        small = {
            "prompt_tokens": sum(_prompt_tokens(o.small) for o in outcomes if o.small is not None),
            "completion_tokens": sum(o.small.num_tokens for o in outcomes if o.small is not None),
        }
        prompt = large["prompt_tokens"] + small["prompt_tokens"]
        completion = large["completion_tokens"] + small["completion_tokens"]
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "completion_tokens_details": {"reasoning_tokens": large["completion_tokens"]},
            "large": large,
            "small": small,
        }

    def choice_fields(self, chat: ParsedChat, outcome: DuetOutcome) -> tuple[str, str]:
        """(content, finish_reason) of the choice."""
        if outcome.small is not None:
            return answer_text(outcome.small.text, self._user_stop(chat)), outcome.small.finish_reason
        return "", outcome.large.finish_reason

    def extensions(self, outcome: DuetOutcome) -> dict[str, Any]:
        """Fields beyond the OpenAI choice: for role large, what `RemoteEngine` needs to rebuild M's
        raw text and count its tokens exactly (vLLM's `stop_reason` and `token_ids`)."""
        if self.cfg.role == "large":
            return {
                "stop_reason": protocol.THINK_CLOSE if outcome.signal.complete else None,
                "token_ids": list(outcome.large.token_ids),
            }
        return {}

    def logprobs(self, chat: ParsedChat, outcome: DuetOutcome) -> dict[str, Any] | None:
        """OpenAI's `choice.logprobs` when the request asked for them: one entry per token of the
        choice's text (m's answer; M's thinking for role large), a final end-of-sequence token left
        out; `logprob` is the model's own log-probability of the sampled token (before temperature and
        top-k/top-p, as the engines report it); `top_logprobs` the request's number of most likely
        tokens at that position under the same distribution (empty when not asked for, or when the
        engine reports none: a remote M)."""
        gen = outcome.small if outcome.small is not None else outcome.large
        if not chat.request.logprobs or gen.logprobs is None:
            return None
        engine = self.small if outcome.small is not None else self.large
        tok = getattr(engine, "tokenizer", None)
        ids = text_ids(list(gen.token_ids), frozenset(getattr(engine, "eos_ids", ())))

        def entry(token_id: int, lp: float) -> dict[str, Any]:
            text = tok.decode([token_id], skip_special_tokens=False) if hasattr(tok, "decode") else ""
            return {"token": text, "logprob": lp, "bytes": list(text.encode())}

        tops = gen.top_logprobs or []
        entries = []
        for k, (token_id, lp) in enumerate(zip(ids, gen.logprobs, strict=False)):
            top = [entry(t, v) for t, v in tops[k]] if k < len(tops) else []
            entries.append({**entry(token_id, lp), "top_logprobs": top})
        return {"content": entries}

    def completion(self, chat: ParsedChat, outcomes: list[DuetOutcome]) -> dict[str, Any]:
        choices = []
        for i, outcome in enumerate(outcomes):
            content, finish = self.choice_fields(chat, outcome)
            message = {"role": "assistant", "content": content, **_reasoning(outcome.signal.text)}
            choices.append(
                {
                    "index": i,
                    "message": message,
                    "finish_reason": finish,
                    "logprobs": self.logprobs(chat, outcome),
                    **self.extensions(outcome),
                    "duet": _duet_fields(outcome),
                }
            )
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.cfg.model_name,
            "choices": choices,
            "usage": self.usage(outcomes),
            "duet": _duet_fields(outcomes[0]),  # choice 0's, where clients of n = 1 look
        }

    def open_stream(self, chat: ParsedChat) -> tuple[asyncio.Queue[tuple[int, str, Any]], asyncio.Task[None]]:
        """Start a streamed request: a task runs its n choices (`run_all` with an event queue) and
        ends the queue with ("error", ApiError) if one fails. Token events come only from engines that
        stream."""
        events: asyncio.Queue[tuple[int, str, Any]] = asyncio.Queue()

        async def run() -> None:
            try:
                await self.run_all(chat, events)
            except ApiError as err:
                events.put_nowait((0, "error", err))
            except Exception as err:  # a stream must end with an event, whatever broke
                events.put_nowait((0, "error", _upstream_error(err)))

        return events, asyncio.get_running_loop().create_task(run())

    def _deltas(
        self, engine: Engine | None, view: Callable[[str], str], extra: tuple[int, ...] = ()
    ) -> TextDeltas:
        hidden = set(getattr(engine, "eos_ids", ())) | set(extra)
        return TextDeltas(getattr(engine, "tokenizer", None), view, hidden)

    async def stream(
        self,
        chat: ParsedChat,
        events: asyncio.Queue[tuple[int, str, Any]],
        task: asyncio.Task[None],
        first: tuple[int, str, Any],
        started: float,
    ) -> AsyncIterator[str]:
        """SSE events: the role, each choice's signal as `reasoning_content` deltas and answer as
        `content` deltas (interleaved across choices as they come), each choice's finish reason, the
        usage if asked, [DONE]. Cancels the request if the client goes."""
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        n = chat.request.n

        def event(index: int, delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
            choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None, **extra}
            chunk = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.cfg.model_name,
                "choices": [choice],
            }
            return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

        tok = getattr(self.large, "tokenizer", None)
        think_stops = protocol.large_stop_token_ids(tok) if tok is not None else ()
        stop = self._user_stop(chat)
        signals = [self._deltas(self.large, protocol.partial_signal, think_stops) for _ in range(n)]
        answers = [self._deltas(self.small, answer_view(stop)) for _ in range(n)]
        outcomes: dict[int, DuetOutcome] = {}
        firsts: set[str] = set()

        def first_text(part: str) -> None:
            if part not in firsts:
                firsts.add(part)
                self.metrics.first_output.labels(part).observe(time.perf_counter() - started)

        for i in range(n):
            yield event(i, {"role": "assistant", "content": ""})
        i, kind, value = first
        try:
            while True:
                if kind == "error":
                    yield f"data: {json.dumps(value.body())}\n\n"
                    return
                if kind == "large":
                    text = signals[i].push_text(value) if isinstance(value, str) else signals[i].push(value)
                    delta = _reasoning(text)
                elif kind == "signal":
                    delta = _reasoning(signals[i].finish(value.signal.text))
                elif kind == "small":
                    delta = {"content": answers[i].push(value)}
                else:  # done
                    outcomes[i] = value
                    content, finish = self.choice_fields(chat, value)
                    if text := answers[i].finish(content):
                        first_text("answer")
                        yield event(i, {"content": text})
                    # Log-probs come with the choice's last chunk: the engines report them per
                    # generation, not per token as it streams.
                    yield event(
                        i, {}, finish, **{"logprobs": self.logprobs(chat, value), **self.extensions(value)}
                    )
                    if len(outcomes) == n:
                        break
                    delta = {}
                if next(iter(delta.values()), ""):
                    first_text("signal" if "reasoning_content" in delta else "answer")
                    yield event(i, delta)
                i, kind, value = await events.get()
        finally:
            if not task.done():  # the client went away: stop its request
                task.cancel()
        done = [outcomes[k] for k in range(n)]
        usage = self.usage(done)
        if chat.request.stream_options is not None and chat.request.stream_options.include_usage:
            usage_chunk = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.cfg.model_name,
                "choices": [],
                "usage": usage,
            }
            yield f"data: {json.dumps(usage_chunk)}\n\n"
        # Recorded before [DONE]: a client that reads the end and then scrapes /metrics sees it.
        self.metrics.completed(done, usage, time.perf_counter() - started, stream=True)
        yield "data: [DONE]\n\n"

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "role": self.cfg.role,
            "model": self.cfg.model_name,
            "in_flight": self.in_flight,
            "max_queue": self.cfg.max_queue,
            "batching": {
                "mode": self.cfg.batching,
                "max_batch": self.cfg.max_batch,
                "window_ms": self.cfg.batch_window_ms,
                "admit_ratio": self.cfg.admit_ratio,
                "admit_max_wait": self.cfg.admit_max_wait,
            },
            "stages": {s.name: s.stats.to_json() for s in self.stages},
        }


# -- the app -----------------------------------------------------------------------------------------


async def read_json(request: Request, limit: int) -> Any:
    """The request body as JSON, refusing more than `limit` bytes (413) and non-JSON (400)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(
            413, f"the request body is {declared} bytes; the limit is {limit}", kind="request_too_large"
        )
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(
                413, f"the request body is over the limit of {limit} bytes", kind="request_too_large"
            )
    if not body:
        raise ApiError(400, "the request body is empty: send a JSON object with model and messages")
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ApiError(400, f"the request body is not valid JSON: {err}") from None


def create_app(service: DuetService) -> FastAPI:
    """The FastAPI app over `service` (its batchers start and stop with the app's lifespan)."""

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(title="duetlm", lifespan=lifespan)
    cfg = service.cfg

    if cfg.api_key:
        expected = f"Bearer {cfg.api_key}".encode()

        @app.middleware("http")
        async def _authorise(request: Request, call_next: Callable[[Request], Any]) -> Any:
            if request.url.path != "/health":
                sent = request.headers.get("authorization", "").encode()
                if not hmac.compare_digest(sent, expected):  # constant time: no key guessing by timing
                    why = "wrong API key" if sent else "no API key: send 'Authorization: Bearer <key>'"
                    err = ApiError(401, why, kind="invalid_request_error")
                    body = err.body()
                    body["error"]["code"] = "invalid_api_key"
                    return JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})
            return await call_next(request)

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(HTTPException)
    async def _http_error(_request: Request, err: HTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(  # keep Starlette's headers: a 405's Allow names the methods (RFC 9110)
            ApiError(err.status_code, str(err.detail), kind=kind).body(),
            status_code=err.status_code,
            headers=getattr(err, "headers", None),
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        where = _loc(tuple(first["loc"]))
        return JSONResponse(ApiError(400, f"{where}: {first['msg']}", param=where).body(), status_code=400)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return service.health()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        entry = {
            "id": cfg.model_name,
            "object": "model",
            "created": 0,
            "owned_by": "duetlm",
            "role": cfg.role,
            "large": cfg.large or cfg.large_url,
            "small": cfg.small,
        }
        return {"object": "list", "data": [entry]}

    @app.middleware("http")
    async def _count(request: Request, call_next: Callable[[Request], Any]) -> Any:
        # Added after the API-key check, so it wraps it: refused requests are counted too.
        response = await call_next(request)
        service.metrics.answered(request.url.path, response.status_code)
        return response

    @app.get(
        "/metrics",
        response_class=Response,
        responses={200: {"description": "Prometheus text format", "content": {"text/plain": {}}}},
    )
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # The handler reads the body itself (size limit, 400s that name the field), so FastAPI does not
    # see ChatRequest: describe it in the OpenAPI document by hand, for clients and schema fuzzers.
    body_schema = ChatRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    body_defs = body_schema.pop("$defs", {})
    body_schema["properties"]["model"]["enum"] = [cfg.model_name]
    body_schema["properties"]["messages"]["minItems"] = 1

    error = {"description": "", "content": {"application/json": {"schema": _ERROR_SCHEMA}}}
    errors = {
        400: "a bad request (the message names the field)",
        401: "a wrong or missing API key",
        404: "a model this server does not serve",
        413: "a body over the size limit",
        502: "the large model's server failed",
        503: "the queue is full (Retry-After says when to retry)",
    }

    @app.post(
        "/v1/chat/completions",
        responses={code: {**error, "description": why} for code, why in errors.items()},
        openapi_extra={
            "requestBody": {"required": True, "content": {"application/json": {"schema": body_schema}}}
        },
    )
    async def chat(request: Request) -> Any:
        started = time.perf_counter()
        chat = parse_chat(await read_json(request, cfg.max_body_bytes), cfg)
        if chat.request.model != cfg.model_name:
            raise ApiError(
                404,
                f"model {chat.request.model!r} is not served here; this server serves {cfg.model_name!r}",
                param="model",
                kind="model_not_found",
            )
        with service.admitted() as keep:
            if not chat.request.stream:
                outcomes = await service.run_all(chat)
                body = service.completion(chat, outcomes)
                service.metrics.completed(
                    outcomes, body["usage"], time.perf_counter() - started, stream=False
                )
                return JSONResponse(body)
            # Streaming: the request runs as a task that releases its slot when done. The response
            # starts with M's first token (or its whole signal, from an engine that does not stream),
            # so a failure before that is still an HTTP error status.
            events, task = service.open_stream(chat)
            task.add_done_callback(service.answered)
            keep()
            try:
                first = await events.get()
            except asyncio.CancelledError:
                task.cancel()
                raise
            if first[1] == "error":
                raise first[2]
            return StreamingResponse(
                service.stream(chat, events, task, first, started), media_type="text/event-stream"
            )

    if cfg.role == "large":

        @app.post("/tokenize")
        async def tokenize(request: Request) -> dict[str, Any]:
            data = await read_json(request, cfg.max_body_bytes)
            if not isinstance(data, dict) or not isinstance(data.get("prompt"), str):
                raise ApiError(400, "prompt is required: a string to tokenize", param="prompt")
            loop = asyncio.get_running_loop()
            count = await loop.run_in_executor(None, service.large.count_tokens, data["prompt"])
            return {"count": count}

    build_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            build_openapi().setdefault("components", {}).setdefault("schemas", {}).update(body_defs)
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def build_service(cfg: ServeConfig) -> DuetService:
    """Load the engines `cfg` names (one engine when M and m are the same model)."""
    from duetlm.config import ModelConfig
    from duetlm.engines import build_engine

    def local(spec: str) -> Engine:
        return build_engine(ModelConfig(path=spec, dtype=cfg.dtype, device=cfg.device, engine=cfg.engine))

    if cfg.large_url is not None:
        from duetlm.engines.remote import RemoteEngine

        large: Engine = RemoteEngine(
            cfg.large_url,
            timeout=cfg.remote_timeout_s,
            max_retries=cfg.remote_max_retries,
            backoff=cfg.remote_backoff_s,
            max_concurrency=cfg.remote_concurrency,
        )
    else:
        assert cfg.large is not None
        large = local(cfg.large)
    small = None
    if cfg.small is not None:
        small = large if cfg.small == cfg.large else local(cfg.small)
    return DuetService(cfg, large, small)


class ServerThread:
    """A uvicorn server for `app` in a background thread, on a socket bound before it starts (port 0:
    an ephemeral port, so tests never collide). `url` is `http://host:port`. A context manager."""

    def __init__(
        self, app: Any, host: str = "127.0.0.1", port: int = 0, startup_timeout: float = 60.0
    ) -> None:
        import uvicorn

        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.host, self.port = self._sock.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True)
        self._startup_timeout = startup_timeout

    def __enter__(self) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + self._startup_timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise DuetError(f"the server on {self.url} did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)
        self._sock.close()


def run_server(cfg: ServeConfig) -> None:
    """`duetlm serve`: load the models and serve until interrupted."""
    import uvicorn

    app = create_app(build_service(cfg))
    # On SIGTERM, stop waiting for open requests after 10 s (the engine call in progress still ends).
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info", timeout_graceful_shutdown=10)
