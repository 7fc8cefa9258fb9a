"""Run control: phase timers, stop requests (SIGTERM / SIGINT), and the error that ends a run."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from duetlm.distributed import Dist
from duetlm.errors import DuetError


class PhaseTimer:
    """`with timer("rollout"): ...` records seconds per phase (`time/<phase>_s` in the metrics)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


class StepAborted(Exception):
    """A stop was requested before the step changed any state; the step is abandoned."""


class TrainingError(DuetError):
    """The run cannot go on (e.g. too many non-finite updates in a row)."""


class StopRequest:
    """SIGTERM / SIGINT handling: the first signal asks for a checkpoint and a clean stop; a second
    SIGINT raises KeyboardInterrupt at once. Installed only on the main thread."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def agree(self, dist_ctx: Dist) -> None:
        """Data parallelism: a signal that reached any rank stops every rank (the launcher forwards it
        to all, but not at the same instant), so the ranks leave the loop at the same point."""
        if dist_ctx.enabled:
            signum = int(dist_ctx.all_reduce([float(self.signum or 0)], "max")[0])
            self.signum = signum or None

    def check(self, dist_ctx: Dist | None = None) -> None:
        """Raise `StepAborted` when a stop was requested (call only before a step changes state)."""
        if dist_ctx is not None:
            self.agree(dist_ctx)
        if self.signum is not None:
            raise StepAborted
