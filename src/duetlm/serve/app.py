"""The HTTP layer: the FastAPI app over a `DuetService` (`create_app`; route handlers on `router`,
the service at `request.app.state.service`), `ServerThread` for tests and `run_server` for the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import re
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.models import OpenAPI
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from duetlm.errors import DuetError
from duetlm.serve import openai
from duetlm.serve.config import ServeConfig
from duetlm.serve.openai import ERROR_SCHEMA, ApiError, ParsedChat, error_location, parse_chat
from duetlm.serve.service import DuetService, build_service

CHAT_PATH = "/v1/chat/completions"
REQUEST_ID = "x-request-id"
# One JSON object per answered request (`identify`); `run_server` sends it to stderr.
ACCESS_LOG = logging.getLogger("duetlm.access")
# A client's own id is kept when it is a plain token (a log line must not be forged through it).
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")

router = APIRouter()
large_router = APIRouter()  # roles large and small: one model served (its /tokenize)


def service_of(request: Request) -> DuetService:
    return request.app.state.service


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


# -- routes ------------------------------------------------------------------------------------------


@router.get("/health")
async def health(request: Request) -> Any:
    """200 while serving; 503 once draining (a load balancer stops sending requests here)."""
    service = service_of(request)
    body = service.health()
    return JSONResponse(body, status_code=503) if service.draining else body


@router.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    """The served names: on a duet server `<name>` (M → z → m), `<name>:small` (m alone) and
    `<name>:large` (M alone); `route` says which."""
    cfg = service_of(request).cfg
    suffixes = openai.ROUTES if cfg.role == "duet" else {"": "duet"}
    data = [
        {
            "id": cfg.model_name + suffix,
            "object": "model",
            "created": 0,
            "owned_by": "duetlm",
            "role": cfg.role,
            "route": route,
            "large": cfg.large or cfg.large_url,
            "small": cfg.small or cfg.small_url,
        }
        for suffix, route in suffixes.items()
    ]
    return {"object": "list", "data": data}


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"description": "Prometheus text format", "content": {"text/plain": {}}}},
)
async def metrics(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return Response(generate_latest(service_of(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


_ERRORS = {
    400: "a bad request (the message names the field)",
    401: "a wrong or missing API key",
    404: "a model this server does not serve",
    413: "a body over the size limit",
    502: "the large model's server failed",
    503: "the queue is full (Retry-After says when to retry)",
}


@router.post(
    CHAT_PATH,
    responses={
        code: {"description": why, "content": {"application/json": {"schema": ERROR_SCHEMA}}}
        for code, why in _ERRORS.items()
    },
)
async def chat(request: Request) -> Any:
    started = time.perf_counter()
    service = service_of(request)
    cfg = service.cfg
    parsed = parse_chat(await read_json(request, cfg.max_body_bytes), cfg)
    route = openai.route_of(parsed.request.model, cfg.model_name, cfg.role)
    if route is None:
        names = openai.served_names(cfg.model_name, cfg.role)
        raise ApiError(
            404,
            f"model {parsed.request.model!r} is not served here; this server serves {cfg.model_name!r}"
            + (f" (and {', '.join(repr(n) for n in names[1:])})" if len(names) > 1 else ""),
            param="model",
            kind="model_not_found",
        )
    if route == "large" and parsed.request.logprobs:
        raise ApiError(400, "logprobs are not served on the :large route (M alone)", param="logprobs")
    if route == "large" and dict(parsed.controls).get("json_schema") is not None:
        raise ApiError(
            400,
            "response_format is not served on the :large route (M thinks before it answers); "
            f"ask {cfg.model_name!r} or {cfg.model_name + ':small'!r}, where m writes the answer",
            param="response_format",
        )
    parsed = dataclasses.replace(parsed, route=route)
    service.check_request(parsed)
    with service.admitted() as keep:
        if not parsed.request.stream:
            return await _complete(service, parsed, started)
        return await _stream(service, parsed, started, keep)


async def _complete(service: DuetService, parsed: ParsedChat, started: float) -> JSONResponse:
    outcomes = await service.run_all(parsed)
    body = openai.completion(service.served, parsed, outcomes)
    service.metrics.completed(outcomes, body["usage"], time.perf_counter() - started, stream=False)
    return JSONResponse(body, headers=openai.large_called_header(outcomes))


async def _stream(
    service: DuetService, parsed: ParsedChat, started: float, keep: Callable[[], None]
) -> StreamingResponse:
    """Streaming: the request runs as a task that releases its slot when done. The response starts
    with M's first token (or its whole signal, from an engine that does not stream), so a failure
    before that is still an HTTP error status."""
    events, task = service.open_stream(parsed)
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
        service.stream(parsed, events, task, first, started), media_type="text/event-stream"
    )


@large_router.post("/tokenize")
async def tokenize(request: Request) -> dict[str, Any]:
    service = service_of(request)
    data = await read_json(request, service.cfg.max_body_bytes)
    if not isinstance(data, dict) or not isinstance(data.get("prompt"), str):
        raise ApiError(400, "prompt is required: a string to tokenize", param="prompt")
    loop = asyncio.get_running_loop()
    engine = service.small if service.cfg.role == "small" else service.large
    count = await loop.run_in_executor(None, engine.count_tokens, data["prompt"])  # type: ignore[union-attr]
    return {"count": count}


# -- middleware and error handlers -------------------------------------------------------------------


async def authorise(request: Request, call_next: Callable[[Request], Any]) -> Any:
    """With `api_key` set: every route but /health needs 'Authorization: Bearer <key>'."""
    if request.url.path != "/health":
        expected = f"Bearer {service_of(request).cfg.api_key}".encode()
        sent = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(sent, expected):  # constant time: no key guessing by timing
            why = "wrong API key" if sent else "no API key: send 'Authorization: Bearer <key>'"
            body = ApiError(401, why, kind="invalid_request_error").body()
            body["error"]["code"] = "invalid_api_key"
            return JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})
    return await call_next(request)


async def identify(request: Request, call_next: Callable[[Request], Any]) -> Any:
    """The outermost layer: every response carries `x-request-id` (the client's, when it sent a plain
    token of at most 128 characters; else a new one), and one JSON line goes to the access log with
    the id, route, status and the time to the response's start (a stream's first byte, not its end)."""
    sent = request.headers.get(REQUEST_ID, "")
    request_id = sent if _CLIENT_ID.fullmatch(sent) else uuid.uuid4().hex
    request.state.request_id = request_id
    started = time.perf_counter()
    response = await call_next(request)
    response.headers[REQUEST_ID] = request_id
    if ACCESS_LOG.isEnabledFor(logging.INFO):
        entry = {
            "request_id": request_id,
            "method": request.method,
            "path": request.url.path,
            "status": response.status_code,
            "ms": round(1000 * (time.perf_counter() - started), 1),
            "client": request.client.host if request.client else None,
            "stream": response.headers.get("content-type", "").startswith("text/event-stream"),
        }
        ACCESS_LOG.info(json.dumps(entry))
    return response


async def count(request: Request, call_next: Callable[[Request], Any]) -> Any:
    """Every HTTP answer goes into the metrics (refused requests too: this wraps `authorise`)."""
    response = await call_next(request)
    service_of(request).metrics.answered(request.url.path, response.status_code)
    return response


async def api_error(_request: Request, err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


async def http_error(_request: Request, err: HTTPException) -> JSONResponse:
    kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
    return JSONResponse(  # keep Starlette's headers: a 405's Allow names the methods (RFC 9110)
        ApiError(err.status_code, str(err.detail), kind=kind).body(),
        status_code=err.status_code,
        headers=getattr(err, "headers", None),
    )


async def validation_error(_request: Request, err: RequestValidationError) -> JSONResponse:
    first = err.errors()[0]
    where = error_location(tuple(first["loc"]))
    return JSONResponse(ApiError(400, f"{where}: {first['msg']}", param=where).body(), status_code=400)


# -- the app -----------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The service's batchers start and stop with the app."""
    service = app.state.service
    await service.start()
    try:
        yield
    finally:
        await service.stop()


def create_app(service: DuetService) -> FastAPI:
    """The FastAPI app over `service` (its batchers start and stop with the app's lifespan)."""
    app = FastAPI(title="duetlm", lifespan=lifespan)
    app.state.service = service
    cfg = service.cfg
    if cfg.api_key:
        app.middleware("http")(authorise)
    app.add_exception_handler(ApiError, api_error)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, validation_error)  # type: ignore[arg-type]
    app.middleware("http")(count)  # added after `authorise`, so it wraps it
    app.middleware("http")(identify)  # the last added is the outermost: 401s and 404s get an id too
    app.include_router(router)
    if cfg.role != "duet":
        app.include_router(large_router)
    _describe_chat_body(app, cfg)
    return app


def _describe_chat_body(app: FastAPI, cfg: ServeConfig) -> None:
    """The chat handler reads the body itself (size limit, 400s that name the field), so FastAPI does
    not see `ChatRequest`: put it in the OpenAPI document by hand, for clients and schema fuzzers."""
    body_schema, body_defs = openai.chat_request_schema(cfg.model_name, cfg.role)
    build_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build_openapi()
            body = {"required": True, "content": {"application/json": {"schema": body_schema}}}
            schema["paths"][CHAT_PATH]["post"]["requestBody"] = body
            # As FastAPI writes a route's own OpenAPI fields (None defaults left out, numbers as floats).
            schema = jsonable_encoder(OpenAPI(**schema), by_alias=True, exclude_none=True)
            schema.setdefault("components", {}).setdefault("schemas", {}).update(body_defs)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


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

    service = build_service(cfg)
    app = create_app(service)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    ACCESS_LOG.addHandler(handler)
    ACCESS_LOG.setLevel(logging.INFO)
    ACCESS_LOG.propagate = False

    class Draining(uvicorn.Server):
        """On SIGTERM or Ctrl-C: mark the service draining (new requests 503, /health 503), then
        uvicorn's own shutdown: stop listening, let admitted requests finish for up to
        `drain_timeout_s`, stop the batchers."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            service.draining = True
            super().handle_exit(sig, frame)

    # uvicorn's own access lines are off: `identify` writes structured ones with the request id.
    config = uvicorn.Config(
        app,
        host=cfg.host,
        port=cfg.port,
        log_level="info",
        access_log=False,
        timeout_graceful_shutdown=max(1, round(cfg.drain_timeout_s)),
    )
    Draining(config).run()
