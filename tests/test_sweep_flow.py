"""End to end: `fisao sweep` on tiny worlds with the real Prefect (test harness), MLflow and DVC.

Two world seeds × one training seed, one round each. In the first invocation the first campaign
fails in round 1 (after its world and base models were built) and the sweep goes on with the
second; the second invocation, through the command line, takes the finished campaign (no stage
computed, its MLflow round run kept), resumes the failed one, prints the table and writes
sweep.json. The sweep's MLflow parent run and the campaigns' tags are checked, and `data/` and
`data.dvc` are left as they were.
"""
from __future__ import annotations


import pytest
import yaml

from fisao import dvcdata, io
from fisao.sweep import FIELDS, aggregate, plan, run_record
from tests.conftest import copy_project, project_env

pytestmark = pytest.mark.e2e
SWEEP = "sw"
# World seeds whose tiny models pass the calibration guard (correct mentions scoring above hallucinated
# ones on average; TINY's CLIP is barely trained): world 1 fails it, 0 and 2 pass (AUROC 0.62 and 0.75).
WORLDS = (0, 2)


class Stopped(RuntimeError):
    pass


def _campaign_runs(client, campaign: str) -> dict[str, list]:
    exp = client.get_experiment_by_name(campaign)
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`fisao.complete` = 'true'")
    out: dict[str, list] = {}
    for r in runs:
        out.setdefault(r.data.tags["fisao.kind"] + r.data.tags.get("fisao.round", ""), []).append(r.info.run_id)
    return out


def test_sweep_goes_past_a_failed_campaign_then_continues_prints_writes_json_and_logs_mlflow(
        base_project, tmp_path_factory, harness, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    import flows.rounds
    from fisao.config import load_config
    from cli.main import main
    from flows.sweep import sweep

    project = copy_project(base_project, tmp_path_factory.mktemp("sweep") / "project")
    project_env(project, monkeypatch)
    config = str(project / "tiny.yaml")
    data_dvc, data_md5 = (project / "data.dvc").read_bytes(), dvcdata.verify(project, "data")
    runs = plan(load_config(config), SWEEP, WORLDS, (0,))

    real_round = flows.rounds.fisao_round

    def fails_in_first(cfg, *args, **kwargs):
        if cfg.name == runs[0].name:
            raise Stopped("stopped in round 1 of the first campaign")
        return real_round(cfg, *args, **kwargs)

    monkeypatch.setattr(flows.rounds, "fisao_round", fails_in_first)
    first = sweep(config_path=config, worlds=list(WORLDS), seeds=[0], project=str(project), rounds=1, name=SWEEP)
    monkeypatch.setattr(flows.rounds, "fisao_round", real_round)

    # The failure was reported and the sweep went on with the other world.
    assert [f["run"] for f in first["failed"]] == [runs[0].name]
    assert "Stopped: stopped in round 1" in first["failed"][0]["error"]
    assert [r["run"] for r in first["runs"]] == [runs[1].name]
    client = MlflowClient()
    parent = client.search_runs([client.get_experiment_by_name(SWEEP).experiment_id])[0]
    assert parent.data.tags["fisao.status"] == "failed" and parent.info.status == "FAILED"
    assert parent.data.tags["fisao.failed"] == runs[0].name
    finished_before = _campaign_runs(client, runs[1].name)
    assert len(finished_before["round1"]) == 1
    assert "round1" not in _campaign_runs(client, runs[0].name)

    rc = main(["--project", str(project), "sweep", "--config", config, "--worlds", ",".join(map(str, WORLDS)),
               "--seeds", "0", "--rounds", "1", "--name", SWEEP])
    out = capsys.readouterr().out
    assert rc == 0, out

    result = io.read_json(project / "outputs" / "sweeps" / SWEEP / "sweep.json")
    assert [r["run"] for r in result["runs"]] == [r.name for r in runs] and result["failed"] == []
    assert (result["worlds"], result["seeds"]) == (list(WORLDS), [0])
    summaries = [io.read_json(project / "outputs" / "campaigns" / r.name / "summary.json") for r in runs]

    # The finished campaign was taken: its round verified, no stage computed, its MLflow runs kept.
    resumed, done = summaries
    assert done["resume"]["verified_rounds"] == [1]
    assert all(s["cached"] for s in done["stages"].values()), done["stages"]
    assert _campaign_runs(client, runs[1].name) == finished_before
    # The failed one was resumed: its world and base models from the first invocation, round 1 computed.
    assert resumed["resume"]["verified_rounds"] == []
    assert resumed["stages"]["clip"]["cached"] and resumed["stages"]["llava"]["cached"]
    assert not resumed["stages"]["update-1"]["cached"]
    assert len(_campaign_runs(client, runs[0].name)["round1"]) == 1

    # Each world its own data directory and DVC record; data/ and data.dvc untouched.
    assert [s["world"]["path"] for s in summaries] == [str(project / r.data_dir / "world") for r in runs]
    assert resumed["world"]["md5"] != done["world"]["md5"]
    assert all((project / f"{r.data_dir}.dvc").is_file() for r in runs)
    assert (project / "data.dvc").read_bytes() == data_dvc and dvcdata.verify(project, "data") == data_md5

    # sweep.json: each record from its campaign's summary; mean and std of those records.
    for run, rec, summary in zip(runs, result["runs"], summaries):
        assert rec == run_record(run, summary["rounds"], summary["calibration"]["figures"])
        assert rec["base_chair_i"] == summary["rounds"][0]["chair_i"]
        assert rec["final_pope_adversarial_f1"] == summary["rounds"][1]["pope_adversarial_f1"]
        assert rec["final_kl"] == summary["rounds"][1]["update/kl"]
        assert rec["verifier_auroc"] == summary["calibration"]["figures"]["auroc"]
    mean, std = aggregate(result["runs"])
    assert (result["mean"], result["std"]) == (mean, std)
    a, b = (r["verifier_auroc"] for r in result["runs"])
    assert mean["verifier_auroc"] == pytest.approx((a + b) / 2)
    assert std["verifier_auroc"] == pytest.approx(abs(a - b) / 2 ** 0.5)

    # The table: a row per run with base→final, then mean and std.
    lines = out.splitlines()
    row = next(line for line in lines if line.startswith("w0 s0"))
    rec = result["runs"][0]
    assert f"{rec['base_chair_i']:.3f}→{rec['final_chair_i']:.3f}" in row and f"{rec['verifier_auroc']:.3f}" in row
    assert any(line.startswith(f"w{WORLDS[1]} s0") for line in lines)
    assert any(line.startswith("mean ") and f"{mean['base_recall']:.3f}→{mean['final_recall']:.3f}" in line
               for line in lines)
    assert any(line.startswith("std ") for line in lines)

    # MLflow: the sweep's parent run (finished now) with mean/std metrics and sweep.json; the campaigns tagged.
    parent = client.get_run(parent.info.run_id)
    assert parent.data.tags["fisao.status"] == "finished" and parent.info.status == "FINISHED"
    assert parent.data.tags["fisao.failed"] == "none"
    assert parent.data.tags["fisao.kind"] == "sweep"
    assert parent.data.tags["fisao.campaigns"] == ",".join(r.name for r in runs)
    for field in ("final_chair_i", "base_pope_adversarial_f1", "verifier_auroc", "final_kl"):
        assert parent.data.metrics[f"mean/{field}"] == pytest.approx(mean[field])
        assert parent.data.metrics[f"std/{field}"] == pytest.approx(std[field])
    # One point per invocation that finished runs, at step = runs finished: the first had one, the second both.
    history = {m.step: m.value for m in client.get_metric_history(parent.info.run_id, "mean/verifier_auroc")}
    assert history == pytest.approx({1: first["mean"]["verifier_auroc"], 2: mean["verifier_auroc"]})
    logged = client.download_artifacts(parent.info.run_id, "sweep.json", str(tmp_path_factory.mktemp("dl")))
    assert io.read_json(logged) == result
    ids = [e.experiment_id for e in client.search_experiments()]
    tagged = client.search_runs(ids, filter_string=f"tags.`fisao.sweep` = '{SWEEP}' and tags.`fisao.kind` = 'campaign'")
    assert sorted(r.data.tags["fisao.campaign"] for r in tagged) == sorted(r.name for r in runs)
    assert {r.data.tags["fisao.sweep_world"] for r in tagged} == {str(w) for w in WORLDS}
    assert client.get_experiment_by_name(SWEEP).tags["mlflow.note.content"] == (
        f"sweep {SWEEP}: mean CHAIR_i {mean['base_chair_i']:.3f} base → {mean['final_chair_i']:.3f} final over 2 campaigns")
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    with get_client(sync_client=True) as prefect:
        named = prefect.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"sweep:{SWEEP}"])))
    assert {SWEEP, *(r.name for r in runs)} <= {r.name for r in named}  # the sweep's run and its campaigns'
    assert set(FIELDS) <= set(result["mean"])

    # The same sweep name with another config is refused, and the sweep's run is left as it was.
    changed = yaml.safe_load((project / "tiny.yaml").read_text())
    changed["ppo"]["lr"] = 0.002
    (project / "changed.yaml").write_text(yaml.safe_dump(changed))
    rc = main(["--project", str(project), "sweep", "--config", str(project / "changed.yaml"), "--worlds", "0",
               "--name", SWEEP])
    err = capsys.readouterr().err
    assert rc == 2 and f"sweep '{SWEEP}'" in err and "was started with another config" in err and "new --name" in err
    assert client.get_run(parent.info.run_id).data.tags["fisao.status"] == "finished"
