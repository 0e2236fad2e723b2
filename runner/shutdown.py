"""How a campaign or sweep process stops: within seconds of Ctrl-C or SIGTERM, and never hanging on a dead API.

The ephemeral Prefect API runs in a session of its own (runner/ephemeral.py), so the terminal's
Ctrl-C reaches only the campaign. Before that, the server died with the campaign's process
group and Prefect's client retried the dead API (five retries with back-off, about a minute per
request): Ctrl-C took over two minutes and printed 150 lines of connection tracebacks.

`CommandStop` is the guard; what it stops says what to mark and how to go on: `CampaignStop` (for
`fisao run`/`resume`: the campaign's MLflow run, `fisao resume NAME`) and `SweepStop` (for `fisao
sweep`: the campaign the sweep is running and the sweep's own run, and the same `fisao sweep`
command again, which takes the finished campaigns and resumes the rest). Under either:
- The first SIGINT or SIGTERM raises `Interrupted` (a KeyboardInterrupt) in the main thread.
  Inside the flow Prefect turns SIGTERM into its own TerminationSignal first; both unwind the
  same way: Prefect records the crash, the flow marks the campaign's MLflow run interrupted
  (KILLED; a sweep's flow marks its own run too), the locks are released, and the command ends
  with one line saying how to resume.
- A signal that lands while Prefect runs its own bookkeeping (setting up a task run, storing its
  state) is held until the main thread is back in the campaign's code (the watchdog looks every
  50 ms), then raised there: raised inside Prefect it surfaced as Prefect's own error. Should a
  signal still surface as another error, it is recorded as interrupted all the same.
- A second signal, or an unwinding that has not ended the process `GRACE` seconds after the
  first, ends the process at once (`stop_now`).
- A watchdog thread polls the API server; if it exits while the campaign runs, the campaign
  stops at once with a clear error instead of retrying a dead API.
`stop_now` never calls Prefect (its client would retry the dead API): it marks the MLflow runs
directly, empties the lock files this process holds (the kernel drops the flocks with it), stops
the API server (Prefect's exit handler, which would, does not run) and exits with os._exit.
Nothing is left half-written: every stage writes atomically, and a round whose MLflow run was
half-logged is logged again on resume (tests/test_chaos.py kills at those points with SIGKILL,
which is harsher).
"""
from __future__ import annotations

import _thread
import os
import signal
import subprocess
import sys
import threading
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import NoReturn

from prefect.exceptions import TerminationSignal

from fisao.locks import held_locks
from runner.exit import exit_without_teardown

GRACE = 6.0  # seconds from the first signal to a forced exit; the target is an exit within 10 s
BACKSTOP = 2.0  # seconds a forced exit may spend on MLflow and the lock before it exits regardless
SERVER_WAIT = 0.5  # seconds a forced exit waits for the API server to stop after SIGTERM (then SIGKILL)
POLL = 0.2  # seconds between the watchdog's looks at the API server


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM reached a campaign: unwind as Ctrl-C does, remembering which signal."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _mark_campaign(name: str, end: str, error: str, force: bool = False) -> bool:
    """Mark campaign `name`'s MLflow run `end` if it is still marked running, or whatever it says when
    `force` (MLflow only, no Prefect); returns whether MLflow knows the campaign."""
    from tasks.campaigns import campaign_state
    from tasks.mlflow_store import campaign_parent

    parent = campaign_parent(name)
    if parent is not None and (force or parent.data.tags.get("fisao.status") == "running"):
        campaign_state.fn(parent.info.run_id, {"fisao.error": error[:4000]}, end=end)
    return parent is not None


def in_prefect(frame) -> bool:
    """Whether `frame` runs Prefect's own code rather than the campaign's (fisao, tasks, flows, cli).

    The innermost frame of either decides (libraries such as torch or pydantic belong to whoever
    called them). A KeyboardInterrupt raised inside Prefect's task bookkeeping is not survived as
    one: measured, a SIGINT that landed in `initialize_run` surfaced as Prefect's "ValueError: Task
    run is not set", a failed flow with a traceback and exit status 2.
    """
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module == "prefect" or module.startswith("prefect."):
            return True
        if module.split(".")[0] in ("fisao", "tasks", "flows", "cli"):
            return False
        frame = frame.f_back
    return False


def resume_hint(name: str, recorded: bool = True) -> str:
    """The last line a stopped campaign prints: how to continue it (`recorded`: MLflow knows it)."""
    if not recorded:
        return f"campaign {name!r} stopped before anything was recorded; start it again with the same `fisao run` command"
    return f"resume campaign {name!r} with: fisao resume {name}"


def _mark_sweep(name: str, end: str, error: str, force: bool = False) -> None:
    """Mark sweep `name`'s MLflow run `end` if it is still marked running, or whatever it says when `force`."""
    from tasks.campaigns import campaign_state
    from tasks.sweeps import sweep_parent

    parent = sweep_parent(name)
    if parent is not None and (force or parent.data.tags.get("fisao.status") == "running"):
        campaign_state.fn(parent.info.run_id, {"fisao.error": error[:4000]}, end=end)


def _ended(code: int) -> str:
    return f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"


class CommandStop(ABC):
    """Signal handlers and the API watchdog for the `kind` (campaign, sweep) `name` holding the lock at `lock_path`.

    Use a subclass, which says what to mark and how to go on (`mark`, `recorded`, `hint`), as
    `with CampaignStop(...) as stop: stop.watch(server); ...`; an interruption is swallowed on the
    way out (after the flow has recorded it), and `stop.code` is then the exit status.
    """

    kind = "command"

    def __init__(self, name: str, lock_path: str | Path, grace: float = GRACE):
        self.name, self.lock_path, self.grace = name, Path(lock_path), grace
        self.signum: int | None = None
        self.deadline: float | None = None
        self.code: int | None = None
        self.server: subprocess.Popen | None = None
        self._running = threading.Event()  # set while the API server must be alive
        self._stopping = threading.Lock()
        self._previous: dict[int, object] = {}
        self._deferred: int | None = None  # a signal that landed in Prefect's bookkeeping, raised once out of it
        self._main = threading.main_thread().ident

    @abstractmethod
    def mark(self, end: str, error: str, force: bool = False) -> bool:
        """Mark what runs `end` in MLflow (if still marked running, or whatever it says when `force`);
        returns whether MLflow knows it."""

    @abstractmethod
    def recorded(self) -> bool:
        """Whether MLflow knows what runs (the hint depends on it)."""

    @abstractmethod
    def hint(self, recorded: bool) -> str:
        """The last line of a stopped command: how to continue."""

    def __enter__(self) -> "CommandStop":
        for signum in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(signum) is not signal.SIG_IGN:  # e.g. a background job's SIGINT stays ignored
                self._previous[signum] = signal.signal(signum, self._on_signal)
        threading.Thread(target=self._watch, name="fisao-campaign-watchdog", daemon=True).start()
        return self

    def watch(self, server: subprocess.Popen | None) -> None:
        """Stop the campaign at once should `server` (the API) exit before the `with` block ends."""
        self.server = server
        if server is not None:
            self._running.set()

    def __exit__(self, kind, exc, tb) -> bool:
        self._running.clear()  # from here on, the server is stopped at exit on purpose
        # A signal held back while Prefect unwound (Prefect sends SIGTERM again once its flow has
        # crashed) is spent: the campaign has stopped. Raised later, it would land in an exit handler.
        self._deferred = None
        if isinstance(exc, (KeyboardInterrupt, TerminationSignal)):
            if self.signum is None:  # not raised by our handler (Prefect's SIGTERM handler, interrupt_main)
                self.signum = getattr(exc, "signal", signal.SIGINT)
                self.deadline = time.monotonic() + self.grace
            self.code = 128 + self.signum
            return True
        if exc is not None and self.signum is not None:
            # The signal surfaced as another error (Prefect's, when it landed in Prefect's own code):
            # still an interruption, recorded as one.
            self.mark("interrupted", f"{signal.Signals(self.signum).name}: {exc}", force=True)
            self.code = 128 + self.signum
            return True
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        return False

    def finish(self) -> NoReturn:
        """End the interrupted command now, its last line saying how to resume; exit status `code`.

        Python's exit handlers run (Prefect's stop the API server and flush its logs); Python's
        teardown of its modules does not: garbage collection over torch, transformers, Prefect and
        MLflow took 3-4 s on 2 cores after a tiny campaign, and Prefect's log flush inside
        logging.shutdown waited 5 s for a lock (its timeout): 9 s of the 10 s budget, before this.
        """
        if not self._stopping.acquire(blocking=False):  # a forced exit is under way in the watchdog
            time.sleep(BACKSTOP + 1)
        exit_without_teardown(self.code, f"fisao: {self.hint(self.recorded())}")

    def _on_signal(self, signum: int, frame) -> None:
        if self._deferred is not None:  # re-delivered by the watchdog once out of Prefect's code
            signum, self._deferred = self._deferred, None
        elif self.signum is not None:  # the second Ctrl-C: stop now
            self.stop_now("interrupted", f"second {signal.Signals(signum).name}", 128 + signum)
        else:
            self.signum, self.deadline = signum, time.monotonic() + self.grace
            print(f"fisao: {signal.Signals(signum).name}: stopping {self.kind} {self.name!r} (again to stop at once)",
                  file=sys.stderr, flush=True)
        if in_prefect(frame):  # raised there, it would become Prefect's own error: wait until it returns
            self._deferred = signum
            return
        raise Interrupted(signum)

    def _watch(self) -> None:
        while True:
            time.sleep(POLL / 4 if self._deferred is not None else POLL)
            deferred = self._deferred
            if deferred is not None and not in_prefect(sys._current_frames().get(self._main)) and self._deferred:
                _thread.interrupt_main(deferred)  # runs _on_signal in the main thread, which raises now
            if self.deadline is not None and time.monotonic() > self.deadline:
                self.stop_now("interrupted", f"{signal.Signals(self.signum).name}: not stopped after {self.grace:g}s",
                              128 + self.signum)
            server = self.server
            if self._running.is_set() and server is not None and server.poll() is not None:
                self.stop_now("failed", f"Prefect's API server (pid {server.pid}) {_ended(server.returncode)} while "
                                        f"{self.kind} {self.name!r} was running; nothing can record its progress, so it "
                                        "stops here", 1)

    def stop_now(self, end: str, reason: str, code: int) -> None:
        """Mark what runs `end` in MLflow, release the locks, say how to resume and exit with `code`,
        within `BACKSTOP` seconds whatever MLflow does."""
        if not self._stopping.acquire(blocking=False):  # another thread is already stopping the process
            return
        threading.Timer(BACKSTOP, self._exit, (code, 0.0)).start()
        if self.server is not None and self.server.poll() is None:
            self.server.terminate()  # os._exit skips Prefect's exit handler, which would stop it
        try:  # a new line first: a progress bar may be half-drawn
            print(f"\nfisao: error: {reason}" if end == "failed" else f"\nfisao: {reason}: stopping now",
                  file=sys.stderr, flush=True)
            recorded: list[bool] = []
            # In a thread of its own: this thread may be a signal handler interrupting an MLflow write,
            # which the mark would wait for; then the lock and the line below still come.
            marker = threading.Thread(target=lambda: recorded.append(self.mark(end, reason)), daemon=True)
            marker.start()
            marker.join(BACKSTOP / 2)
            for lock in {self.lock_path.resolve(), *held_locks()}:  # a sweep's, and the campaign it runs
                if lock.is_file():
                    os.truncate(lock, 0)  # released cleanly; the flock goes with the process
            print(f"fisao: {self.hint(all(recorded))}", file=sys.stderr, flush=True)
        finally:
            self._exit(code, SERVER_WAIT)

    def _exit(self, code: int, wait: float) -> NoReturn:
        """os._exit(code), the API server gone first: given `wait` seconds after its SIGTERM, then SIGKILL."""
        server = self.server
        try:
            if server is not None and server.poll() is None:
                try:
                    server.wait(wait)
                except subprocess.TimeoutExpired:
                    server.kill()
                    server.wait(SERVER_WAIT)
        finally:
            sys.stdout.flush()
            os._exit(code)


class CampaignStop(CommandStop):
    """`fisao run`/`fisao resume` of campaign `name`: its MLflow run is marked; `fisao resume NAME` goes on."""

    kind = "campaign"

    def mark(self, end: str, error: str, force: bool = False) -> bool:
        return _mark_campaign(self.name, end, error, force)

    def recorded(self) -> bool:
        from tasks.mlflow_store import campaign_parent

        return campaign_parent(self.name) is not None

    def hint(self, recorded: bool) -> str:
        return resume_hint(self.name, recorded)


class SweepStop(CommandStop):
    """`fisao sweep` named `name`: the campaign it is running (of `campaigns`, name -> lock file: the
    one whose lock this process holds) and the sweep's own run are marked; running `command` again
    goes on (the finished campaigns are taken, the interrupted one resumed)."""

    kind = "sweep"

    def __init__(self, name: str, lock_path: str | Path, campaigns: dict[str, Path], command: str,
                 grace: float = GRACE):
        super().__init__(name, lock_path, grace)
        self.campaigns = {campaign: Path(lock).resolve() for campaign, lock in campaigns.items()}
        self.command = command

    def running(self) -> list[str]:
        """The sweep's campaigns this process is running now (at most one: they run in turn)."""
        held = set(held_locks())
        return [campaign for campaign, lock in self.campaigns.items() if lock in held]

    def mark(self, end: str, error: str, force: bool = False) -> bool:
        for campaign in self.running():  # not the others: one may be run by another process (`fisao resume`)
            _mark_campaign(campaign, end, error, force)
        _mark_sweep(self.name, end, error, force)
        return True

    def recorded(self) -> bool:
        return True  # a sweep goes on the same way whatever MLflow holds

    def hint(self, recorded: bool) -> str:
        return f"continue sweep {self.name!r} (finished campaigns are taken) with the same command: {self.command}"
