"""How a stage (M, or m) batches its requests: `WindowBatcher` (a batch per window, one engine call
each), `ContinuousStage` (requests join a local HF model's running batch at each decode step) or
`AsyncEngineStage` (requests go to vLLM's async engine, whose scheduler batches them)."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from duetlm.engines.base import OutputCallback, SamplingParams
from duetlm.serve.openai import ApiError, shutting_down

# Called with each token id (or, from a remote M, each piece of text) of one request's generation, from
# the engine's worker thread.
TokenSink = Callable[[Any], None]


@dataclass(frozen=True)
class StageKey:
    """What a batch must share: the sampling options, and for a seeded sampled request its own id (so
    it runs alone and its seed reproduces it)."""

    params: SamplingParams
    alone: str | None = None


def stage_key(params: SamplingParams) -> StageKey:
    alone = uuid.uuid4().hex if params.seed is not None and params.temperature > 0 else None
    return StageKey(params, alone)


def row_sinks(sinks: list[TokenSink | None]) -> OutputCallback | None:
    """The engine's `on_token` for a batch: row i's tokens go to sinks[i] (one sample per request)."""
    if not any(sinks):
        return None

    def on_token(row: int, output: Any) -> None:
        sink = sinks[row]
        if sink is not None:
            sink(output)

    return on_token


@dataclass
class BatchStats:
    """Engine calls made by one stage and the requests they carried."""

    calls: int = 0
    requests: int = 0

    def to_json(self) -> dict[str, float]:
        mean = self.requests / self.calls if self.calls else 0.0
        return {"calls": self.calls, "requests": self.requests, "mean_batch": round(mean, 3)}


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
        if not hasattr(self, "_task"):  # never started: nothing runs, nothing waits
            return
        for task in [self._task, *self._running]:
            task.cancel()
        await asyncio.gather(self._task, *self._running, return_exceptions=True)
        while not self._queue.empty():  # nothing may wait forever
            item = self._queue.get_nowait()
            if not item.future.done():
                item.future.set_exception(shutting_down())

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
        try:
            groups: dict[Hashable, list[_Item]] = {}
            for item in batch:
                groups.setdefault(item.key, []).append(item)
            for key, items in groups.items():
                await self._run_group(key, items)
        except asyncio.CancelledError:  # shutdown: no request may wait for a batch that is gone
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(shutting_down())
            raise
        finally:
            self._slots.release()

    async def _run_group(self, key: Hashable, items: list[_Item]) -> None:
        """One engine call for the requests of a batch that share `key`."""
        live = [it for it in items if not it.future.done()]  # a cancelled request is skipped
        if not live:
            return
        self.stats.calls += 1
        self.stats.requests += len(live)
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(
                self.executor, self.run, key, [it.payload for it in live], [it.on_token for it in live]
            )
        except Exception as err:  # the engine boundary: every waiting request gets the error
            for it in live:
                if not it.future.done():
                    it.future.set_exception(err)
            return
        for it, result in zip(live, results, strict=True):
            if not it.future.done():
                it.future.set_result(result)


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
            raise shutting_down() from None
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            withdrawn.set()
            raise
        except BatcherClosed:
            raise shutting_down() from None


@dataclass
class AsyncEngineStage:
    """One stage on vLLM's async engine (`engines.vllm_async.AsyncVLLMEngine`, `--engine vllm`): each
    request goes straight to vLLM's scheduler, which batches continuously; tokens come back at each
    engine step; a cancelled request (a client that went away) is aborted inside vLLM.

    `prepare(key, payload) -> (prompt ids, sampling)`, as for `ContinuousStage`."""

    name: str
    prepare: Callable[[Hashable, Any], tuple[list[int], SamplingParams]]
    engine: Any  # engines.vllm_async.AsyncVLLMEngine
    stats: BatchStats = field(default_factory=BatchStats)  # calls = requests: vLLM batches them

    def start(self) -> None:
        pass  # the service starts the engine (it must be built in the serving event loop)

    async def stop(self) -> None:
        pass  # the service shuts the engine down

    async def submit(self, key: Hashable, payload: Any, on_token: TokenSink | None = None) -> Any:
        prompt_ids, params = self.prepare(key, payload)
        self.stats.calls += 1
        self.stats.requests += 1
        try:
            return await self.engine.generate_one(prompt_ids, params, on_token)
        except ValueError as err:
            raise ApiError(400, f"the {self.name} model cannot take this request: {err}") from None


Stage = WindowBatcher | ContinuousStage | AsyncEngineStage
