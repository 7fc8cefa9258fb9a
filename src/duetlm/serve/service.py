"""`DuetService`: the engines, the pipeline, the stages that batch each model's requests and the
admission bound behind the HTTP routes; `build_service` loads the engines a `ServeConfig` names."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Hashable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from duetlm import protocol
from duetlm.cascade import ESTIMATORS, VOTE_TEMPERATURE, calls_large
from duetlm.engines.base import Engine, Generation, SamplingParams, generate_streaming
from duetlm.errors import DuetError
from duetlm.pipeline import DuetPipeline, signals_of
from duetlm.serve.batching import (
    AsyncEngineStage,
    ContinuousStage,
    Stage,
    StageKey,
    TokenSink,
    WindowBatcher,
    row_sinks,
    stage_key,
)
from duetlm.serve.cache import SignalCache, cache_key
from duetlm.serve.config import ServeConfig
from duetlm.serve.metrics import ServeMetrics
from duetlm.serve.openai import ApiError, DuetOutcome, ParsedChat, Served, TokenText, upstream_error
from duetlm.serve.stream import ChatStream, Event, answer_deltas, signal_deltas, sse_events

Prepare = Callable[[Hashable, Any], tuple[list[int], SamplingParams]]


class DuetService:
    """The engines, the pipeline, the batchers and the admission bound behind the HTTP routes.

    Stage M runs `DuetPipeline.think` (role duet) or M on the templated conversation (role large);
    stage m runs `DuetPipeline.answer` (role duet) or m on the templated conversation (role small:
    `protocol.small_chat_prompt`, no M at all: `large` is None). Engine calls run in worker threads,
    one per local engine, so torch work on an engine is serialised and never blocks the event loop.
    """

    def __init__(
        self, cfg: ServeConfig, large: Engine | None, small: Engine | None = None, own_engines: bool = False
    ) -> None:
        self.cfg = cfg
        self.own_engines = own_engines  # built for this service (`build_service`): `stop` closes them
        self.large = large
        self.small = small
        self.pipeline = DuetPipeline(large, small)  # type: ignore[arg-type]  (role small: no M)
        self.served = Served(
            cfg.model_name, cfg.role, TokenText.of(large), TokenText.of(small) if small is not None else None
        )
        self.in_flight = 0
        self.draining = False  # set on SIGTERM: admitted requests finish, new ones get a 503
        self._executors: dict[int, ThreadPoolExecutor] = {}
        self._continuous: dict[int, Any] = {}
        self.large_stage: Stage | None = None
        self.small_stage: Stage | None = None
        if cfg.role == "duet":
            self.large_stage = self._stage("large", self._run_think, self._prepare_think, large)
            self.small_stage = self._stage("small", self._run_answer, self._prepare_answer, small)
        elif cfg.role == "large":
            self.large_stage = self._stage("large", self._run_large_chat, self._prepare_chat, large)
        else:
            self.small_stage = self._stage("small", self._run_small_chat, self._prepare_small_chat, small)
        # The `:large` route (M alone answers): M's prompt without the stop at the end of thinking.
        self.respond_stage = (
            self._stage("large_alone", self._run_respond, self._prepare_respond, large)
            if cfg.role == "duet"
            else None
        )
        self.metrics = ServeMetrics(lambda: self.in_flight, self.stages)
        self.cascade = cfg.cascade_spec()
        self.signal_cache = SignalCache(cfg.signal_cache if cfg.role == "duet" else 0)

    # -- stages -------------------------------------------------------------------------------------

    def _stage(self, name: str, run: Callable[..., list[Any]], prepare: Prepare, engine: Engine) -> Stage:
        """The stage's batching: continuous on a local HF model (unless `batching: window`), vLLM's
        own on its async engine (`--engine vllm`), else windowed (vLLM's offline engine with
        `batching: window`, and a remote model, take whole batches)."""
        from duetlm.engines.hf import HFEngine

        if getattr(engine, "name", "") == "vllm-async":
            return AsyncEngineStage(name, prepare, engine)
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
        batcher = self._batcher(name, run, engine)
        if isinstance(engine, HFEngine):  # a request that does not fit the model is a 400 before it waits
            batcher.check = lambda key, payload: _check_fits(name, engine, *prepare(key, payload))
        return batcher

    def _batcher(self, name: str, run: Callable[..., list[Any]], engine: Engine) -> WindowBatcher:
        # One worker per local engine: torch work on one model is serialised (M and m share it when
        # they are the same engine). A remote engine has no torch state: several batches may be out.
        workers = 4 if getattr(engine, "thread_safe", False) else 1
        if id(engine) not in self._executors:
            self._executors[id(engine)] = ThreadPoolExecutor(workers, thread_name_prefix=f"engine-{name}")
        window = self.cfg.batch_window_ms / 1000
        return WindowBatcher(name, run, self._executors[id(engine)], self.cfg.max_batch, window, workers)

    @property
    def stages(self) -> list[Stage]:
        return [s for s in (self.large_stage, self.small_stage, self.respond_stage) if s is not None]

    def _engines(self) -> list[Any]:
        """M's and m's engines, each once (they are one when M and m are the same model)."""
        return list({id(e): e for e in (self.large, self.small) if e is not None}.values())

    def _async_engines(self) -> list[Any]:
        return [e for e in self._engines() if getattr(e, "name", "") == "vllm-async"]

    async def start(self) -> None:
        for engine in self._async_engines():
            await engine.start()  # vLLM's AsyncLLM belongs to this (the serving) event loop
        for stage in self.stages:
            stage.start()

    async def stop(self) -> None:
        for stage in self.stages:
            await stage.stop()
        for batcher in self._continuous.values():
            await asyncio.get_running_loop().run_in_executor(None, batcher.close, 30.0)
        for pool in self._executors.values():
            pool.shutdown(wait=False, cancel_futures=True)
        # Every engine that holds processes or connections (vLLM's engine cores, a remote's client):
        # the server exits by its signal afterwards, which runs no finalizer, so an engine core not
        # shut down here would outlive it.
        for engine in self._engines() if self.own_engines else []:
            close = getattr(engine, "close", None)
            if close is not None:
                close()

    # The batch functions run in the engines' worker threads.
    def _run_think(
        self, key: StageKey, questions: list[str], sinks: list[TokenSink | None]
    ) -> list[Generation]:
        pipe = replace(self.pipeline, large_sampling=key.params)
        return [gs[0] for gs in pipe.think(questions, on_token=row_sinks(sinks))]

    def _run_answer(
        self, key: StageKey, items: list[tuple[str, str]], sinks: list[TokenSink | None]
    ) -> list[Generation]:
        pipe = replace(self.pipeline, small_sampling=key.params)
        questions, signals = [q for q, _ in items], [z for _, z in items]
        return [gs[0] for gs in pipe.answer(questions, signals, n=1, on_token=row_sinks(sinks))]

    def _run_respond(
        self, key: StageKey, questions: list[str], sinks: list[TokenSink | None]
    ) -> list[Generation]:
        pipe = replace(self.pipeline, large_sampling=key.params, small=None)
        return [gs[0] for gs in pipe.respond(questions, on_token=row_sinks(sinks))]

    def _run_large_chat(
        self, key: StageKey, prompts: list[str], sinks: list[TokenSink | None]
    ) -> list[Generation]:
        return [gs[0] for gs in generate_streaming(self.large, prompts, key.params, row_sinks(sinks))]

    def _run_small_chat(
        self, key: StageKey, prompts: list[str], sinks: list[TokenSink | None]
    ) -> list[Generation]:
        return [gs[0] for gs in generate_streaming(self.small, prompts, key.params, row_sinks(sinks))]

    # What a continuous stage hands its batcher: the same prompts and sampling as the batch functions.
    def _prepare_think(self, key: StageKey, question: str) -> tuple[list[int], SamplingParams]:
        pipe = replace(self.pipeline, large_sampling=key.params)
        return self.large.encode(pipe.think_prompts([question]))[0], pipe.large_params()  # type: ignore[attr-defined]

    def _prepare_answer(self, key: StageKey, item: tuple[str, str]) -> tuple[list[int], SamplingParams]:
        prompt = self.pipeline.answer_prompts([item[0]], [item[1]])[0]
        return self.small.encode([prompt])[0], replace(key.params, n=1)  # type: ignore[union-attr]

    def _prepare_respond(self, key: StageKey, question: str) -> tuple[list[int], SamplingParams]:
        pipe = replace(self.pipeline, large_sampling=key.params, small=None)
        return self.large.encode(pipe.think_prompts([question]))[0], pipe.respond_params()  # type: ignore[attr-defined]

    def _prepare_chat(self, key: StageKey, prompt: str) -> tuple[list[int], SamplingParams]:
        return self.large.encode([prompt])[0], key.params  # type: ignore[attr-defined]

    def _prepare_small_chat(self, key: StageKey, prompt: str) -> tuple[list[int], SamplingParams]:
        return self.small.encode([prompt])[0], key.params  # type: ignore[union-attr]

    # -- admission ----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def admitted(self) -> Iterator[Callable[[], None]]:
        """Admission: a slot for the request, or a 503 at once when `max_queue` are in the server.

        Yields `keep()`: call it to hand the slot to a streaming response, which releases it itself.
        """
        if self.draining:
            raise ApiError(
                503,
                "the server is shutting down; retry on another replica",
                kind="server_shutting_down",
                headers={"Retry-After": str(self.cfg.retry_after_s)},
            )
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

    # -- a request's passes -------------------------------------------------------------------------

    def _sampling(
        self,
        chat: ParsedChat,
        max_tokens: int,
        stop: tuple[str, ...] = (),
        index: int = 0,
        logprobs: bool = False,
        answering: bool = False,
    ) -> SamplingParams:
        """The sampling options of choice `index` (with n > 1 and a seed, choice i samples with seed + i,
        so choice 0 is what the same request with n = 1 gets). `answering`: the pass writes the
        completion the client reads (m's answer; M's on the `:large` route and on a role-large
        server), so the request's decoding controls apply; M's signal on a duet server takes none."""
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
            **(dict(chat.controls) if answering else {}),
        )

    def answering_engine(self, chat: ParsedChat) -> Engine:
        """The model whose generation is the completion: m on duet (but for `:large`) and small
        servers, else M."""
        if self.cfg.role == "small" or (self.cfg.role == "duet" and chat.route != "large"):
            assert self.small is not None
            return self.small
        return self.large  # type: ignore[return-value]  (roles duet and large have M)

    def check_request(self, chat: ParsedChat) -> None:
        """A 400 before the request waits when the answering model cannot take it: log-probs from a
        remote m (its server names tokens by text, so the ids and their spelling are not known here),
        or decoding controls it cannot apply (a `logit_bias` id outside its vocabulary, a schema that
        does not compile)."""
        remote_small = self.cfg.small_url is not None and chat.route != "large"
        if remote_small and chat.request.logprobs:
            raise ApiError(400, "logprobs are not served with a remote m (--small-url)", param="logprobs")
        if not chat.controls:
            return
        from duetlm.engines.controls import check_controls

        sp = SamplingParams(**dict(chat.controls))
        try:
            check_controls(self.answering_engine(chat), sp)
        except ValueError as err:
            param = "response_format" if "schema" in str(err) else "logit_bias"
            raise ApiError(400, str(err), param=param) from None

    def _large_request(self, chat: ParsedChat, index: int) -> tuple[StageKey, Any]:
        """Stage M's (key, payload): the question (role duet), or the templated conversation (role
        large, sampled as `DuetPipeline.large_params` says: M stops at the end of its thinking)."""
        if self.cfg.role == "duet":
            signal_cap = chat.request.max_signal_tokens or self.cfg.max_signal_tokens
            return stage_key(self._sampling(chat, signal_cap, index=index)), chat.question
        base = self._sampling(chat, chat.max_tokens, chat.stop, index, chat.request.logprobs, answering=True)
        key = stage_key(replace(self.pipeline, large_sampling=base).large_params())
        try:
            return key, protocol.large_chat_prompt(getattr(self.large, "tokenizer", None), chat.messages)
        except DuetError as err:
            raise ApiError(400, str(err), param="messages") from None

    async def think(self, chat: ParsedChat, on_token: TokenSink | None = None, index: int = 0) -> DuetOutcome:
        """Stage 1: M's signal (role duet), or M's thinking on the conversation (role large)."""
        key, payload = self._large_request(chat, index)
        cached_as = cache_key(payload, key.params) if self.signal_cache.size else None
        cached = self.signal_cache.get(cached_as)
        if cached is not None:
            self.metrics.signal_cache.labels("hit").inc()
            return DuetOutcome(cached, signals_of([cached])[0], signal_cached=True)
        try:
            g = await self.large_stage.submit(key, payload, on_token)
        except ApiError:
            raise
        except Exception as err:
            raise upstream_error(err) from err
        if cached_as is not None:
            self.signal_cache.put(cached_as, g)
            self.metrics.signal_cache.labels("miss").inc()
        return DuetOutcome(g, signals_of([g])[0])

    async def answer(
        self, chat: ParsedChat, outcome: DuetOutcome, on_token: TokenSink | None = None, index: int = 0
    ) -> DuetOutcome:
        """Stage 2: m's answer to (x, z)."""
        assert self.small_stage is not None
        params = self._sampling(
            chat, chat.max_tokens, chat.stop, index, chat.request.logprobs, answering=True
        )
        key = stage_key(params)
        try:
            payload = (chat.question, outcome.signal.text)
            outcome.small = await self.small_stage.submit(key, payload, on_token)
        except ApiError:
            raise
        except Exception as err:
            raise upstream_error(err) from err
        return outcome

    async def run(
        self, chat: ParsedChat, index: int = 0, events: asyncio.Queue[Event] | None = None
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

        if self.cfg.role == "small":
            outcome = await self.small_chat(chat, index, sink("small"))
            if events is not None:
                events.put_nowait((index, "done", outcome))
            return outcome
        if chat.route != "duet":
            outcome = await self.alone(chat, index, sink)
            if events is not None:
                if chat.route == "large":  # the rest of M's thinking, before its answer
                    events.put_nowait((index, "signal", outcome))
                events.put_nowait((index, "done", outcome))
            return outcome
        kept = await self.first_answer(chat, index) if self.cascade is not None else None
        if kept is not None and not kept.large_called:
            outcome = kept  # m's own answer stands: it goes out whole with "done" (never streamed, see below)
        else:
            fallen = None
            try:
                outcome = await self._large_pass(chat, sink("large"), index)
            except (ApiError, TimeoutError) as err:
                fallen = self._fallback(err)
                outcome = DuetOutcome(None, protocol.Signal("", complete=True), fallback=fallen)
            if events is not None and fallen is None:
                events.put_nowait((index, "signal", outcome))
            if self.cfg.role == "duet":
                outcome = await self.answer(chat, outcome, sink("small"), index)
            if kept is not None:
                outcome.large_called, outcome.confidence, outcome.spent = True, kept.confidence, kept.spent
        if events is not None:
            events.put_nowait((index, "done", outcome))
        return outcome

    async def _large_pass(self, chat: ParsedChat, on_token: TokenSink | None, index: int) -> DuetOutcome:
        """M's pass, bounded by `large_timeout_s` where set."""
        if self.cfg.large_timeout_s is None:
            return await self.think(chat, on_token, index)
        return await asyncio.wait_for(self.think(chat, on_token, index), self.cfg.large_timeout_s)

    def _fallback(self, err: ApiError | TimeoutError) -> str:
        """Why m answers alone (`large_fallback: small`), or the error the request fails with."""
        reason = "timeout" if isinstance(err, TimeoutError) else "error"
        if isinstance(err, ApiError) and err.status < 500:
            raise err  # the request's own fault (a question too long for M): no fallback hides it
        if self.cfg.large_fallback != "small":
            if isinstance(err, TimeoutError):
                raise ApiError(
                    504,
                    f"the large model (M) took longer than --large-timeout-s {self.cfg.large_timeout_s:g} s",
                    kind="upstream_timeout",
                ) from None
            raise err
        self.metrics.fallbacks.labels(reason).inc()
        return reason

    async def alone(
        self, chat: ParsedChat, index: int, sink: Callable[[str], TokenSink | None]
    ) -> DuetOutcome:
        """One model alone, as the request's route asks: `small` (m with no signal, streamed as the
        answer) or `large` (M thinks, then answers itself: its thinking streams as reasoning, its
        answer comes whole when it is done). The cascade does not apply."""
        nothing = protocol.Signal("", complete=True)
        if chat.route == "small":
            return await self.answer(chat, DuetOutcome(None, nothing), sink("small"), index)
        assert self.respond_stage is not None
        signal_cap = chat.request.max_signal_tokens or self.cfg.max_signal_tokens
        # No stop strings in M's generation: they cut the answer (`choice_fields`), never the thinking.
        params = self._sampling(chat, signal_cap + chat.max_tokens, index=index, answering=True)
        try:
            g = await self.respond_stage.submit(stage_key(params), chat.question, sink("large"))
        except ApiError:
            raise
        except Exception as err:
            raise upstream_error(err) from err
        thinking, _ = protocol.split_response(g.text)
        return DuetOutcome(g, protocol.Signal(thinking, complete=protocol.THINK_CLOSE in g.text))

    async def small_chat(self, chat: ParsedChat, index: int, on_token: TokenSink | None) -> DuetOutcome:
        """Role small: m on the conversation (`protocol.small_chat_prompt`: a final assistant message
        is continued, as a duet server's `--small-url` sends m's turn opened with z)."""
        assert self.small_stage is not None and self.small is not None
        params = self._sampling(
            chat, chat.max_tokens, chat.stop, index, chat.request.logprobs, answering=True
        )
        try:
            prompt = protocol.small_chat_prompt(getattr(self.small, "tokenizer", None), chat.messages)
        except DuetError as err:
            raise ApiError(400, str(err), param="messages") from None
        try:
            g = await self.small_stage.submit(stage_key(params), prompt, on_token)
        except ApiError:
            raise
        except Exception as err:
            raise upstream_error(err) from err
        return DuetOutcome(None, protocol.Signal("", complete=True), g)

    async def first_answer(self, chat: ParsedChat, index: int) -> DuetOutcome:
        """The cascade's first pass (`duetlm.cascade`): m answers alone, not streamed (it may be
        rejected), with the votes its estimator asks for; `large_called` says whether M is needed.
        Kept, it is the choice's outcome; rejected, its generations are `spent`."""
        assert self.cascade is not None and self.small_stage is not None
        estimator = ESTIMATORS[self.cascade.estimator]
        params = self._sampling(chat, chat.max_tokens, chat.stop, index, logprobs=True, answering=True)
        vote = replace(params, temperature=VOTE_TEMPERATURE, logprobs=False, top_logprobs=0)
        seeds = [
            None if vote.seed is None else (vote.seed + 1 + j) % 2**63 for j in range(self.cascade.votes)
        ]
        payload = (chat.question, "")
        try:
            first, *votes = await asyncio.gather(
                self.small_stage.submit(stage_key(params), payload, None),
                *(self.small_stage.submit(stage_key(replace(vote, seed=s)), payload, None) for s in seeds),
            )
        except ApiError:
            raise
        except Exception as err:
            raise upstream_error(err) from err
        confidence = estimator.confidence(first.text, first.logprobs, [v.text for v in votes])
        called = calls_large(confidence, self.cascade.threshold)
        spent = [first, *votes] if called else votes
        kept = protocol.Signal("", complete=True)
        return DuetOutcome(None, kept, first, large_called=called, confidence=confidence, spent=spent)

    async def run_all(
        self, chat: ParsedChat, events: asyncio.Queue[Event] | None = None
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

    # -- streams ------------------------------------------------------------------------------------

    def open_stream(self, chat: ParsedChat) -> tuple[asyncio.Queue[Event], asyncio.Task[None]]:
        """Start a streamed request: a task runs its n choices (`run_all` with an event queue) and
        ends the queue with ("error", ApiError) if one fails. Token events come only from engines that
        stream."""
        events: asyncio.Queue[Event] = asyncio.Queue()

        async def run() -> None:
            try:
                await self.run_all(chat, events)
            except ApiError as err:
                events.put_nowait((0, "error", err))
            except Exception as err:  # a stream must end with an event, whatever broke
                events.put_nowait((0, "error", upstream_error(err)))

        return events, asyncio.get_running_loop().create_task(run())

    def stream(
        self,
        chat: ParsedChat,
        events: asyncio.Queue[Event],
        task: asyncio.Task[None],
        first: Event,
        started: float,
    ) -> AsyncIterator[str]:
        """The SSE of a request opened by `open_stream` (`first`: its first event, already taken)."""
        n = chat.request.n
        # M's end-of-thinking stop ids never show in the signal.
        think_stops = self.pipeline.large_params().stop_token_ids
        signals = [signal_deltas(self.large, think_stops) for _ in range(n)]
        answers = [answer_deltas(self.small, chat.stop) for _ in range(n)]
        view = ChatStream(self.served, chat, signals, answers, self.metrics, started)
        return sse_events(view, events, task, first)

    def health(self) -> dict[str, Any]:
        return {
            "status": "draining" if self.draining else "ok",
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


def _check_fits(name: str, engine: Any, prompt_ids: list[int], params: SamplingParams) -> None:
    from duetlm.engines.hf import check_fits

    try:
        check_fits(engine.model, len(prompt_ids), params.max_new_tokens)
    except ValueError as err:
        raise ApiError(400, f"the {name} model cannot take this request: {err}") from None


def build_service(cfg: ServeConfig) -> DuetService:
    """Load the engines `cfg` names (one engine when M and m are the same model)."""
    from duetlm.config import ModelConfig
    from duetlm.engines import build_engine

    def local(spec: str) -> Engine:
        if cfg.engine == "vllm" and cfg.batching == "continuous":  # vLLM's own continuous batching
            from duetlm.engines.vllm_async import AsyncVLLMEngine

            return AsyncVLLMEngine(spec, dtype=cfg.dtype, max_model_len=cfg.vllm_max_model_len)
        return build_engine(ModelConfig(path=spec, dtype=cfg.dtype, device=cfg.device, engine=cfg.engine))

    def remote(url: str) -> Engine:
        from duetlm.engines.remote import RemoteEngine

        return RemoteEngine(
            url,
            timeout=cfg.remote_timeout_s,
            max_retries=cfg.remote_max_retries,
            backoff=cfg.remote_backoff_s,
            max_concurrency=cfg.remote_concurrency,
        )

    large: Engine | None = None
    if cfg.large_url is not None:
        large = remote(cfg.large_url)
    elif cfg.large is not None:
        large = local(cfg.large)
    small = None
    if cfg.small_url is not None:
        small = remote(cfg.small_url)
    elif cfg.small is not None:
        small = large if cfg.small == cfg.large else local(cfg.small)
    return DuetService(cfg, large, small, own_engines=True)
