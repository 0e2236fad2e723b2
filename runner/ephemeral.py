"""Prefect's ephemeral API server, which a flow run started without PREFECT_API_URL brings up.

Prefect starts it as a child process and stops it at exit. We start it first (`start_api`), in a
session of its own: in Prefect's own start it shares the terminal's process group, so Ctrl-C
killed it at once and the campaign then retried the dead API for minutes (see runner/shutdown.py).
The server's own output goes to PREFECT_HOME/ephemeral-server.log, not the campaign's terminal.
A process killed with SIGKILL never exits properly: its server lives on, orphaned. The campaign records its server's pid in
its lock file, and the next run of that campaign, taking the stale lock over, stops the server
if it is still there and still the same program (Linux: read from /proc; elsewhere, nothing).

A new project's database starts as a copy of a migrated empty one (`seed_database`): Prefect
migrates a new SQLite database through its 100-odd migrations at the server's first start, about
7 s of a 13 s start on 2 cores, and every new project (a fresh clone's `make run`, each temp
project of the tests and benches) paid it. The empty database is migrated once per machine and
Prefect version, in a child process, into the user's cache (`make install` does it); the
server's own start then finds it at the head revision.
"""
from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

MARK = "prefect.server.api.server:create_app"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def stat_fields(pid: int | str) -> list[str]:
    """The fields of /proc/PID/stat after the command name (state, ppid, ..., utime at 11, stime at
    12); OSError when the process is gone or there is no /proc."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def servers_started_by(pid: int) -> list[int]:
    """Pids of Prefect ephemeral servers whose parent is `pid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat_fields(stat.parent.name)[1])
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


SQLITE = "sqlite+aiosqlite:///"
MIGRATE = "import asyncio\nfrom prefect.server.database import provide_database_interface as db\nasyncio.run(db().create_db())"


def template_path() -> Path:
    """Where this machine keeps the migrated empty database of the installed Prefect: the user's
    cache, named after Prefect's version and its SQLite migrations (another version, another file)."""
    import prefect
    import prefect.server.database as database

    migrations = sorted(p.name for p in (Path(database.__file__).parent / "_migrations" / "versions" / "sqlite").glob("*.py"))
    key = hashlib.sha256("\n".join(migrations).encode()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "fisao" / "prefect" / f"prefect-{prefect.__version__}-{key}.db"


def _copy_database(source: Path, target: Path) -> None:
    """`source` into a new `target` through SQLite's backup (its write-ahead log included), then renamed."""
    partial_file = target.with_name(f".{target.name}.partial")
    partial_file.unlink(missing_ok=True)
    src, dst = sqlite3.connect(source), sqlite3.connect(partial_file)
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()
    partial_file.replace(target)


def migrated_template() -> Path:
    """The migrated empty database (built now, in a child process, if this machine has none yet)."""
    from fisao.locks import exclusive

    template = template_path()
    with exclusive(template.with_name(f".{template.name}.lock")):
        if not template.is_file():
            db = template.with_name(f".{template.stem}.build.db")  # with its -wal and -shm while migrated

            def leftovers() -> None:
                for path in db.parent.glob(f"{db.name}*"):
                    path.unlink()

            leftovers()
            env = {**os.environ, "PREFECT_HOME": str(template.parent), "PREFECT_API_DATABASE_CONNECTION_URL": f"{SQLITE}{db}"}
            done = subprocess.run([sys.executable, "-c", MIGRATE], env=env, capture_output=True, text=True, timeout=600)
            if done.returncode != 0:
                raise RuntimeError(f"migrating an empty Prefect database failed: {done.stderr[-2000:]}")
            _copy_database(db, template)
            leftovers()
    return template


def seed_database() -> Path | None:
    """Give Prefect's SQLite database, when it does not exist yet, the migrated empty one's content;
    returns the database seeded (None: it exists, the database is not a local SQLite file, or the
    user's cache cannot be written, in which case the server migrates the new database itself)."""
    from prefect.settings import get_current_settings

    url = get_current_settings().server.database.connection_url
    url = url.get_secret_value() if hasattr(url, "get_secret_value") else str(url or "")
    if not url.startswith(SQLITE) or ":memory:" in url:
        return None
    db = Path(url.removeprefix(SQLITE))
    if db.exists():
        return None
    try:
        template = migrated_template()
    except OSError:  # a read-only or missing home: no cache, a slower first start
        return None
    db.parent.mkdir(parents=True, exist_ok=True)
    _copy_database(template, db)
    return db


def start_api(project: str | Path) -> subprocess.Popen | None:
    """Start this process's ephemeral API now (when no PREFECT_API_URL is set), one process at a
    time; returns its server process (None when PREFECT_API_URL names a server to use instead).

    A new project's database is seeded first (`seed_database`), under the project's lock: two
    campaigns starting together on a fresh project would otherwise race on its migration. The
    flow then uses this same server.
    """
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL

    from fisao.locks import exclusive

    with exclusive(Path(project) / ".fisao-init.lock"):
        server = None
        if not PREFECT_API_URL.value():
            seed_database()
            server = _start_in_own_session()
        with get_client(sync_client=True) as client:
            client.api_healthcheck()
    return server.server_process if server is not None else None


if __name__ == "__main__":  # `make install`: migrate this machine's empty database once, ahead of any run
    try:
        print(migrated_template())
    except OSError as e:  # the install goes on: each new project's first start then migrates its own
        print(f"no migrated Prefect database cached ({e}): a new project's first start migrates its own")
