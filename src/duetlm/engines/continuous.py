"""`ContinuousBatcher`: continuous (iteration-level) batching over an `HFEngine`'s model.

Windowed batching runs one `HFEngine.generate` to the end: a request that arrives meanwhile waits for
the whole batch, and the batch's short requests wait for its longest. Continuous batching (Orca's
"iteration-level scheduling", Yu et al., OSDI 2022) schedules per decode step instead: at every step
boundary new requests are prefilled and join the running batch, and finished rows leave it at once.

One background thread owns the decode loop. Each step:
1. admit waiting requests (FIFO, up to `max_batch` rows in all; when `admit_count` says so, see
   below): prefill them together, left-padded
   with position ids from the attention mask (as `HFEngine` does, so a padded row computes what it
   would alone), sample their first token, and merge their KV cache into the running batch's cache
   (left-pad along the sequence axis to a common width, concatenate along the batch axis);
2. one decode step over every running row;
3. drop finished rows (`batch_select_indices`), then trim leading columns that are padding in every
   row, so the cache is as wide as the longest live row and never grows without bound.

Sampling is per row: each request keeps its `SamplingParams` (greedy at temperature 0, top-k/top-p,
stop strings and stop ids, log-probs of the raw logits) and, when seeded, its own `torch.Generator`,
so a seeded request draws the same tokens whatever else shares its batch.

Admission (`admit_count`, the rule of Hugging Face TGI's router): with a batch running, waiting
requests join only once they are at least `admit_ratio` times the running rows, or once the oldest has
waited `admit_max_wait` decode steps. Why: each admission costs a prefill and a cache merge that stall
every running row; where a step costs about the same whatever its rows (small models, few cores),
admitting in bulk pays that cost once for many requests. `admit_ratio=0` admits at every step boundary.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from duetlm.engines.base import FinishReason, Generation, SamplingParams
from duetlm.engines.controls import RowControls, pick
from duetlm.engines.hf import (
    HFEngine,
    cache_kwarg,
    check_fits,
    forward_last,
    stop_string_hit,
    text_ids,
    top_tokens,
)


class BatcherClosed(RuntimeError):
    """The batcher was closed before this request finished (or the request came after `close()`)."""


@dataclass
class BatcherStats:
    """Counters: decode steps, prefill calls, prompts those prefilled (equal prompts admitted together
    count once), admitted requests, generated tokens, rows summed over decode steps, the most rows in
    one step, and how often leading padding columns were trimmed."""

    steps: int = 0
    prefills: int = 0
    prefill_rows: int = 0
    requests: int = 0
    generated_tokens: int = 0
    row_steps: int = 0
    peak_batch: int = 0
    trims: int = 0

    def to_json(self) -> dict[str, float]:
        mean = self.row_steps / self.steps if self.steps else 0.0
        return {
            "steps": self.steps,
            "prefills": self.prefills,
            "prefill_rows": self.prefill_rows,
            "requests": self.requests,
            "generated_tokens": self.generated_tokens,
            "mean_batch": round(mean, 3),
            "peak_batch": self.peak_batch,
            "trims": self.trims,
        }


@dataclass
class _Request:
    prompt_ids: list[int]
    sampling: SamplingParams
    on_token: Callable[[int], None] | None
    future: Future[Generation]
    stop_ids: frozenset[int]
    queued_step: int = 0  # the batcher's decode-step count when the request was queued
    generator: torch.Generator | None = None
    controls: RowControls | None = None  # its decoding controls (`duetlm.engines.controls`), if any
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    finish: FinishReason | None = None


@dataclass
class _Running:
    """The running batch: one row per request. `mask` covers the cache's columns (B, W); `last` is the
    token each row feeds next and `pos` its position id (both (B,))."""

    rows: list[_Request]
    cache: Any
    mask: torch.Tensor
    pos: torch.Tensor
    last: torch.Tensor


def admit_count(waiting: int, running: int, room: int, oldest_wait: int, ratio: float, max_wait: int) -> int:
    """How many of `waiting` requests join the batch at this step boundary (TGI's admission rule).

    All that fit in `room` join when nothing is running, when `waiting >= ratio * running`, or when the
    oldest has waited `oldest_wait >= max_wait` decode steps; otherwise none (they join later in bulk).
    """
    if waiting <= 0 or room <= 0:
        return 0
    if running == 0 or waiting >= ratio * running or oldest_wait >= max_wait:
        return min(room, waiting)
    return 0


def _stack_right_aligned(parts: list[torch.Tensor], width: int, dim: int) -> torch.Tensor:
    """Concatenate `parts` along the batch axis (0), each placed at the right end of `width` columns
    along `dim` and zero in front: one copy, and zeros (not garbage) in the padding, since a masked
    key still enters attention as 0 x value and garbage may hold NaN."""
    shape = list(parts[0].shape)
    shape[0], shape[dim] = sum(t.shape[0] for t in parts), width
    out = parts[0].new_zeros(shape)
    row = 0
    for t in parts:
        out[row : row + t.shape[0]].narrow(dim, width - t.shape[dim], t.shape[dim]).copy_(t)
        row += t.shape[0]
    return out


def _set_layer_kv(cache: Any, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Replace each layer's keys and values ((B, heads, W, head_dim)) in `cache`.

    The one place that writes layer tensors: transformers has no public op to concatenate caches along
    the batch axis or to drop leading columns (`crop` cuts the end). Reading goes through the public
    iteration of a `DynamicCache` (keys, values first); writing sets `DynamicLayer.keys` / `.values`,
    the attributes that the layer's own `update` concatenates onto (the same in transformers 5.17, 5.19
    and 5.24). Rebuilding with `DynamicCache(ddp_cache_data=...)` also works but copies every tensor
    twice more, which cost a quarter of the decode time on CPU. Sliding-window layers, which keep only
    their window, are refused in `ContinuousBatcher.__init__`.
    """
    for layer, (keys, values) in zip(cache.layers, kv, strict=True):
        layer.keys, layer.values = keys, values


class ContinuousBatcher:
    """Continuous batching of single-sample requests over `engine.model` (see the module docstring).

    `submit(prompt_ids, sampling, on_token)` is thread-safe and returns a `concurrent.futures.Future`
    of one `Generation` (same fields and meaning as `HFEngine.generate_ids`'s, `prompt_index` 0).
    `on_token(token_id)` is called from the batcher's thread for each generated token, in order,
    before the future resolves. At most `max_batch` rows decode at once; the rest wait in a FIFO and
    join as `admit_count(..., admit_ratio, admit_max_wait)` allows. The batcher owns `engine.model` while it runs: do not call `engine.generate` concurrently.
    """

    def __init__(
        self, engine: HFEngine, max_batch: int = 16, admit_ratio: float = 0.0, admit_max_wait: int = 16
    ) -> None:
        from transformers import DynamicCache

        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if admit_ratio < 0 or admit_max_wait < 0:
            raise ValueError(
                f"admit_ratio and admit_max_wait must be >= 0, got {admit_ratio} and {admit_max_wait}"
            )
        self.engine = engine
        self.model = engine.model
        self.max_batch = max_batch
        self.admit_ratio = admit_ratio
        self.admit_max_wait = admit_max_wait
        self.stats = BatcherStats()
        self._config = self.model.config
        self._vocab = int(self.model.get_input_embeddings().num_embeddings)
        # Merging and trimming caches assume every layer keeps all columns; a sliding-window layer
        # keeps only its window, so its columns would not line up with the attention mask.
        if any(DynamicCache(config=self._config).is_sliding):
            raise ValueError(
                f"{type(self.model).__name__} has sliding-window attention layers; "
                "ContinuousBatcher supports full-attention models only"
            )
        pad = engine.tokenizer.pad_token_id
        self._pad = pad if pad is not None else 0
        self._cache_kw = cache_kwarg(self.model)
        self._device = engine.device
        self._cond = threading.Condition()
        self._waiting: deque[_Request] = deque()
        self._running: _Running | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="continuous-batcher", daemon=True)
        self._thread.start()

    # -- public ----------------------------------------------------------------------------------

    def submit(
        self,
        prompt_ids: list[int],
        sampling: SamplingParams,
        on_token: Callable[[int], None] | None = None,
    ) -> Future[Generation]:
        """Queue one request; its `Generation` arrives through the returned future.

        Raises `ValueError` for a request that cannot run (empty prompt, `n != 1`, a token id outside
        the vocabulary, prompt + max_new_tokens beyond the model's positions) and `BatcherClosed`
        after `close()`.
        """
        if self._closed:
            raise BatcherClosed("ContinuousBatcher is closed; no new requests")
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("prompt is empty after tokenisation")
        if sampling.n != 1:
            raise ValueError(f"ContinuousBatcher takes one sample per request: SamplingParams.n={sampling.n}")
        bad = [t for t in prompt if not 0 <= t < self._vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary (size {self._vocab})")
        check_fits(self.model, len(prompt), sampling.max_new_tokens)
        future: Future[Generation] = Future()
        req = _Request(prompt, sampling, on_token, future, self.engine.eos_ids | set(sampling.stop_token_ids))
        if sampling.seed is not None and sampling.temperature > 0:
            req.generator = torch.Generator(device=self._device).manual_seed(sampling.seed)
        controls = self.engine.row_controls([prompt], sampling)  # a bad bias or schema fails here
        req.controls = controls[0] if controls else None
        if sampling.max_new_tokens <= 0:  # nothing to generate: HFEngine returns an empty "length" sample
            future.set_running_or_notify_cancel()
            future.set_result(self._generation(req))
            return future
        with self._cond:
            if self._closed:
                raise BatcherClosed("ContinuousBatcher is closed; no new requests")
            req.queued_step = self.stats.steps
            self._waiting.append(req)
            self._cond.notify()
        return future

    def close(self, timeout: float | None = None) -> None:
        """Stop the decode loop at the next step boundary; running and waiting requests fail with
        `BatcherClosed`. Idempotent."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    @property
    def pending(self) -> int:
        """Requests waiting or decoding."""
        with self._cond:
            return len(self._waiting) + (len(self._running.rows) if self._running else 0)

    def __enter__(self) -> ContinuousBatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the loop --------------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while self._serve_once():
                pass
        finally:  # closed, or the loop itself broke: nobody may wait for a request that will not run
            with self._cond:
                self._closed = True
                left = list(self._waiting) + (self._running.rows if self._running else [])
                self._waiting.clear()
                self._running = None
            self._fail(left, BatcherClosed("ContinuousBatcher was closed before this request finished"))

    def _serve_once(self) -> bool:
        """Admit what fits, then one decode step. False once closed."""
        with self._cond:
            while not self._closed and not self._waiting and self._running is None:
                self._cond.wait()
            if self._closed:
                return False
            running = len(self._running.rows) if self._running else 0
            oldest = self.stats.steps - self._waiting[0].queued_step if self._waiting else 0
            take = admit_count(
                len(self._waiting),
                running,
                self.max_batch - running,
                oldest,
                self.admit_ratio,
                self.admit_max_wait,
            )
            new = [self._waiting.popleft() for _ in range(take)]
        # A request cancelled while it waited is skipped (a running one can no longer be cancelled).
        new = [r for r in new if r.future.set_running_or_notify_cancel()]
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                if new:
                    self._admit(new)  # if it raises, only `new` fails: the running batch is untouched
                if self._running is not None:
                    self._step()
        finally:
            self.model.train(was_training)
        return True

    def _forward(self, input_ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: Any):
        return forward_last(self.model, self._cache_kw, input_ids, mask, pos, cache)  # (B, V), cache

    def _admit(self, new: list[_Request]) -> None:
        """Prefill `new` together, take their first tokens, and merge the survivors into the batch.

        Requests with the same prompt (a request's n choices) share one prefill: the prompt runs once
        and its KV cache and logits are copied to each of its rows, as `HFEngine` does for n samples."""
        try:
            first: dict[tuple[int, ...], int] = {}
            owner = [first.setdefault(tuple(r.prompt_ids), len(first)) for r in new]
            prompts = list(first)
            width = max(len(p) for p in prompts)
            ids = torch.full((len(prompts), width), self._pad, dtype=torch.long, device=self._device)
            mask = torch.zeros((len(prompts), width), dtype=torch.long, device=self._device)
            for i, p in enumerate(prompts):
                ids[i, width - len(p) :] = torch.tensor(p, device=self._device)
                mask[i, width - len(p) :] = 1
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            logits, cache = self._forward(ids, mask, pos, None)
            if len(prompts) < len(new):  # one row per request from here on
                expand = torch.tensor(owner, device=self._device)
                logits, mask, pos = logits[expand], mask[expand], pos[expand]
                cache.batch_select_indices(expand)
            self.stats.prefills += 1
            self.stats.prefill_rows += len(prompts)
            self.stats.requests += len(new)
            nxt, keep = self._advance(new, logits)
            if not keep:
                return
            idx = torch.tensor(keep, device=self._device)
            cache.batch_select_indices(idx)
            joined = _Running([new[k] for k in keep], cache, mask[idx], pos[idx, -1] + 1, nxt[idx])
            self._running = joined if self._running is None else self._merge(self._running, joined)
        except Exception as err:  # the new requests fail; the running batch goes on
            self._fail(new, err)

    def _merge(self, a: _Running, b: _Running) -> _Running:
        """`a`'s rows then `b`'s, both left-padded to the wider cache (into `a.cache`)."""
        width = max(a.mask.shape[1], b.mask.shape[1])
        kv = [
            (_stack_right_aligned([ka, kb], width, 2), _stack_right_aligned([va, vb], width, 2))
            for (ka, va, *_), (kb, vb, *_) in zip(a.cache, b.cache, strict=True)
        ]
        _set_layer_kv(a.cache, kv)
        mask = _stack_right_aligned([a.mask, b.mask], width, 1)
        return _Running(
            a.rows + b.rows, a.cache, mask, torch.cat([a.pos, b.pos]), torch.cat([a.last, b.last])
        )

    def _step(self) -> None:
        """One decode step over the running batch; finished rows leave, leading padding is trimmed."""
        run = self._running
        assert run is not None
        try:
            mask = torch.cat([run.mask, torch.ones_like(run.mask[:, :1])], dim=-1)
            logits, cache = self._forward(run.last[:, None], mask, run.pos[:, None], run.cache)
            self.stats.steps += 1
            self.stats.row_steps += len(run.rows)
            self.stats.peak_batch = max(self.stats.peak_batch, len(run.rows))
            nxt, keep = self._advance(run.rows, logits)
            if not keep:
                self._running = None
                return
            if len(keep) < len(run.rows):
                # Finished rows leave at once (why: a long straggler should not pay for dead rows).
                idx = torch.tensor(keep, device=self._device)
                cache.batch_select_indices(idx)
                mask, pos, nxt = mask[idx], run.pos[idx], nxt[idx]
                rows = [run.rows[k] for k in keep]
                # Columns that are padding in every live row: drop them (rows only ever leave, so
                # only here can such columns appear; a merge pads to the wider of two trimmed caches).
                lead = int(mask.any(0).int().argmax())
                if lead:  # a view: the next step's update copies the cache anyway
                    _set_layer_kv(cache, [(k[:, :, lead:], v[:, :, lead:]) for k, v, *_ in cache])
                    self.stats.trims += 1
                    mask = mask[:, lead:]
            else:
                rows, pos = run.rows, run.pos
            self._running = _Running(rows, cache, mask, pos + 1, nxt)
        except Exception as err:  # every row of this batch fails; the loop keeps serving
            self._running = None
            self._fail(run.rows, err)

    # -- per-row sampling and bookkeeping ------------------------------------------------------

    def _advance(self, rows: list[_Request], logits: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """Pick each row's next token from its (B, V) logits, record it, call `on_token`, and finish
        the rows that stop. Returns the tokens (B,) and the indices of the rows that go on."""
        nxt = self._choose(rows, logits)
        lp_list = top_list = None
        if any(r.sampling.logprobs for r in rows):
            # The policy's own log-prob: log-softmax of the raw logits, before temperature/top-k/top-p.
            logp = torch.log_softmax(logits, dim=-1)
            lp_list = logp.gather(-1, nxt[:, None]).squeeze(-1).tolist()
            n_top = max(r.sampling.top_logprobs for r in rows)
            top_list = top_tokens(logp, n_top) if n_top else None
        keep: list[int] = []
        for i, (req, tok) in enumerate(zip(rows, nxt.tolist(), strict=True)):
            req.tokens.append(tok)
            if lp_list is not None and req.sampling.logprobs:
                req.logprobs.append(lp_list[i])
            if top_list is not None and req.sampling.top_logprobs:
                req.top_logprobs.append(top_list[i][: req.sampling.top_logprobs])
            self.stats.generated_tokens += 1
            try:
                if req.on_token is not None:
                    req.on_token(tok)
            except Exception as err:  # a broken callback fails its own request only
                req.future.set_exception(err)
                continue
            req.finish = self._finish(req, tok)
            if req.finish is None:
                keep.append(i)
            else:
                req.future.set_result(self._generation(req))
        return nxt, keep

    def _choose(self, rows: list[_Request], logits: torch.Tensor) -> torch.Tensor:
        """Plain greedy rows take the argmax; a row with decoding controls adjusts its own logits
        first; each sampled row filters and draws on its own, with its own generator when seeded (so
        its draws do not depend on the other rows)."""
        nxt = logits.argmax(-1)
        for i, req in enumerate(rows):
            sp = req.sampling
            if req.controls is None and sp.temperature == 0:
                continue
            row = logits[i : i + 1] if req.controls is None else req.controls.adjust(logits[i : i + 1])
            nxt[i] = pick(row, sp, req.generator)[0]
            if req.controls is not None:
                req.controls.accept(int(nxt[i]))
        return nxt

    def _finish(self, req: _Request, tok: int) -> FinishReason | None:
        """`HFEngine`'s stop rules: a stop id, then a stop string in the decoded tail, then the length."""
        sp = req.sampling
        if tok in req.stop_ids:
            return "stop"
        if stop_string_hit(self.engine.tokenizer, req.tokens, sp.stop):
            return "stop"
        return "length" if len(req.tokens) >= sp.max_new_tokens else None

    def _generation(self, req: _Request) -> Generation:
        text = self.engine.tokenizer.decode(
            text_ids(req.tokens, self.engine.eos_ids), skip_special_tokens=False
        )
        return Generation(
            prompt_index=0,
            token_ids=req.tokens,
            text=text,
            finish_reason=req.finish or "length",
            prompt_token_ids=req.prompt_ids,
            logprobs=req.logprobs if req.sampling.logprobs else None,
            top_logprobs=req.top_logprobs if req.sampling.top_logprobs else None,
        )

    @staticmethod
    def _fail(rows: list[_Request], err: BaseException) -> None:
        for req in rows:
            if not req.future.done():
                req.future.set_exception(err)
