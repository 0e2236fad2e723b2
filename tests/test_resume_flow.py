"""Resuming a finished tiny campaign: `fisao runs`/`fisao audit`, the lock, a damaged checkpoint,
changed config and changed data — with the real Prefect (test harness), MLflow (sqlite) and DVC.

The tests share one project (module fixture `finished`) and run in file order: the read-only ones
first, then those that change it (checkpoint damaged and restored, config changed, data changed).
"""
from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from fisao import io
from fisao.manifest import verify_manifest
from tests.campaign_process import results, run_fisao
from tests.conftest import copy_project

pytestmark = pytest.mark.e2e
NAME = "r"


@pytest.fixture(scope="module")
def finished(base_project, tmp_path_factory, harness):
    project = copy_project(base_project, tmp_path_factory.mktemp("resume") / "project")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    from flows.campaign import campaign

    summary = campaign(config_path=str(project / "tiny.yaml"), project=str(project), run_name=NAME, rounds=1)
    yield project, summary
    mp.undo()


def again(project, **kwargs):
    from flows.campaign import campaign

    return campaign(config_path=str(project / "tiny.yaml"), project=str(project), run_name=NAME, rounds=1, **kwargs)


def cli(project, capsys, *args) -> tuple[int, str, str]:
    from cli.main import main

    rc = main(["--project", str(project), *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def round_dir(summary) -> str:
    return str(io.read_json(summary["summary_path"])["checkpoints"][1])


def test_runs_lists_the_campaign_and_audit_tells_what_trained_the_round(finished, capsys, tmp_path):
    project, summary = finished
    rc, out, _ = cli(project, capsys, "runs")
    line = next(l for l in out.splitlines() if l.startswith(NAME + " "))
    assert rc == 0 and "1/1" in line and "finished" in line and "1 (" in line

    rc, out, _ = cli(project, capsys, "runs", NAME)
    assert rc == 0 and f"campaign {NAME}: finished, 1 of 1 rounds" in out
    assert summary["llava"]["sha256"][:12] in out and summary["world"]["md5"] in out

    rc, out, _ = cli(project, capsys, "audit", NAME, "--round", "1", "--export", str(tmp_path / "audit"))
    assert rc == 0, out
    cal = io.read_json(summary["calibration"]["path"] + "/calibration.json")["mention"]
    assert f"baseline b {cal['baseline']:.4f}, width w {cal['width']:.4f}" in out
    assert f"parent      {summary['llava']['path']}  sha256 {summary['llava']['sha256']}" in out
    assert f"checkpoint  {round_dir(summary)}" in out
    exported = {p.name for p in (tmp_path / "audit").iterdir()}
    assert {"tokens.jsonl", "report.html", "rewards.png", "curves.png", "calibration.json", "manifest.json",
            "lineage.json"} <= exported
    rows = io.read_jsonl(tmp_path / "audit" / "tokens.jsonl")
    ro = summary["config"]["rollout"]
    assert len(rows) == ro["images_per_round"] * (ro["n_per_image"] + ro["questions_per_image"])
    questions = [r for r in rows if r["kind"] == "question"]
    assert ro["questions_per_image"] > 0 and len(questions) == ro["images_per_round"] * ro["questions_per_image"]
    for q in questions:  # the claim's reward sits on the answer's first word (if it has one), nowhere else
        assert not q["mentions"] and q["claim"]["category"] and q["claim"]["present"] in (True, False)
        rewarded = [t["reward"] for t in q["tokens"] if t["reward"] != 0]
        assert all(r == pytest.approx(q["claim"]["reward"], abs=1e-4) for r in rewarded)
    assert f"questions   {len(questions)} yes/no answers" in out
    for row in (r for r in rows if r["kind"] == "caption"):  # a mention's reward sits on its tokens, nowhere else
        for m in row["mentions"]:
            on = [t["reward"] for t in row["tokens"] if t["start"] < m["end"] and t["end"] > m["start"]]
            assert on and all(r == pytest.approx(m["reward"], abs=1e-4) for r in on)
        assert sum(t["reward"] != 0 for t in row["tokens"]) == sum(
            1 for t in row["tokens"] if any(t["start"] < m["end"] and t["end"] > m["start"] for m in row["mentions"]))
    lineage = io.read_json(tmp_path / "audit" / "lineage.json")
    assert lineage["tags"]["fisao.data_md5"] == summary["world"]["md5"]
    assert lineage["tags"]["fisao.parent_sha256"] == summary["llava"]["sha256"]
    for key in ("fisao.git_commit", "fisao.git_dirty", "fisao.config_hash", "version.torch", "fisao.model_sha256"):
        assert lineage["tags"][key], key

    rc, _, err = cli(project, capsys, "audit", NAME, "--round", "5")
    assert rc == 2 and "no complete round 5" in err and "[1]" in err


def test_a_second_process_on_the_same_campaign_is_refused(finished):
    project, _ = finished
    lock = project / "outputs" / "campaigns" / NAME / ".lock"
    hold = f"import time; from fisao.locks import RunLock; RunLock({str(lock)!r}, {NAME!r}).acquire(); print('held', flush=True); time.sleep(120)"
    holder = subprocess.Popen([sys.executable, "-c", hold], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        rc, out, seconds, _ = run_fisao(project, "run", "--config", "tiny.yaml", "--run-name", NAME)
        assert rc == 2 and f"campaign '{NAME}' is already running: pid {holder.pid}" in out and "--run-name" in out
        print(f"refused in {seconds:.1f}s")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def test_a_stale_lock_is_taken_over_and_said(finished, caplog):
    project, summary = finished
    lock = project / "outputs" / "campaigns" / NAME / ".lock"
    lock.write_text('{"pid": 999999, "host": "gone", "since": "yesterday"}\n')  # a holder killed long ago
    resumed = again(project)
    assert "took over the lock of campaign r from pid 999999 on gone since yesterday" in caplog.text
    assert resumed["resume"]["verified_rounds"] == [1]
    assert resumed["rounds"] == summary["rounds"]


def test_a_truncated_checkpoint_is_reported_and_the_round_recomputed(finished, caplog):
    project, summary = finished
    weights = project / round_dir(summary) / "model.safetensors"
    manifest = io.read_json(project / "outputs" / "campaigns" / NAME / "round-1" / "manifest.json")
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size // 2)

    resumed = again(project)

    err = caplog.text
    assert f"{weights}: truncated ({size // 2} of {size} bytes)" in err and "recomputed, not loaded" in err
    assert resumed["resume"]["verified_rounds"] == []
    assert not resumed["stages"]["update-1"]["cached"]
    assert verify_manifest(manifest) == []  # rebuilt byte for byte
    assert [results(m) for m in resumed["rounds"]] == [results(m) for m in summary["rounds"]]
    from tests.campaign_process import mlflow_rounds

    assert [len(runs) for runs in mlflow_rounds(project, NAME).values()] == [1, 1]


def test_a_round_recomputed_by_newer_code_keeps_its_recorded_lineage(finished, caplog, monkeypatch):
    """A round recomputed from its cached stages trained the checkpoint its MLflow run records: the
    run is kept, so its lineage is too. A new lineage.json (naming the newer code) would differ
    from the run's manifest, and every later resume would recompute the round again."""
    import flows.campaign

    project, summary = finished
    lineage = project / "outputs" / "campaigns" / NAME / "round-1" / "lineage.json"
    recorded = lineage.read_bytes()
    lineage.unlink()  # the round is recomputed, its stages cache hits ...
    tags = flows.campaign._lineage_tags
    monkeypatch.setattr(flows.campaign, "_lineage_tags", lambda cfg, world: {**tags(cfg, world), "fisao.code": "newer"})

    first = again(project)  # ... by "newer" code

    assert first["resume"]["verified_rounds"] == [] and "recomputed, not loaded" in caplog.text
    assert lineage.read_bytes() == recorded
    assert "the run's lineage is kept" in caplog.text
    caplog.clear()
    second = again(project)
    assert second["resume"]["verified_rounds"] == [1] and "damaged" not in caplog.text
    assert [results(m) for m in second["rounds"]] == [results(m) for m in summary["rounds"]]


def test_changed_config_is_refused_unless_allowed(finished):
    project, summary = finished
    config = project / "tiny.yaml"
    config.write_text(config.read_text().replace("ppo:\n", "ppo:\n  lr: 0.002\n", 1))
    from tasks.campaigns import InputsChanged

    with pytest.raises(InputsChanged) as e:
        again(project)
    message = str(e.value)
    assert "config: ppo.lr 0.001 -> 0.002" in message and "--run-name" in message and "--allow-changed-data" in message

    resumed = again(project, allow_changed_data=True)
    assert resumed["resume"]["verified_rounds"] == [1]  # a finished round stays as it was trained
    from tasks.mlflow_store import campaign_parent

    tags = campaign_parent(NAME).data.tags
    assert any(k.startswith("fisao.inputs_changed.") and "ppo.lr 0.001 -> 0.002" in v for k, v in tags.items())


def test_changed_data_is_refused_naming_both_versions(finished):
    project, summary = finished
    from fisao import dvcdata
    from tasks.campaigns import InputsChanged

    captions = next((project / "data" / "world").rglob("captions.jsonl"))
    captions.write_text(captions.read_text() + "\n")
    new_md5 = dvcdata.track(project, "data")  # a new data version, recorded in data.dvc
    with pytest.raises(InputsChanged) as e:
        again(project, allow_changed_data=False)
    assert f"data: md5 {summary['world']['md5']} -> {new_md5} (data.dvc)" in str(e.value)
