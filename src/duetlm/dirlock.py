"""One writer per run or evaluation directory: `DirLock(path, what)` holds an exclusive `flock` on
`path/.lock` while a process writes there (`duetlm train`, `duetlm eval`); a second process asking
for it is refused at once, naming the holder's command and pid, instead of interleaving its records
with the first's. The lock is the kernel's: it goes with the process, however it ends (a kill -9
leaves no stale lock to clear); the file stays, holding the last holder's pid and command."""

from __future__ import annotations

import fcntl
import os
import sys
from pathlib import Path
from types import TracebackType

from duetlm.errors import DuetError

LOCK_FILE = ".lock"


class DirLock:
    """An exclusive lock on a directory (created if missing). Re-entrant within one process."""

    _held: dict[str, int] = {}  # resolved path -> nesting depth, for this process

    def __init__(self, path: str | Path, what: str) -> None:
        self.path = Path(path)
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> DirLock:
        self.path.mkdir(parents=True, exist_ok=True)
        key = str(self.path.resolve())
        if self._held.get(key):  # this process already writes here (the trainer's own eval, say)
            self._held[key] += 1
            return self
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise DuetError(
                f"{self.path} is in use by {holder}: one {self.what} writes a directory at a time; "
                "wait for it to finish, stop it, or give this one another directory"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} ({' '.join(sys.argv[:3]) or self.what})\n".encode(), 0)
        self._fd = fd
        self._held[key] = 1
        return self

    def release(self) -> None:
        key = str(self.path.resolve())
        depth = self._held.get(key, 0)
        if depth > 1:
            self._held[key] = depth - 1
            return
        self._held.pop(key, None)
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
