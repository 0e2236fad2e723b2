"""Ctrl-C, SIGTERM and a dead API server, each on a real tiny campaign run as `fisao` in a child
process; then `fisao resume` finishes the campaign.

One project, one campaign (`sig`), four processes in turn: a run stopped by SIGINT sent to its
process group (what Ctrl-C in a terminal does, the API server included before it had a session of
its own), a resume stopped by SIGTERM sent to its pid (`kill PID`), a resume whose API server is
killed, and a resume that finishes. Each signal lands just after the campaign's MLflow run is
opened (in the base model's evaluation). runner/shutdown.py says how each case stops.
"""
from __future__ import annotations

import os
import re
import signal
import time

import pytest

from fisao import io

from tests.campaign_process import alive, kill_group, mlflow_rounds, servers_of, start_fisao, wait_fisao
from tests.conftest import TINY, copy_project
from tests.test_chaos import leftovers

pytestmark = pytest.mark.e2e

NAME = "sig"
OPENED = re.compile(r"Task run 'open-campaign-\S+' - Finished in state")
TARGET = 10.0  # seconds from a signal to the process's exit (issue 12)


def wait_until_opened(started, timeout: float = 300) -> int:
    """Wait until the campaign's MLflow run is open; returns the pid of the child's API server."""
    proc, log, t = started
    while not OPENED.search(log.read_text()):
        assert proc.poll() is None, log.read_text()
        assert time.time() - t < timeout, log.read_text()
        time.sleep(0.1)
    (server,) = servers_of(log.name)
    return server


def campaign_status(project) -> tuple[str, str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name(NAME).experiment_id],
                                filter_string="tags.`fisao.kind` = 'campaign'")
    return run.info.status, run.data.tags["fisao.status"]


def stop(project, args: tuple[str, ...], send) -> tuple[int, list[str], float, int]:
    """Start `fisao ARGS`, call `send(pid, server pid)` once its campaign is open; (exit code,
    non-empty output lines, seconds from the signal to the exit, server pid). The API server must
    not outlive the process."""
    started = start_fisao(project, *args)
    try:
        server = wait_until_opened(started)
        t = time.time()
        send(started[0].pid, server)
        rc, out, _, _ = wait_fisao(started, timeout=120, reap=False)  # reaped below, after checking nothing was left
        seconds = time.time() - t
        assert not alive(server), "the API server outlived its campaign"
        return rc, [line for line in out.splitlines() if line.strip()], seconds, server
    finally:
        for pgid in [started[0].pid] + servers_of(started[1].name):
            kill_group(pgid)


def check_stopped(project, rc: int, lines: list[str], seconds: float, code: int, status: tuple) -> None:
    text = "\n".join(lines)
    assert rc == code, text[-3000:]
    assert seconds < TARGET, (seconds, text[-3000:])
    assert "Traceback" not in text, text[-3000:]
    assert lines[-1] == f"fisao: resume campaign {NAME!r} with: fisao resume {NAME}", text[-3000:]
    assert (project / "outputs" / "campaigns" / NAME / ".lock").read_text() == ""  # released cleanly
    assert campaign_status(project) == status


def test_sigint_sigterm_and_a_dead_api_stop_in_seconds_then_resume_finishes(base_project, tmp_path):
    project = copy_project(base_project, tmp_path / "project")
    timings = {}

    def ctrl_c(pid: int, server: int) -> None:
        assert os.getsid(server) != os.getsid(pid)  # the server is out of reach of the terminal's Ctrl-C
        os.killpg(pid, signal.SIGINT)

    rc, lines, timings["SIGINT"], server = stop(project, ("run", "--config", "tiny.yaml", "--run-name", NAME), ctrl_c)
    check_stopped(project, rc, lines, timings["SIGINT"], 130, ("KILLED", "interrupted"))
    assert f"fisao: SIGINT: stopping campaign {NAME!r} (again to stop at once)" in lines

    rc, lines, timings["SIGTERM"], server = stop(project, ("resume", NAME), lambda pid, _: os.kill(pid, signal.SIGTERM))
    check_stopped(project, rc, lines, timings["SIGTERM"], 143, ("KILLED", "interrupted"))

    rc, lines, timings["API server killed"], server = stop(project, ("resume", NAME),
                                                           lambda _, server: os.kill(server, signal.SIGKILL))
    check_stopped(project, rc, lines, timings["API server killed"], 1, ("FAILED", "failed"))
    assert f"fisao: error: Prefect's API server (pid {server}) was killed by SIGKILL while campaign {NAME!r} was " \
           "running; nothing can record its progress, so it stops here" in lines
    print("seconds from the signal to the exit:", {k: round(v, 1) for k, v in timings.items()})

    rc, out, _, _ = wait_fisao(start_fisao(project, "resume", NAME))
    assert rc == 0, out[-3000:]
    assert campaign_status(project) == ("FINISHED", "finished")
    rounds = mlflow_rounds(project, NAME)
    assert sorted(rounds) == list(range(TINY["ppo.rounds"] + 1))
    assert all(len(runs) == 1 and runs[0].data.tags["fisao.complete"] == "true" for runs in rounds.values())
    assert len(io.read_json(project / "outputs" / "campaigns" / NAME / "summary.json")["rounds"]) == TINY["ppo.rounds"] + 1
    assert leftovers(project / "outputs") == []
