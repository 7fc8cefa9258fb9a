"""`AsyncVLLMEngine`: vLLM's async engine (`AsyncLLM`) for `duetlm serve --engine vllm`.

Each request goes to vLLM's scheduler as it comes, so vLLM batches continuously across requests (its
own scheduler, not duetlm's windows); tokens come back at every engine step (cumulative outputs, the
new ids passed on as they appear); a request whose caller is cancelled (a client that disconnected)
is aborted inside vLLM, which `AsyncLLM.generate` does when its generator is closed.

Everything that decides what is generated is `VLLMEngine`'s (this class derives from it): the
engine arguments, our tokenizer's ids as prompts (rendered by vLLM's `Renderer`, as the offline path
does), `vllm_params` (stops, seeds per prompt, raw log-probs, decoding controls) and `_generation`. So
a served request gives what `VLLMEngine.generate` gives for the same prompt and options.

vLLM's `AsyncLLM` is built inside the event loop that will use it (`await engine.start()`, from the
server's start-up), because its output handler and ZeroMQ sockets belong to that loop.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from typing import Any

from duetlm.engines.base import Generation, SamplingParams
from duetlm.engines.vllm import VLLMEngine
from duetlm.errors import DuetError

_ids = itertools.count()


class AsyncVLLMEngine(VLLMEngine):
    """`VLLMEngine`'s model and options on `vllm.v1.engine.async_llm.AsyncLLM`: `generate_one` per
    request, awaited. The constructor loads the tokenizer and resolves the engine arguments; the
    engine itself starts in `start()`. The synchronous `generate` is not served here."""

    name = "vllm-async"
    streams_tokens = False  # `generate` (sync) is refused; `generate_one` streams through its callback

    def _start(self, args: dict[str, Any]) -> None:
        self._args = args
        self.engine: Any = None
        self.requests = 0
        self.aborted = 0  # requests cancelled by their caller while vLLM ran them (then aborted in vLLM)

    async def start(self) -> None:
        """Build vLLM's `AsyncLLM` in the running event loop (idempotent)."""
        if self.engine is not None:
            return
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        # The offline engine's arguments; the async engine logs every request at INFO unless told not.
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**self._args, enable_log_requests=False))

    def close(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None

    def generate(self, prompts: list[str], sampling: SamplingParams, on_token: Any = None) -> Any:
        raise DuetError("AsyncVLLMEngine serves requests one by one: await generate_one(prompt_ids, ...)")

    def generate_ids(
        self, prompt_ids: list[list[int]], sampling: SamplingParams, on_token: Any = None
    ) -> Any:
        raise DuetError("AsyncVLLMEngine serves requests one by one: await generate_one(prompt_ids, ...)")

    async def generate_one(
        self, prompt_ids: list[int], sampling: SamplingParams, on_token: Callable[[int], None] | None = None
    ) -> Generation:
        """One sample of `prompt_ids` (`sampling.n` must be 1), each new token passed to `on_token` as
        vLLM's engine step produces it. ValueError for a request vLLM refuses (too long, bad option)."""
        if self.engine is None:
            raise DuetError("AsyncVLLMEngine.start() has not been awaited")
        if sampling.n != 1:
            raise ValueError(f"AsyncVLLMEngine takes one sample per request: SamplingParams.n={sampling.n}")
        if not prompt_ids:
            raise ValueError("prompt is empty after tokenisation")
        start = time.perf_counter()
        params = self.vllm_params(sampling, 0)
        params.output_kind = self._vllm.sampling_params.RequestOutputKind.CUMULATIVE
        (request,) = await self.engine.renderer.render_cmpl_async([{"prompt_token_ids": list(prompt_ids)}])
        rid = f"duetlm-{next(_ids)}"
        self.requests += 1
        last: Any = None
        reported = 0
        try:
            async for output in self.engine.generate(request, params, rid):
                (last,) = output.outputs
                if on_token is not None:
                    for token in list(last.token_ids)[reported:]:
                        on_token(token)
                reported = len(last.token_ids)
        except asyncio.CancelledError:
            self.aborted += 1  # AsyncLLM.generate has aborted the request in vLLM on its way out
            raise
        except Exception as err:
            if type(err).__name__ in ("VLLMValidationError", "VLLMClientError") or isinstance(
                err, ValueError
            ):
                raise ValueError(str(err)) from None
            raise
        if last is None:
            raise RuntimeError(f"vLLM finished request {rid} without an output")
        g = self._generation(0, list(prompt_ids), last, sampling)
        self.stats.calls += 1
        self.stats.generated_tokens += g.num_tokens
        self.stats.seconds += time.perf_counter() - start
        return g
