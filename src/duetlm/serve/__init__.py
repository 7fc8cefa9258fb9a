"""`duetlm serve`: the two-stage pipeline behind an OpenAI-compatible HTTP API (FastAPI).

Routes: `POST /v1/chat/completions`, `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus),
and, with `--role large` or `--role small`, `POST /tokenize` (vLLM's shape; `RemoteEngine.count_tokens`
uses it).

Roles.
- `duet` (default): a conversation (system messages to both models or to m only, earlier turns as
  chat history: `protocol`); M writes the signal z, m answers. The answer is `message.content`, z is
  `message.reasoning_content`; `usage` counts both models' tokens and breaks them down under
  `usage.large` / `usage.small`. `max_tokens` caps m's answer, the extension `max_signal_tokens` M's
  thinking; `temperature`, `top_p`, `top_k` and `seed` apply to both models, `stop` and the decoding
  controls (`response_format`, penalties, `logit_bias`, `min_p`) to the model that writes the
  completion. The model name routes: `duet`, `duet:small` (m alone), `duet:large` (M alone).
- `large`: M alone, with the same API: the conversation is templated by `protocol.large_chat_prompt`
  (thinking on), M stops at the end of thinking, and its thinking is `reasoning_content` (content is
  empty). So one duetlm server can be another's remote M (`--large-url`): the prompt M sees is byte
  for byte the one a local M would see.
- `small`: m alone; a final assistant message is continued (vLLM's `continue_final_message`:
  `protocol.small_chat_prompt`), so one duetlm server can be another's remote m (`--small-url`).

Batching (docs/serving.md has the measurements): `continuous` (default): a local HF model's requests
join its running batch at the next decode step, and with `--engine vllm` vLLM's async engine batches
them itself; `window` otherwise (a remote model) or when asked. Admission is bounded: beyond
`max_queue` requests, a 503 with `Retry-After`; on SIGTERM the server drains.

Streaming (SSE) is token by token: M's signal as `reasoning_content` deltas, then m's answer as
`content` deltas; they add up to exactly the non-streamed response. A request whose M fails before its
first output gets an HTTP error; a later failure is an `error` event. A client that disconnects
cancels its request.

Errors are OpenAI-style JSON (`{"error": {"message", "type", "param", "code"}}`): 401 (API key), 400
(the message names the field), 404, 413, 503 when full or draining, 502 / 504 when a remote M fails or
is slow (or m answers alone: `--large-fallback small`).

The modules, each importing only those above it:
- `config`: `ServeConfig`, the options;
- `openai`: the API's request schema (`ChatRequest`, `parse_chat`), `ApiError`, and the responses as
  pure functions of a request's outcomes (completion, usage, log-probs, SSE chunks);
- `batching`: how a stage batches its requests (`WindowBatcher`, `ContinuousStage`, `AsyncEngineStage`);
- `metrics`: `ServeMetrics`, the Prometheus metrics;
- `stream`: a streamed request's events turned into SSE chunks (`ChatStream`);
- `service`: `DuetService`, the engines, pipeline, stages and admission; `build_service`;
- `app`: the FastAPI app (`create_app`), `ServerThread`, `run_server`.

Names are re-exported lazily, so `from duetlm.serve import ServeConfig` (the CLI) loads no model code.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for type checkers; at run time `__getattr__` imports them
    from duetlm.serve.app import ServerThread, create_app, read_json, run_server  # noqa: F401
    from duetlm.serve.batching import BatchStats, ContinuousStage, StageKey, WindowBatcher  # noqa: F401
    from duetlm.serve.config import ServeConfig  # noqa: F401
    from duetlm.serve.metrics import ServeMetrics  # noqa: F401
    from duetlm.serve.openai import ApiError, ChatRequest, DuetOutcome, ParsedChat, parse_chat  # noqa: F401
    from duetlm.serve.service import DuetService, build_service  # noqa: F401

_EXPORTS = {  # name: the module that defines it
    "ServeConfig": "config",
    "ApiError": "openai",
    "ChatRequest": "openai",
    "DuetOutcome": "openai",
    "ParsedChat": "openai",
    "parse_chat": "openai",
    "BatchStats": "batching",
    "ContinuousStage": "batching",
    "StageKey": "batching",
    "WindowBatcher": "batching",
    "ServeMetrics": "metrics",
    "DuetService": "service",
    "build_service": "service",
    "ServerThread": "app",
    "create_app": "app",
    "read_json": "app",
    "run_server": "app",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"duetlm.serve.{_EXPORTS[name]}"), name)
