"""A tiny 2-round campaign's MLflow store as an MLflow user meets it, with the real Prefect (test
harness), MLflow (sqlite) and DVC: the registered model, its versions and `best` alias (and none
registered twice when the campaign is resumed), `models:/` URIs on the command line, the data
each round used as dataset inputs, the evaluation's metrics under eval/, and MLflow's own UI
(`mlflow server` on that store) rendering the campaign's round runs in headless Chromium.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import pytest

from fisao import io
from tests.conftest import copy_project

pytestmark = pytest.mark.e2e
NAME = "reg"


@pytest.fixture(scope="module")
def ran(base_project, tmp_path_factory, harness):
    """The campaign run twice (the second run resumes it: every round verified, nothing recomputed);
    the registry's versions as they were after the first run."""
    from mlflow.tracking import MlflowClient

    project = copy_project(base_project, tmp_path_factory.mktemp("registry") / "project")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    from flows.campaign import campaign

    first = campaign(config_path=str(project / "tiny.yaml"), project=str(project), run_name=NAME, rounds=2)
    versions = sorted((v.version, v.run_id, v.tags["fisao.model_sha256"])
                      for v in MlflowClient().search_model_versions(f"name = '{NAME}'"))
    second = campaign(config_path=str(project / "tiny.yaml"), project=str(project), run_name=NAME, rounds=2)
    yield {"project": project, "first": first, "second": second, "versions": versions}
    mp.undo()


def round_runs_by_index():
    from tasks.mlflow_store import round_runs

    return round_runs(NAME)


def test_each_round_is_a_version_of_the_campaigns_model_and_a_resume_registers_none_again(ran):
    from mlflow.tracking import MlflowClient

    client, first, runs = MlflowClient(), ran["first"], round_runs_by_index()
    assert ran["versions"] == [(k, runs[k].info.run_id, runs[k].data.tags["fisao.model_sha256"]) for k in (1, 2)]
    chair_i = {k: first["rounds"][k]["chair_i"] for k in (1, 2)}
    best = min(chair_i, key=lambda k: (chair_i[k], k))
    assert client.get_registered_model(NAME).aliases == {"best": best}
    assert first["registry"] == {"name": NAME, "versions": {"1": "1", "2": "2"}, "aliases": {"best": str(best)}}

    assert ran["second"]["resume"]["verified_rounds"] == [1, 2]
    assert sorted((v.version, v.run_id, v.tags["fisao.model_sha256"])
                  for v in client.search_model_versions(f"name = '{NAME}'")) == ran["versions"]
    assert client.get_registered_model(NAME).aliases == {"best": best}
    models = client.search_logged_models([runs[1].info.experiment_id])
    assert sorted(m.name for m in models) == [f"{NAME}-round-1", f"{NAME}-round-2"]
    for model in models:
        k = int(model.tags["fisao.round"])
        assert model.source_run_id == runs[k].info.run_id
        assert {m.key: m.value for m in model.metrics}["eval/chair_i"] == pytest.approx(chair_i[k])


def test_models_uris_name_the_registered_checkpoint_on_the_command_line(ran, capsys):
    from cli.main import main
    from tasks.mlflow_store import checkpoint_dir

    project, runs = ran["project"], round_runs_by_index()
    best = int(ran["first"]["registry"]["aliases"]["best"])
    path = checkpoint_dir(f"models:/{NAME}@best")
    assert io.tree_digest(path) == runs[best].data.tags["fisao.model_sha256"]

    rc = main(["--project", str(project), "audit", f"models:/{NAME}@best"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert f"models:/{NAME}@best: {path}" in out.err
    assert f"campaign {NAME}, round {best}: MLflow run {runs[best].info.run_id}" in out.out

    rc = main(["--project", str(project), "eval", "model", "--model", f"models:/{NAME}/1", "--benchmarks", "chair",
               "--limit", "2", "--data", str(project / "data" / "world"), "--config", str(project / "tiny.yaml"),
               "--out", str(project / "eval-v1")])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert f"models:/{NAME}/1: {checkpoint_dir(f'models:/{NAME}/1')}" in out.err
    assert io.read_json(project / "eval-v1" / "metrics.json")["metrics"]["chair_n_captions"] == 2


def test_rounds_log_their_data_as_datasets_and_the_evaluation_under_eval(ran):
    first, runs = ran["first"], round_runs_by_index()
    md5, cfg = first["world"]["md5"], first["config"]
    for k, run in runs.items():
        inputs = {i.dataset.name: (i.dataset.digest, {t.key: t.value for t in i.tags}) for i in run.inputs.dataset_inputs}
        evaluation = {"mlflow.data.context": "evaluation", "split": "test",
                      "images": str(first["rounds"][k]["chair_n_captions"])}
        training = {"mlflow.data.context": "training", "split": cfg["rollout"]["split"],
                    "images": str(cfg["rollout"]["images_per_round"])}
        expected = {"world-test": (md5, evaluation), **({f"world-{training['split']}": (md5, training)} if k else {})}
        assert inputs == expected, k
        assert run.data.metrics["eval/chair_i"] == pytest.approx(first["rounds"][k]["chair_i"])
        assert "chair_i" not in run.data.metrics


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_ui(ran, tmp_path):
    """`mlflow server` on the campaign's store, on a free port of 127.0.0.1; stopped after the test."""
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                               f"sqlite:///{ran['project'] / 'mlflow.db'}", "--host", "127.0.0.1", "--port", str(port),
                               "--workers", "1"], stdout=open(tmp_path / "server.log", "w"), stderr=subprocess.STDOUT,
                              start_new_session=True)  # its own process group: the server and its workers stop together
    try:
        deadline = time.time() + 240
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    pytest.fail(f"mlflow server did not start: {(tmp_path / 'server.log').read_text()[-2000:]}")
                time.sleep(1)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


class GridCells(HTMLParser):
    """The text of each cell of MLflow's runs grid: {row-id: {col-id: text}} (ag-grid's attributes;
    a row's pinned and scrolled parts share its row-id)."""

    def __init__(self):
        super().__init__()
        self.rows: dict[str, dict[str, str]] = {}
        self._stack: list[tuple[str, str | None, str | None]] = []  # (tag, row-id, col-id) in effect

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        row, col = self._stack[-1][1:] if self._stack else (None, None)
        if tag in ("area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"):
            return
        self._stack.append((tag, attrs.get("row-id", row), attrs.get("col-id", col)))

    def handle_endtag(self, tag):
        while self._stack:
            if self._stack.pop()[0] == tag:
                break

    def handle_data(self, data):
        if self._stack and self._stack[-1][1] and self._stack[-1][2] and data.strip():
            cells = self.rows.setdefault(self._stack[-1][1], {})
            cells[self._stack[-1][2]] = (cells.get(self._stack[-1][2], "") + " " + data.strip()).strip()


def chromium(tmp_path: Path, url: str, *how: str) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed on CI: .ci/run installs it with apt-get")
        pytest.skip("no chromium here (apt-get install -y chromium)")
    return subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           f"--user-data-dir={tmp_path / 'profile'}", "--window-size=2600,900",  # ag-grid draws visible columns only
                           "--virtual-time-budget=60000", *how, url], capture_output=True, text=True, timeout=300)


def test_mlflows_runs_page_shows_the_round_runs_with_eval_chair_i(ran, mlflow_ui, tmp_path):
    from tasks.mlflow_store import RUNS_VIEW

    first, runs = ran["first"], round_runs_by_index()
    url = f"{mlflow_ui}/#/experiments/{first['mlflow']['experiment_id']}/runs?workflowType=machine_learning" \
          f"&viewStateShareKey={RUNS_VIEW}"  # the link the summary prints, on this server
    page = chromium(tmp_path, url, "--dump-dom")
    assert page.returncode == 0, page.stderr[-2000:]
    grid = GridCells()
    grid.feed(page.stdout)
    cells = {row.rsplit(".", 1)[-1]: values for row, values in grid.rows.items()}

    for k, run in runs.items():
        shown = cells.get(run.info.run_id)
        assert shown is not None, (k, sorted(grid.rows))
        assert set(shown) >= {"attributes.`Run Name`", "attributes.`Dataset`", "params.`round`"}, (k, shown)
        assert shown["attributes.`Run Name`"] == f"round-{k}"
        for key in ("chair_i", "pope_adversarial_f1"):  # the tiny models' CHAIR_i is often 0; their F1 is not
            assert float(shown[f"metrics.`eval/{key}`"]) == pytest.approx(first["rounds"][k][key], abs=5e-4), key
        assert shown["params.`round`"] == str(k)
        assert f"({first['world']['md5']})" in shown["attributes.`Dataset`"]  # e.g. world-test (221863b2….dir)
        if k:
            assert shown["attributes.`Models`"] == f"{NAME}-round-{k}"
    shot = chromium(tmp_path, url, f"--screenshot={tmp_path / 'runs.png'}", "--hide-scrollbars")
    assert shot.returncode == 0 and (tmp_path / "runs.png").stat().st_size > 10_000, shot.stderr[-2000:]
    kept = os.environ.get("FISAO_KEEP_SCREENSHOT")  # a path to copy it to, for a person to look at
    if kept:
        shutil.copy(tmp_path / "runs.png", kept)
