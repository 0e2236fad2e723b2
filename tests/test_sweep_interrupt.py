"""SIGTERM to a real tiny `fisao sweep` in a child process (`kill PID`), then the same command finishes it.

The signal lands once the sweep's campaign has opened its MLflow run. The sweep must stop as a
campaign does (runner/shutdown.py, tests/test_interrupt.py): within seconds, its API server gone,
the campaign it ran and the sweep's own run marked interrupted, both locks released, and a last
line giving the command that continues it; running that command finishes the sweep.
"""
from __future__ import annotations

import os
import shlex
import signal

import pytest
from mlflow.tracking import MlflowClient

from fisao import io
from tests.campaign_process import start_fisao, wait_fisao
from tests.conftest import copy_project
from tests.test_interrupt import TARGET, stop

pytestmark = pytest.mark.e2e

SWEEP = "sws"
CAMPAIGN = f"{SWEEP}-w0-s0"
# One world, one seed, no FiSAO round: the campaign is its world, base models, calibration and base evaluation.
ARGS = ("sweep", "--config", "tiny.yaml", "--worlds", "0", "--seeds", "0", "--rounds", "0", "--name", SWEEP)


def status(project, experiment: str, kind: str) -> tuple[str, str]:
    """(MLflow status, fisao.status) of the `kind` (campaign, sweep) run of `experiment`."""
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id],
                                filter_string=f"tags.`fisao.kind` = '{kind}'")
    return run.info.status, run.data.tags["fisao.status"]


def test_sigterm_stops_a_sweep_in_seconds_marks_its_campaign_and_the_same_command_finishes_it(base_project, tmp_path):
    project = copy_project(base_project, tmp_path / "project")
    # `stop` also checks that the sweep's API server did not outlive it.
    rc, lines, seconds, _ = stop(project, ARGS, lambda pid, _: os.kill(pid, signal.SIGTERM))  # `kill PID`
    text = "\n".join(lines)
    assert rc == 143, text[-3000:]
    assert seconds < TARGET, (seconds, text[-3000:])
    assert "Traceback" not in text, text[-3000:]
    prefix = f"fisao: continue sweep {SWEEP!r} (finished campaigns are taken) with the same command: "
    assert lines[-1].startswith(prefix), text[-3000:]
    command = shlex.split(lines[-1][len(prefix):])
    assert command == ["fisao", "--project", str(project), *ARGS]
    assert status(project, CAMPAIGN, "campaign") == ("KILLED", "interrupted")
    assert status(project, SWEEP, "sweep") == ("KILLED", "interrupted")
    for lock in (project / "outputs" / "sweeps" / SWEEP / ".lock",
                 project / "outputs" / "campaigns" / CAMPAIGN / ".lock"):
        assert lock.read_text() == "", lock  # released cleanly
    print(f"seconds from SIGTERM to the sweep's exit: {seconds:.1f}")

    rc, out, _, _ = wait_fisao(start_fisao(project, *command[3:]))
    assert rc == 0, out[-3000:]
    assert status(project, CAMPAIGN, "campaign") == ("FINISHED", "finished")
    assert status(project, SWEEP, "sweep") == ("FINISHED", "finished")
    result = io.read_json(project / "outputs" / "sweeps" / SWEEP / "sweep.json")
    assert [r["run"] for r in result["runs"]] == [CAMPAIGN] and result["failed"] == []

