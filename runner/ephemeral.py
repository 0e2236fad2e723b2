"""Prefect's ephemeral API server, which a flow run started without PREFECT_API_URL brings up.

Prefect starts it as a child process and stops it at exit. We start it first (`start_api`), in a
session of its own: in Prefect's own start it shares the terminal's process group, so Ctrl-C
killed it at once and the campaign then retried the dead API for minutes (see runner/shutdown.py).
The server's own output goes to PREFECT_HOME/ephemeral-server.log, not the campaign's terminal.
A process killed with SIGKILL never exits properly: its server lives on, orphaned. The campaign records its server's pid in
its lock file, and the next run of that campaign, taking the stale lock over, stops the server
if it is still there and still the same program (Linux: read from /proc; elsewhere, nothing).
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from functools import partial
from pathlib import Path

MARK = "prefect.server.api.server:create_app"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def servers_started_by(pid: int) -> list[int]:
    """Pids of Prefect ephemeral servers whose parent is `pid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        child = int(stat.parent.name)
        if ppid == pid and MARK in _cmdline(child):
            found.append(child)
    return sorted(found)


def stop_orphaned(pids: list[int], timeout: float = 5.0) -> list[int]:
    """SIGTERM (then SIGKILL) those of `pids` that are still Prefect servers; returns the ones stopped."""
    stopped = []
    for pid in pids:
        if MARK not in _cmdline(pid):
            continue
        os.kill(pid, signal.SIGTERM)
        deadline = time.time() + timeout
        while MARK in _cmdline(pid) and time.time() < deadline:
            time.sleep(0.1)
        if MARK in _cmdline(pid):
            os.kill(pid, signal.SIGKILL)
        stopped.append(pid)
    return stopped


class _OwnSession:
    """`subprocess` as Prefect's server module sees it while `start_api` starts the server: every
    Popen starts a new session (so the terminal's SIGINT does not reach the server), its output
    going to `log` (the server's own errors, e.g. the tracebacks of its event recorder when it is
    stopped while flushing, are not the campaign's and do not belong in its terminal)."""

    def __init__(self, log):
        self.Popen = partial(subprocess.Popen, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)

    def __getattr__(self, name: str):
        return getattr(subprocess, name)


SERVER_LOG = "ephemeral-server.log"  # in PREFECT_HOME


def _start_in_own_session():
    """Prefect's ephemeral server (the one its clients use), started now in its own session, its
    output appended to PREFECT_HOME/ephemeral-server.log."""
    from prefect.server.api import server as module
    from prefect.settings import PREFECT_HOME

    server = module.SubprocessASGIServer()  # one per process: Prefect's clients get this same one
    if not server.running:
        home = Path(PREFECT_HOME.value())
        home.mkdir(parents=True, exist_ok=True)
        log = open(home / SERVER_LOG, "ab")  # noqa: SIM115 (the server writes to it as long as it runs)
        real, module.subprocess = module.subprocess, _OwnSession(log)
        try:
            server.start()
        finally:
            module.subprocess = real
    return server


def start_api(project: str | Path) -> subprocess.Popen | None:
    """Start this process's ephemeral API now (when no PREFECT_API_URL is set), one process at a
    time; returns its server process (None when PREFECT_API_URL names a server to use instead).

    Its first start migrates the project's Prefect database; two campaigns starting together on a
    fresh project would race on that. The flow then uses this same server.
    """
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL

    from fisao.locks import exclusive

    with exclusive(Path(project) / ".fisao-init.lock"):
        server = None if PREFECT_API_URL.value() else _start_in_own_session()
        with get_client(sync_client=True) as client:
            client.api_healthcheck()
    return server.server_process if server is not None else None
