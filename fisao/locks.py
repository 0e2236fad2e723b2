"""File locks: one process per campaign, one writer per content-addressed output directory.

Both rest on `flock(2)`, which the kernel releases when its holder dies (even by SIGKILL), so a
crash never leaves a lock that blocks forever. The campaign lock also writes its holder's pid,
host and start time into the lock file: a second process is told who holds it, and a process
that finds the pid of a holder that died (the file still names it, the flock is free) says that
it took the lock over.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator


class CampaignLocked(RuntimeError):
    """Another live process holds the campaign's lock."""


@contextlib.contextmanager
def exclusive(lock_file: str | Path) -> Iterator[None]:
    """Hold a blocking exclusive flock on `lock_file` (created if needed) for the `with` body."""
    lock_file = Path(lock_file)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


@dataclass
class Holder:
    pid: int
    host: str
    since: str
    extra: dict = field(default_factory=dict)  # what the holder added with RunLock.annotate

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host} since {self.since}"


def _read_raw(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 65536).decode("utf-8", "replace").strip()


def _read_holder(fd: int) -> Holder | None:
    raw = _read_raw(fd)
    if not raw:
        return None
    try:
        data = json.loads(raw)
        return Holder(int(data.pop("pid")), str(data.pop("host")), str(data.pop("since")), data)
    except (ValueError, KeyError, TypeError):
        return Holder(-1, "?", f"(unreadable lock content {raw[:60]!r})")


class RunLock:
    """The lock of one campaign: `acquire()` or raise CampaignLocked naming the holder.

    Re-entrant within a process (the command line takes it before starting the flow, and the
    flow takes it again), so nested acquires count and only the outermost release unlocks.
    """

    _held: dict[Path, tuple[int, int, "Holder | None"]] = {}  # resolved path -> (fd, depth, took_over)

    def __init__(self, path: str | Path, campaign: str):
        self.path, self.campaign = Path(path).resolve(), campaign
        self.took_over: Holder | None = None  # the dead holder whose stale lock was taken over

    def acquire(self) -> "RunLock":
        if self.path in self._held:
            fd, depth, self.took_over = self._held[self.path]
            self._held[self.path] = (fd, depth + 1, self.took_over)
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            who = holder.describe() if holder else "another process (it has not written its pid yet)"
            raise CampaignLocked(
                f"campaign {self.campaign!r} is already running: {who} holds {self.path}. Wait for it to finish "
                f"(`fisao runs {self.campaign}` shows its progress) or start another campaign with a new --run-name"
            ) from None
        previous = _read_holder(fd)
        if previous is not None and previous.pid != os.getpid():
            self.took_over = previous
        os.ftruncate(fd, 0)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(me) + "\n").encode())
        os.fsync(fd)
        self._held[self.path] = (fd, 1, self.took_over)
        return self

    def annotate(self, **extra) -> None:
        """Add JSON fields to what the lock file says about its holder (e.g. processes it started)."""
        fd = self._held[self.path][0]
        data = {**json.loads(_read_raw(fd)), **extra}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(data) + "\n").encode())
        os.fsync(fd)

    def release(self) -> None:
        fd, depth, took_over = self._held[self.path]
        if depth > 1:
            self._held[self.path] = (fd, depth - 1, took_over)
            return
        del self._held[self.path]
        os.ftruncate(fd, 0)  # an empty lock file: released cleanly, nobody to take over from
        os.close(fd)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def held_locks() -> list[Path]:
    """The lock files this process holds now (a sweep's, the campaign it runs), for a forced exit to empty."""
    return list(RunLock._held)


def lock_holder(path: str | Path) -> Holder | None:
    """Who holds the campaign lock at `path` now (None when nobody does); never blocks."""
    path = Path(path)
    if not path.is_file():
        return None
    if path.resolve() in RunLock._held:
        return Holder(os.getpid(), socket.gethostname(), "now (this process)")
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(fd) or Holder(-1, "?", "?")
        return None
    finally:
        os.close(fd)
