"""Run `fisao` in a child process the way a user does, and read back what MLflow recorded.

Each child starts its own ephemeral Prefect API (a server subprocess, in a session of its own)
with the project's own PREFECT_HOME; the child runs in a new session too. Whatever a killed child
leaves behind is killed afterwards, as a pre-empted machine would take it down too: its process
group, and its server (which SIGKILL orphans), found by a tag in the server's environment.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from fisao.localstate import local_state_env

FISAO = str(Path(sys.executable).with_name("fisao"))
# Figures that measure time, not results: they differ between any two runs.
TIMINGS = ("seconds/", "rollouts/tokens_per_second")
TAG = "FISAO_TEST_CHILD"  # names a child's log file in its environment and in its server's


def fisao_env(project: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "FISAO_"))}
    # One torch thread: deterministic and fast on 2 shared cores (the same for every run compared).
    return {**env, **local_state_env(project), "OMP_NUM_THREADS": "1", **extra}


def start_fisao(project: Path, *args: str, **env: str) -> tuple[subprocess.Popen, Path, float]:
    """Start `fisao --project PROJECT ARGS` in its own session; finish it with `wait_fisao`."""
    log = project / f".fisao-{time.time_ns()}.log"  # a file, not a pipe: an orphaned server would hold a pipe open
    env = {TAG: log.name, **env}  # inherited by its server: `servers_of` finds it
    with open(log, "w") as out:
        proc = subprocess.Popen([FISAO, "--project", str(project), *args], cwd=project, env=fisao_env(project, **env),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log, time.time()


def wait_fisao(started: tuple[subprocess.Popen, Path, float], timeout: float = 300,
               reap: bool = True) -> tuple[int, str, float, int]:
    """(exit code, output, seconds, pid); exit -9 when it was SIGKILLed.

    `reap=False` leaves what the child left running (its process group is the child's pid); the
    caller must `kill_group` it in the end.
    """
    proc, log, t = started
    try:
        proc.wait(timeout=timeout)
    finally:
        if reap or proc.returncode is None:
            kill_group(proc.pid)
            for server in servers_of(log.name):  # the orphaned ephemeral server of a killed run, if any
                kill_group(server)  # its own session: its pid is its process group
        proc.wait()
    text = log.read_text()
    log.unlink()
    return proc.returncode, text, time.time() - t, proc.pid


def run_fisao(project: Path, *args: str, timeout: float = 300, reap: bool = True,
              **env: str) -> tuple[int, str, float, int]:
    """`start_fisao` then `wait_fisao`."""
    return wait_fisao(start_fisao(project, *args, **env), timeout, reap)


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def servers_of(tag: str) -> list[int]:
    """Pids of the Prefect API servers started by the child of `start_fisao` that logs to `tag`."""
    from runner.ephemeral import MARK

    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"{TAG}={tag}".encode() in environ.read_bytes().split(b"\0") and \
                    MARK.encode() in (environ.parent / "cmdline").read_bytes():
                found.append(int(environ.parent.name))
        except OSError:
            continue
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


def results(metrics: dict) -> dict:
    """A round's metrics without the timings."""
    return {k: v for k, v in metrics.items() if not k.startswith(TIMINGS)}


def mlflow_rounds(project: Path, campaign: str) -> dict[int, list]:
    """Round index -> every active MLflow run logged for that round of `campaign` (complete or not)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name(campaign)
    out: dict[int, list] = {}
    for run in client.search_runs([exp.experiment_id], filter_string="tags.`fisao.kind` = 'round'"):
        out.setdefault(int(run.data.tags["fisao.round"]), []).append(run)
    return dict(sorted(out.items()))


def curve_steps(project: Path, campaign: str, metric: str) -> list[int]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name(campaign)
    parent = client.search_runs([exp.experiment_id], filter_string="tags.`fisao.kind` = 'campaign'")[0]
    return sorted(m.step for m in client.get_metric_history(parent.info.run_id, metric))
