"""The OpenAI chat-completions API: the request schema and its validation (`parse_chat`), the error body
(`ApiError`), and the responses, rendered as pure functions of a request's outcomes (`DuetOutcome`):
the completion body, its choices, usage and log-probs, and the SSE chunks of a stream."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from duetlm import protocol
from duetlm.engines.base import JSON_OBJECT, Generation
from duetlm.engines.hf import text_ids
from duetlm.serve.config import ServeConfig
from duetlm.streaming import answer_text

VALID_ROLES = ("system", "user", "assistant")

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


def upstream_error(err: Exception) -> ApiError:
    """What a failed engine call becomes: 502 for the remote large model, 500 otherwise."""
    from duetlm.engines.remote import RemoteEngineError

    if isinstance(err, RemoteEngineError):
        return ApiError(502, f"the large model (M) failed upstream: {err}", kind="upstream_error")
    return ApiError(500, f"generation failed: {type(err).__name__}: {err}", kind="server_error")


def shutting_down() -> ApiError:
    """The error of a request still waiting when the server stops."""
    return ApiError(503, "the server is shutting down", kind="server_error")


# OpenAI's error body, as every 4xx/5xx of the API carries it.
ERROR_SCHEMA: dict[str, Any] = {
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

# -- requests ----------------------------------------------------------------------------------------


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    # parse_chat checks the role and says which are valid; the enum only documents them.
    role: str = Field(json_schema_extra={"enum": list(VALID_ROLES)})
    content: str | list[dict[str, Any]] | None = None


class _StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The fields of an OpenAI chat-completions request that duetlm reads; `max_signal_tokens` and
    `top_k` are extensions. Any other field is refused with a 400 (`_refuse_unread_fields`), except
    the API's bookkeeping fields (`WITHOUT_EFFECT`) and unsupported ones at their neutral value."""

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
    # Decoding controls of the answering model (`duetlm.engines.controls`); `repetition_penalty` and
    # `min_p` are vLLM's extensions.
    response_format: dict[str, Any] | None = Field(
        None,
        description='{"type": "text"}, {"type": "json_object"}, or {"type": "json_schema", '
        '"json_schema": {"name": ..., "schema": {...}}}: the answer is JSON (matching the schema)',
    )
    logit_bias: dict[str, float] | None = Field(
        None, description="token id (in the answering model's vocabulary) -> bias in [-100, 100]"
    )
    # vLLM's extensions for continuing an assistant turn: what a duet server's remote m is sent
    # (`RemoteEngine`, `--small-url`); served by role small only.
    continue_final_message: bool = False
    add_generation_prompt: bool = True
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)


def served_names(model_name: str, role: str) -> list[str]:
    """Every model name a server answers to (`ROUTES`: a duet server's three)."""
    return [model_name + s for s in ROUTES] if role == "duet" else [model_name]


def chat_request_schema(model_name: str, role: str = "duet") -> tuple[dict[str, Any], dict[str, Any]]:
    """(the JSON schema of a request body to this server, its `$defs`) for the OpenAPI document: the
    handler reads the body itself, so FastAPI does not see `ChatRequest`."""
    schema = ChatRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    defs = schema.pop("$defs", {})
    schema["properties"]["model"]["enum"] = served_names(model_name, role)
    schema["properties"]["messages"]["minItems"] = 1
    return schema, defs


# Per-request routing on a duet server: the model name `<served>` runs M → z → m, `<served>:small`
# m alone, `<served>:large` M alone (it thinks, then answers itself, as `duetlm eval --methods original`).
ROUTES = {"": "duet", ":small": "small", ":large": "large"}


def route_of(model: str, served_name: str, role: str) -> str | None:
    """The route a request's `model` names on this server, or None when it is not served here."""
    if role != "duet":
        return "duet" if model == served_name else None
    for suffix, route in ROUTES.items():
        if model == served_name + suffix:
            return route
    return None


@dataclass(frozen=True)
class ParsedChat:
    """A validated request: the conversation as plain messages and the options with defaults."""

    request: ChatRequest
    messages: list[dict[str, str]]
    max_tokens: int
    route: str = "duet"  # `ROUTES`: which path the request's model name asked for
    # The answering model's decoding controls as `SamplingParams` fields (`controls_of`).
    controls: tuple[tuple[str, Any], ...] = ()

    @property
    def question(self) -> str:
        """What the pipeline takes (role duet): the conversation as one question
        (`protocol.conversation_question`: a lone user message is its bare text)."""
        return protocol.conversation_question(self.messages)

    @property
    def stop(self) -> tuple[str, ...]:
        """The request's stop strings."""
        stop = self.request.stop
        return (stop,) if isinstance(stop, str) else tuple(stop or ())


def error_location(loc: tuple[Any, ...]) -> str:
    """A pydantic error's location as the field's path: `messages[0].content`."""
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


# OpenAI request fields duetlm does not implement: each is accepted at its neutral value (what the
# API does without it) and otherwise refused with a 400 naming it, so that no client gets a 200 that
# silently ignored what it asked for (tools, audio, reasoning effort).
NEUTRAL: dict[str, Callable[[Any], bool]] = {
    "tools": lambda v: v in (None, []),
    "tool_choice": lambda v: v in (None, "none"),
    "functions": lambda v: v in (None, []),
    "function_call": lambda v: v in (None, "none"),
    "audio": lambda v: v is None,
    "modalities": lambda v: v is None or v == ["text"],
    "prediction": lambda v: v is None,
    "web_search_options": lambda v: v is None,
    "reasoning_effort": lambda v: v is None,
}
# Bookkeeping fields of the OpenAI API: accepted, and without effect on the answer.
WITHOUT_EFFECT = frozenset(
    {
        "user",
        "metadata",
        "store",
        "service_tier",
        "parallel_tool_calls",
        "safety_identifier",
        "prompt_cache_key",
    }
)


def _refuse_unread_fields(data: dict[str, Any]) -> None:
    """A 400 for a field this server would not honour: unsupported at a non-neutral value, or unknown."""
    for key, value in data.items():
        if key in NEUTRAL and not NEUTRAL[key](value):
            raise ApiError(
                400, f"{key} is not supported by this server (got {value!r}); leave it unset", param=key
            )
        if key not in NEUTRAL and key not in WITHOUT_EFFECT and key not in ChatRequest.model_fields:
            raise ApiError(
                400,
                f"unknown field {key!r}; this server reads: {', '.join(ChatRequest.model_fields)}",
                param=key,
            )


def _validated(data: Any) -> ChatRequest:
    if not isinstance(data, dict):
        raise ApiError(400, f"the body must be a JSON object (got {type(data).__name__})")
    _refuse_unread_fields(data)
    if "messages" not in data:
        raise ApiError(400, "messages is required: a list of {role, content} objects", param="messages")
    try:
        req = ChatRequest.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = error_location(first["loc"])
        raise ApiError(400, f"{where}: {first['msg']}", param=where) from None
    if not req.messages:
        raise ApiError(400, "messages is empty: send at least one user message", param="messages")
    return req


def _conversation(req: ChatRequest, cfg: ServeConfig) -> list[dict[str, str]]:
    """The request's messages as {role, content} texts, checked for `cfg.role`."""
    messages = []
    for i, m in enumerate(req.messages):
        if m.role not in VALID_ROLES:
            raise ApiError(
                400,
                f"messages[{i}].role {m.role!r} is not supported; use one of {', '.join(VALID_ROLES)}",
                param=f"messages[{i}].role",
            )
        messages.append({"role": m.role, "content": _text(m.content, f"messages[{i}]")})
    _check_continuation(req, cfg.role, messages[-1]["role"])
    if messages[-1]["role"] != "user" and not req.continue_final_message:
        raise ApiError(
            400, f"the last message must come from the user (got {messages[-1]['role']!r})", param="messages"
        )
    if cfg.role == "duet":
        messages = _duet_turns(messages, cfg.system_messages)
    if not messages[-1]["content"].strip():
        raise ApiError(400, f"messages[{len(messages) - 1}].content is empty", param="messages")
    return messages


def _check_continuation(req: ChatRequest, role: str, last: str) -> None:
    """`continue_final_message` (vLLM's): a role-small server continues a final assistant message
    (m's turn opened with z) instead of starting a new turn; `add_generation_prompt` must then be
    false, as vLLM requires, and true otherwise."""
    if req.continue_final_message and role != "small":
        raise ApiError(
            400,
            "continue_final_message is served by a --role small server only",
            param="continue_final_message",
        )
    if req.continue_final_message and last != "assistant":
        raise ApiError(
            400,
            f"continue_final_message needs an assistant message last (got {last!r})",
            param="continue_final_message",
        )
    if req.add_generation_prompt == req.continue_final_message:
        raise ApiError(
            400,
            "add_generation_prompt must be false with continue_final_message and true without it",
            param="add_generation_prompt",
        )


def _duet_turns(messages: list[dict[str, Any]], system: str) -> list[dict[str, Any]]:
    """A duet server's conversation (`protocol`'s docstring, "Conversations"): system messages first,
    as `--system-messages` says, then user and assistant turns alternating, ending with the user's."""
    head = 0
    while head < len(messages) and messages[head]["role"] == "system":
        head += 1
    for i, m in enumerate(messages[head:], start=head):
        if m["role"] == "system":
            raise ApiError(
                400, f"messages[{i}]: system messages must come first", param=f"messages[{i}].role"
            )
        expected = "user" if (i - head) % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise ApiError(
                400,
                f"messages[{i}].role: turns must alternate user, assistant, ..., user (got {m['role']!r})",
                param=f"messages[{i}].role",
            )
    if head and system == "reject":
        raise ApiError(
            400,
            "system messages are refused by this server (--system-messages reject)",
            param="messages[0].role",
        )
    systems = [] if system == "ignore" else messages[:head]
    if system == "small":
        systems = [{**m, protocol.SMALL_ONLY: True} for m in systems]
    return [*systems, *messages[head:]]


def json_schema_of(response_format: dict[str, Any] | None) -> str | None:
    """`SamplingParams.json_schema` for a request's `response_format`: None for text, `JSON_OBJECT`
    for json_object, the schema's JSON text for json_schema; a 400 naming what is wrong."""
    kind = (response_format or {}).get("type", "text")
    if response_format is not None and "type" not in response_format:
        raise ApiError(400, "response_format.type is required", param="response_format.type")
    if kind == "text":
        return None
    if kind == "json_object":
        return JSON_OBJECT
    if kind != "json_schema":
        raise ApiError(
            400,
            f"response_format.type {kind!r} is not supported; use text, json_object or json_schema",
            param="response_format.type",
        )
    spec = response_format.get("json_schema")  # type: ignore[union-attr]
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        raise ApiError(
            400,
            "response_format.json_schema.schema must be a JSON schema object",
            param="response_format.json_schema.schema",
        )
    return json.dumps(spec["schema"], sort_keys=True)


def logit_bias_of(bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    """`SamplingParams.logit_bias` for a request's `logit_bias` (token ids as strings, biases in
    [-100, 100], as OpenAI's); a 400 naming the entry that is not."""
    out = []
    for key, value in (bias or {}).items():
        if not key.isdigit():
            raise ApiError(400, f"logit_bias key {key!r} is not a token id", param="logit_bias")
        if not -100 <= value <= 100:
            raise ApiError(
                400, f"logit_bias[{key!r}] must be between -100 and 100 (got {value})", param="logit_bias"
            )
        out.append((int(key), float(value)))
    return tuple(sorted(out))


def controls_of(req: ChatRequest) -> tuple[tuple[str, Any], ...]:
    """The request's decoding controls as `SamplingParams` fields, those at their neutral value left
    out (so a request without them samples exactly as before)."""
    fields = {
        "json_schema": json_schema_of(req.response_format),
        "logit_bias": logit_bias_of(req.logit_bias),
        "presence_penalty": req.presence_penalty,
        "frequency_penalty": req.frequency_penalty,
        "repetition_penalty": req.repetition_penalty,
        "min_p": req.min_p,
    }
    neutral = {"json_schema": None, "logit_bias": (), "repetition_penalty": 1.0}
    return tuple((k, v) for k, v in fields.items() if v != neutral.get(k, 0.0))


def parse_chat(data: Any, cfg: ServeConfig) -> ParsedChat:
    """Validate a request body for `cfg.role`; every failure is a 400 naming the field."""
    req = _validated(data)
    messages = _conversation(req, cfg)
    if not 1 <= req.n <= cfg.max_n:
        raise ApiError(400, f"n must be between 1 and {cfg.max_n} (got {req.n})", param="n")
    if req.top_logprobs and not req.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    default = cfg.max_signal_tokens if cfg.role == "large" else cfg.max_answer_tokens
    requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = _bounded(requested, default, name, cfg.max_tokens_limit)
    _bounded(req.max_signal_tokens, cfg.max_signal_tokens, "max_signal_tokens", cfg.max_tokens_limit)
    controls = controls_of(req)
    if cfg.role != "duet" and dict(controls).get("json_schema") is not None:
        raise ApiError(
            400,
            "response_format is not served by a --role large server (its completion is M's thinking)",
            param="response_format",
        )
    return ParsedChat(req, messages, max_tokens, controls=controls)


# -- responses ---------------------------------------------------------------------------------------


@dataclass
class DuetOutcome:
    """One choice's pass: M's generation and signal, and m's generation (None for role large).

    With a cascade (`ServeConfig.cascade`): `large` is None where m's own answer was kept (M not
    called), `large_called` says which, `confidence` is m's in its first answer, and `spent` holds m's
    generations that are not the answer (the rejected first answer, the votes), counted in usage."""

    large: Generation | None
    signal: protocol.Signal
    small: Generation | None = None
    large_called: bool | None = None
    confidence: float | None = None
    signal_cached: bool = False  # M's signal came from the signal cache (`serve/cache.py`)
    fallback: str | None = None  # why m answered alone instead ("error" | "timeout"), `large_fallback: small`
    spent: list[Generation] = field(default_factory=list)


@dataclass(frozen=True)
class TokenText:
    """How a response spells a model's tokens (in `logprobs`): its tokenizer and end-of-sequence ids."""

    tokenizer: Any
    eos_ids: frozenset[int] = frozenset()

    @classmethod
    def of(cls, engine: Any) -> TokenText:
        return cls(getattr(engine, "tokenizer", None), frozenset(getattr(engine, "eos_ids", ())))

    def spell(self, token_id: int) -> str:
        tok = self.tokenizer
        return tok.decode([token_id], skip_special_tokens=False) if hasattr(tok, "decode") else ""


@dataclass(frozen=True)
class Served:
    """What a response says about its server: the model name clients use, the role, and the tokens of
    M (`large`) and m (`small`; None for role large)."""

    model: str
    role: str
    large: TokenText
    small: TokenText | None = None


def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def reasoning(text: str) -> dict[str, str]:
    """M's thinking under both names clients read: `reasoning_content` (DeepSeek's, most clients) and
    `reasoning` (vLLM's since it deprecated the other)."""
    return {"reasoning_content": text, "reasoning": text}


def duet_fields(outcome: DuetOutcome) -> dict[str, Any]:
    large_finish = outcome.large.finish_reason if outcome.large is not None else ""
    fields = {"signal_complete": outcome.signal.complete, "large_finish": large_finish}
    if outcome.large_called is not None:
        fields |= {"large_called": outcome.large_called, "confidence": outcome.confidence}
    if outcome.signal_cached:
        fields["signal_cached"] = True
    if outcome.fallback is not None:
        fields["fallback"] = outcome.fallback
    return fields


LARGE_CALLED_HEADER = "X-Duet-Large-Called"


FALLBACK_HEADER = "X-Duet-Fallback"


def large_called_header(outcomes: list[DuetOutcome]) -> dict[str, str]:
    """The response's routing headers: a cascade's `X-Duet-Large-Called` (how many choices called M,
    e.g. `0/1` or `2/4`), and `X-Duet-Fallback` (how many choices m answered alone because M failed)."""
    headers = {}
    if outcomes[0].large_called is not None:
        headers[LARGE_CALLED_HEADER] = f"{sum(bool(o.large_called) for o in outcomes)}/{len(outcomes)}"
    fallbacks = sum(o.fallback is not None for o in outcomes)
    if fallbacks:
        headers[FALLBACK_HEADER] = f"{fallbacks}/{len(outcomes)}"
    return headers


def _prompt_tokens(g: Generation) -> int:
    """Prompt tokens of a generation: counted locally, or reported by a remote server."""
    return len(g.prompt_token_ids) or int(getattr(g, "prompt_tokens", 0))


def usage(outcomes: list[DuetOutcome]) -> dict[str, Any]:
    """Tokens of all choices: M's prompt once (every choice shares it), m's prompts (each holds its
    own signal) and both models' completions summed."""
    called = [o.large for o in outcomes if o.large is not None]  # a cascade may call M for none
    large = {
        "prompt_tokens": _prompt_tokens(called[0]) if called else 0,
        "completion_tokens": sum(g.num_tokens for g in called),
    }
    # m's generations: each choice's answer and what the cascade spent before it (its first answer
    # when rejected, the votes); m's prompts without a signal are the same for a request's choices,
    # but each is prefilled, so each counts.
    small_gens = [g for o in outcomes for g in (*o.spent, o.small) if g is not None]
    small = {
        "prompt_tokens": sum(_prompt_tokens(g) for g in small_gens),
        "completion_tokens": sum(g.num_tokens for g in small_gens),
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


def choice_fields(chat: ParsedChat, outcome: DuetOutcome) -> tuple[str, str]:
    """(content, finish_reason) of the choice: m's answer cut before the first stop string; on the
    `:large` route M's own answer (`protocol.own_answer`), cut alike."""
    if outcome.small is not None:
        return answer_text(outcome.small.text, chat.stop), outcome.small.finish_reason
    assert outcome.large is not None  # role large: M's pass is the choice
    if chat.route == "large":
        return answer_text(protocol.own_answer(outcome.large.text), chat.stop), outcome.large.finish_reason
    return "", outcome.large.finish_reason


def extensions(role: str, outcome: DuetOutcome) -> dict[str, Any]:
    """Fields beyond the OpenAI choice: for role large, what `RemoteEngine` needs to rebuild M's
    raw text and count its tokens exactly (vLLM's `stop_reason` and `token_ids`); for role small,
    m's `token_ids`."""
    if role == "large" and outcome.large is not None:
        return {
            "stop_reason": protocol.THINK_CLOSE if outcome.signal.complete else None,
            "token_ids": list(outcome.large.token_ids),
        }
    if role == "small" and outcome.small is not None:
        return {"token_ids": list(outcome.small.token_ids)}
    return {}


def logprobs(chat: ParsedChat, outcome: DuetOutcome, served: Served) -> dict[str, Any] | None:
    """OpenAI's `choice.logprobs` when the request asked for them: one entry per token of the
    choice's text (m's answer; M's thinking for role large), a final end-of-sequence token left
    out; `logprob` is the model's own log-probability of the sampled token (before temperature and
    top-k/top-p, as the engines report it); `top_logprobs` the request's number of most likely
    tokens at that position under the same distribution (empty when not asked for, or when the
    engine reports none: a remote M)."""
    gen = outcome.small if outcome.small is not None else outcome.large
    if not chat.request.logprobs or gen is None or gen.logprobs is None:
        return None
    vocab = served.small if outcome.small is not None and served.small is not None else served.large
    ids = text_ids(list(gen.token_ids), vocab.eos_ids)

    def entry(token_id: int, lp: float) -> dict[str, Any]:
        text = vocab.spell(token_id)
        return {"token": text, "logprob": lp, "bytes": list(text.encode())}

    tops = gen.top_logprobs or []
    entries = []
    for k, (token_id, lp) in enumerate(zip(ids, gen.logprobs, strict=False)):
        top = [entry(t, v) for t, v in tops[k]] if k < len(tops) else []
        entries.append({**entry(token_id, lp), "top_logprobs": top})
    return {"content": entries}


def last_chunk_fields(served: Served, chat: ParsedChat, outcome: DuetOutcome) -> dict[str, Any]:
    """What a choice's last streamed chunk carries beside its finish reason: log-probs (the engines
    report them per generation, not per token as it streams) and the role's extensions."""
    shown = outcome.large_called is not None or outcome.signal_cached or outcome.fallback is not None
    routed = {"duet": duet_fields(outcome)} if shown else {}
    return {"logprobs": logprobs(chat, outcome, served), **extensions(served.role, outcome), **routed}


def completion(served: Served, chat: ParsedChat, outcomes: list[DuetOutcome]) -> dict[str, Any]:
    """The body of a non-streamed chat completion."""
    choices = []
    for i, outcome in enumerate(outcomes):
        content, finish = choice_fields(chat, outcome)
        thinking = reasoning(outcome.signal.text) if served.role != "small" else {}
        message = {"role": "assistant", "content": content, **thinking}
        choices.append(
            {
                "index": i,
                "message": message,
                "finish_reason": finish,
                "logprobs": logprobs(chat, outcome, served),
                **extensions(served.role, outcome),
                "duet": duet_fields(outcome),
            }
        )
    return {
        "id": new_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": served.model,
        "choices": choices,
        "usage": usage(outcomes),
        "duet": duet_fields(outcomes[0]),  # choice 0's, where clients of n = 1 look
    }


# -- server-sent events ------------------------------------------------------------------------------

DONE = "data: [DONE]\n\n"


def sse(data: dict[str, Any], ensure_ascii: bool = True) -> str:
    return f"data: {json.dumps(data, ensure_ascii=ensure_ascii)}\n\n"


def error_event(err: ApiError) -> str:
    """The event that ends a stream whose request failed after the response started."""
    return sse(err.body())


@dataclass(frozen=True)
class Chunks:
    """The `chat.completion.chunk` events of one streamed response (one id and creation time)."""

    model: str
    id: str
    created: int

    @classmethod
    def start(cls, model: str) -> Chunks:
        return cls(model, new_id(), int(time.time()))

    def choice(self, index: int, delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None, **extra}
        chunk = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }
        return sse(chunk, ensure_ascii=False)

    def usage(self, usage: dict[str, Any]) -> str:
        chunk = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": usage,
        }
        return sse(chunk)
