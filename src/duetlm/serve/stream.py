"""A streamed request's SSE: the events its choices' passes put on a queue, turned into chunks.

Each choice's signal goes out as `reasoning_content` deltas and its answer as `content` deltas,
interleaved across choices as they come, through `streaming.TextDeltas` views, so that the deltas add
up to exactly the non-streamed response.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from duetlm import protocol
from duetlm.serve import openai
from duetlm.serve.metrics import ServeMetrics
from duetlm.serve.openai import Chunks, DuetOutcome, ParsedChat, Served
from duetlm.streaming import TextDeltas, answer_view

# (choice index, kind, value), in order for each choice: ("large", token id or text)*,
# ("signal", outcome), ("small", token id)*, ("done", outcome); or (0, "error", ApiError) to end.
Event = tuple[int, str, Any]


def text_deltas(engine: Any, view: Callable[[str], str], hidden: tuple[int, ...] = ()) -> TextDeltas:
    """A text view of `engine`'s tokens; its end-of-sequence ids and `hidden` never show."""
    return TextDeltas(
        getattr(engine, "tokenizer", None), view, set(getattr(engine, "eos_ids", ())) | set(hidden)
    )


def signal_deltas(engine: Any, think_stops: tuple[int, ...]) -> TextDeltas:
    """A view of M's tokens as the signal so far (`protocol.partial_signal`)."""
    return text_deltas(engine, protocol.partial_signal, think_stops)


def answer_deltas(engine: Any, stop: tuple[str, ...]) -> TextDeltas:
    """A view of m's tokens as the answer so far (cut before a stop string)."""
    return text_deltas(engine, answer_view(stop))


class ChatStream:
    """The chunks of one streamed request, event by event.

    `signals[i]` / `answers[i]`: choice i's views of M's and m's tokens (`signal_deltas`,
    `answer_deltas`; `DuetService.stream` builds them).
    """

    def __init__(
        self,
        served: Served,
        chat: ParsedChat,
        signals: list[TextDeltas],
        answers: list[TextDeltas],
        metrics: ServeMetrics,
        started: float,
    ) -> None:
        self.served, self.chat = served, chat
        self.signals, self.answers = signals, answers
        self.metrics, self.started = metrics, started
        self.chunks = Chunks.start(served.model)
        self.outcomes: dict[int, DuetOutcome] = {}
        self._firsts: set[str] = set()

    @property
    def finished(self) -> bool:
        return len(self.outcomes) == self.chat.request.n

    def opening(self) -> list[str]:
        """Each choice's first chunk: the assistant's role."""
        return [
            self.chunks.choice(i, {"role": "assistant", "content": ""}) for i in range(self.chat.request.n)
        ]

    def on_event(self, index: int, kind: str, value: Any) -> list[str]:
        """The chunks of one event of choice `index` (none while the views hold text back)."""
        if kind == "done":
            return self._done(index, value)
        if kind == "large":
            view = self.signals[index]
            delta = openai.reasoning(view.push_text(value) if isinstance(value, str) else view.push(value))
        elif kind == "signal":
            delta = openai.reasoning(self.signals[index].finish(value.signal.text))
        else:  # small: a token id, or text from a remote m
            view = self.answers[index]
            delta = {"content": view.push_text(value) if isinstance(value, str) else view.push(value)}
        if not next(iter(delta.values()), ""):
            return []
        self._first_text("signal" if "reasoning_content" in delta else "answer")
        return [self.chunks.choice(index, delta)]

    def _done(self, index: int, outcome: DuetOutcome) -> list[str]:
        """A choice's end: the rest of its answer, then its finish reason (with log-probs)."""
        self.outcomes[index] = outcome
        content, finish = openai.choice_fields(self.chat, outcome)
        out = []
        if text := self.answers[index].finish(content):
            self._first_text("answer")
            out.append(self.chunks.choice(index, {"content": text}))
        fields = openai.last_chunk_fields(self.served, self.chat, outcome)
        out.append(self.chunks.choice(index, {}, finish, **fields))
        return out

    def _first_text(self, part: str) -> None:
        if part not in self._firsts:
            self._firsts.add(part)
            self.metrics.first_output.labels(part).observe(time.perf_counter() - self.started)

    def closing(self) -> Iterator[str]:
        """The usage chunk (if asked) and [DONE]; records the request's metrics before [DONE], so a
        client that reads the end and then scrapes /metrics sees it."""
        done = [self.outcomes[k] for k in range(self.chat.request.n)]
        usage = openai.usage(done)
        options = self.chat.request.stream_options
        if options is not None and options.include_usage:
            yield self.chunks.usage(usage)
        self.metrics.completed(done, usage, time.perf_counter() - self.started, stream=True)
        yield openai.DONE


async def sse_events(
    stream: ChatStream, events: asyncio.Queue[Event], task: asyncio.Task[None], first: Event
) -> AsyncIterator[str]:
    """The SSE of a request whose passes run in `task` and report to `events` (`first` already taken
    from it). Cancels the request if the client goes."""
    for chunk in stream.opening():
        yield chunk
    i, kind, value = first
    try:
        while True:
            if kind == "error":
                yield openai.error_event(value)
                return
            for chunk in stream.on_event(i, kind, value):
                yield chunk
            if stream.finished:
                break
            i, kind, value = await events.get()
    finally:
        if not task.done():  # the client went away: stop its request
            task.cancel()
    for chunk in stream.closing():
        yield chunk
