"""Deployments round trip: a real `prefect server` on 127.0.0.1, the process work pool, `prefect
deploy` of the process pool's deployments in prefect.yaml (as `make deploy`), a worker, two runs
of the nightly campaign deployment (each one more round of the same campaign), then the world
and evaluate-checkpoint deployments, checked in MLflow. Everything runs in its own process
group with its own PREFECT_HOME in a temp directory and is killed at the end, also on failure.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from fisao.localstate import OFFLINE
from tests.campaign_process import mlflow_rounds
from tests.conftest import copy_project

pytestmark = pytest.mark.e2e
CHECKOUT = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).with_name("prefect"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(args, cwd=CHECKOUT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            os.killpg(proc.pid, signal.SIGKILL)  # what the leader left in its group
        except (subprocess.TimeoutExpired, ProcessLookupError):
            continue
        return


def prefect(env: dict, *args: str, timeout: float = 120) -> str:
    res = subprocess.run([PREFECT, "--no-prompt", *args], cwd=CHECKOUT, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, f"prefect {' '.join(args)}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout


def test_nightly_deployment_adds_one_round_per_run(base_project, tmp_path):
    project = copy_project(base_project, tmp_path / "project")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "FISAO_"))}
    env.update({**OFFLINE, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": api,
                "PREFECT_SERVER_UI_ENABLED": "false", "PREFECT_UI_ENABLED": "false",
                "PREFECT_WORKER_QUERY_SECONDS": "1", "FISAO_CHECKOUT": str(CHECKOUT),
                "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}", "OMP_NUM_THREADS": "1"})
    t0 = time.time()
    server = start([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, tmp_path / "server.log")
    worker = None
    try:
        deadline = time.time() + 180
        while True:
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None and time.time() < deadline, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(0.5)
        prefect(env, "work-pool", "create", "fisao-process", "--type", "process")
        names = ("demo-campaign", "nightly-campaign", "evaluate-checkpoint", "world")  # `make deploy`'s
        deployed = prefect(env, "deploy", *(arg for name in names for arg in ("-n", name)))
        for name in names:
            assert name in deployed, deployed
        worker = start([PREFECT, "worker", "start", "--pool", "fisao-process", "--limit", "1"], env, tmp_path / "worker.log")

        params = ["--param", f"config_path={project / 'tiny.yaml'}", "--param", f"project={project}"]
        for night in (1, 2):
            out = prefect(env, "deployment", "run", "fisao-campaign/nightly-campaign", *params, "--watch",
                          "--watch-timeout", "300", timeout=330)
            assert "Completed" in out, out + (tmp_path / "worker.log").read_text()[-4000:]
            rounds = mlflow_rounds(project, "nightly")
            assert sorted(rounds) == list(range(night + 1)), night
            assert all(len(runs) == 1 and runs[0].data.tags["fisao.complete"] == "true" for runs in rounds.values())
        assert rounds[2][0].data.tags["fisao.parent_sha256"] == rounds[1][0].data.tags["fisao.model_sha256"]
        from mlflow.tracking import MlflowClient

        client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
        exp = client.get_experiment_by_name("nightly")
        parent = client.search_runs([exp.experiment_id], "tags.`fisao.kind` = 'campaign'")[0]
        assert parent.data.tags["fisao.status"] == "finished" and parent.data.tags["fisao.rounds_done"] == "2"
        assert parent.info.status == "FINISHED"
        assert (project / "outputs" / "campaigns" / "nightly" / "summary.json").is_file()

        # The other two deployments: the world (verified against data.dvc) and one checkpoint's evaluation.
        out = prefect(env, "deployment", "run", "fisao-world/world", *params, "--watch", "--watch-timeout", "120",
                      timeout=150)
        assert "Completed" in out, out
        checkpoint = rounds[2][0].data.tags["fisao.model_path"]
        out = prefect(env, "deployment", "run", "fisao-evaluate/evaluate-checkpoint", *params, "--param",
                      f"model={checkpoint}", "--watch", "--watch-timeout", "120", timeout=150)
        assert "Completed" in out, out
        tiny = client.get_experiment_by_name("tiny")
        evaluation = client.search_runs([tiny.experiment_id], "tags.`fisao.kind` = 'evaluation'")
        assert len(evaluation) == 1
        assert evaluation[0].data.tags["fisao.model_sha256"] == rounds[2][0].data.tags["fisao.model_sha256"]
        assert evaluation[0].data.metrics["eval/chair_i"] == rounds[2][0].data.metrics["eval/chair_i"]
        print(f"deployment round trip: {time.time() - t0:.0f}s")
    finally:
        if worker is not None:
            stop(worker)
        stop(server)
