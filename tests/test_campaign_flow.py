"""End to end: the campaign flow with the real Prefect (test harness), MLflow (sqlite) and DVC.

A tiny world and tiny models in a temp git + DVC project: the first run builds, evaluates and
logs everything; the second run finds every stage's directory complete (each stage `cached`),
verifies the data against data.dvc, and logs nothing twice.
"""
from __future__ import annotations

import json

import pytest
import yaml

from fisao.config import RolloutConfig
from tasks.mlflow_store import mlflow_key
from tests.conftest import TINY, init_project, nested

pytestmark = pytest.mark.e2e


def test_campaign_builds_evaluates_logs_then_hits_cache(tmp_path, monkeypatch, harness):
    from mlflow.tracking import MlflowClient

    from flows.campaign import campaign

    project = init_project(tmp_path / "project")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    monkeypatch.setenv("FISAO_PROJECT", str(project))
    config = project / "tiny.yaml"
    config.write_text(yaml.safe_dump({"name": "e2e", **nested(TINY)}))

    first = campaign(config_path=str(config), project=str(project))

    assert first["world"]["action"] == "created"
    assert (project / "data.dvc").is_file() and (project / "data.md5").is_file()
    assert first["world"]["md5"] in (project / "data.dvc").read_text()
    assert not any(s["cached"] for name, s in first["stages"].items() if name != "world")
    base = first["rounds"][0]
    for key in ("chair_s", "chair_i", "recall", "pope_random_f1", "pope_popular_f1", "pope_adversarial_f1"):
        assert 0.0 <= base[key] <= 1.0, key
    assert base["chair_n_captions"] == TINY["world.sizes"]["test"]

    client = MlflowClient()
    exp = client.get_experiment_by_name("e2e")
    assert exp.artifact_location.startswith((project / "mlartifacts").as_uri())
    runs = client.search_runs([exp.experiment_id])
    kinds = sorted(r.data.tags["fisao.kind"] for r in runs)
    assert kinds == ["build-clip", "build-llava", "campaign", "round", "round", "round"]
    by_kind = {r.data.tags["fisao.kind"]: r for r in runs if r.data.tags.get("fisao.round", "0") == "0"}
    by_round = {int(r.data.tags["fisao.round"]): r for r in runs if r.data.tags["fisao.kind"] == "round"}
    assert by_kind["build-clip"].data.tags["fisao.data_md5"] == first["world"]["md5"]
    assert "test_auroc" in by_kind["build-clip"].data.metrics
    assert len(client.get_metric_history(by_kind["build-llava"].info.run_id, "train/loss")) == TINY["llava.steps"]
    assert {a.path for a in client.list_artifacts(by_kind["build-llava"].info.run_id, "llava")} >= {
        "llava/config.json", "llava/model.safetensors", "llava/tokenizer.json", "llava/processor_config.json"}
    rnd = by_kind["round"]
    assert rnd.data.tags["mlflow.parentRunId"] == by_kind["campaign"].info.run_id
    assert rnd.data.metrics["eval/chair_i"] == pytest.approx(base["chair_i"])  # evaluation first: eval/
    evaluation = {a.path for a in client.list_artifacts(rnd.info.run_id, "evaluation")}
    assert {"evaluation/captions.jsonl", "evaluation/chair_details.jsonl", "evaluation/metrics.json"} <= evaluation
    local = client.download_artifacts(rnd.info.run_id, "evaluation/captions.jsonl", str(tmp_path))
    assert len(open(local).read().splitlines()) == base["chair_n_captions"]

    # FiSAO rounds: each its own checkpoint, nested run with reward/KL figures, adapter and rollouts.
    assert len(first["rounds"]) == 3 and len(set(first["checkpoints"])) == 3
    for k in (1, 2):
        run = by_round[k]
        assert run.data.tags["mlflow.parentRunId"] == by_kind["campaign"].info.run_id
        for key in ("chair_i", "score/reward_mean", "score/share_negative", "update/kl", "update/loss"):
            assert run.data.metrics[mlflow_key(key)] == pytest.approx(first["rounds"][k][key]), (k, key)
        assert "chair_i" not in run.data.metrics and "eval/pope_adversarial_f1" in run.data.metrics
        assert run.data.params["ppo.rounds"] == "2"
        names = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
        assert "adapter/adapter_config.json" in names
        rows = client.download_artifacts(run.info.run_id, "scores/rewards.jsonl", str(tmp_path / f"r{k}"))
        per_image = TINY["rollout.n_per_image"] + RolloutConfig().questions_per_image  # descriptions + yes/no questions
        assert len(open(rows).read().splitlines()) == TINY["rollout.images_per_round"] * per_image
    from fisao import io

    assert io.read_json(first["summary_path"])["rounds"] == first["rounds"]

    # MLflow: runs span their work, round is a parameter, builds sit under the campaign, descriptions.
    parent_run = by_kind["campaign"]
    for k in (1, 2):
        took = (by_round[k].info.end_time - by_round[k].info.start_time) / 1000
        assert took >= first["rounds"][k]["seconds/round"] - 0.05, (k, took)
        assert by_round[k].data.params["round"] == str(k)
    assert by_round[0].data.params.keys() == by_round[1].data.params.keys()
    assert by_round[0].data.tags["fisao.baseline"] == "true"
    build = by_kind["build-clip"]
    assert (build.info.end_time - build.info.start_time) / 1000 == pytest.approx(first["clip"]["figures"]["seconds"], abs=0.2)
    assert build.data.tags["mlflow.parentRunId"] == parent_run.info.run_id
    note = client.get_run(parent_run.info.run_id).data.tags["mlflow.note.content"]
    assert note.startswith(f"e2e: CHAIR_i {base['chair_i']:.3f} base → ")
    assert client.get_experiment(exp.experiment_id).tags["mlflow.note.content"] == note
    assert first["mlflow"] == {"experiment_id": exp.experiment_id, "run_id": parent_run.info.run_id, "view": "fisao-rounds"}

    # Prefect: flow runs named after the campaign and tagged with it; round tables and summary as artifacts.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId,
                                                FlowRunFilterTags)

    with get_client(sync_client=True) as prefect:
        flow_runs = prefect.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=["campaign:e2e"])))
        tables = prefect.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["e2e-rounds"])))
        summaries = prefect.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["e2e-summary"])))
    assert sorted(r.name for r in flow_runs) == ["e2e", "e2e: round 1", "e2e: round 2"]
    with get_client(sync_client=True) as prefect:  # untagged: no concurrency-slot calls per task run
        task_runs = prefect.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[r.id for r in flow_runs])))
    assert len(task_runs) > 10 and not any(t.tags for t in task_runs)
    assert sorted(a.description for a in tables) == ["e2e: metrics after round 1", "e2e: metrics after round 2"]
    latest = max(tables, key=lambda a: a.created)
    rows = json.loads(latest.data) if isinstance(latest.data, str) else latest.data
    assert [r["model"] for r in rows] == ["base", "round 1", "round 2"]
    assert rows[2]["chair_i"] == pytest.approx(first["rounds"][2]["chair_i"], abs=5e-4)
    assert len(summaries) == 1 and note.removeprefix("e2e: ") in summaries[0].data

    second = campaign(config_path=str(config), project=str(project))

    assert second["world"]["action"] == "verified"
    assert all(s["cached"] for name, s in second["stages"].items() if name != "world")
    assert second["rounds"] == first["rounds"]
    assert len(client.search_runs([exp.experiment_id])) == len(runs)
    parent = by_kind["campaign"].info.run_id
    assert [m.step for m in client.get_metric_history(parent, "eval/chair_i")] == [0, 1, 2]
    assert [m.step for m in client.get_metric_history(parent, "update/kl")] == [1, 2]
