"""The signal cache: M's signal for a question it has already answered greedily, reused.

Only greedy requests are cached (temperature 0: the signal is a function of the question and the
sampling options), keyed by both; the entry is M's whole generation, so usage and the signal's text
are what the first request got. Seeded sampling is not reused: a seeded sample is exact for one
request, but batching the same seed with other rows is not guaranteed to give the same tokens on
every engine, so a cached sample could differ from what the request would have drawn.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import replace

from duetlm.engines.base import Generation, SamplingParams


def cache_key(question: str, params: SamplingParams) -> Hashable | None:
    """The entry a request's M pass would use, or None when the pass must run (sampled)."""
    if params.temperature > 0:
        return None
    return (question, replace(params, seed=None))  # greedy ignores the seed (choice i's is seed + i)


class SignalCache:
    """A bounded LRU of M's generations; `size` 0 keeps nothing. Thread-safe (the routes and the
    engine threads may both touch it)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict[Hashable, Generation] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable | None) -> Generation | None:
        if key is None or not self.size:
            return None
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
            return found

    def put(self, key: Hashable | None, generation: Generation) -> None:
        if key is None or not self.size:
            return
        with self._lock:
            self._entries[key] = generation
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
