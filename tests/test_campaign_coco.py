"""End to end on the real-model path: `flows.campaign.campaign` with a `model` and a `data` section.

The policy is a tiny `LlavaForConditionalGeneration` and the verifier its `CLIPModel`, both saved
to directories and named by path, as a user names llava-hf/llava-1.5-7b-hf; the data is a COCO
layout (train2014/, val2014/, annotations/, pope/) versioned with `dvc add`. One round runs:
memory check -> base evaluation -> calibration on val2014 -> rollouts on train2014 -> scores ->
update -> evaluation (CHAIR + POPE), with the real Prefect (test harness), MLflow (sqlite) and DVC;
rollouts and update run on 2 processes under `accelerate launch` (gloo on CPU), as on a GPU node.
A second run resumes the campaign: the finished round comes from MLflow, the rest from the stages'
complete directories.
The images are the shapes world under COCO names (tests/cocoworld.py), so the verifier really
separates correct from hallucinated mentions and calibration runs as it would on COCO.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from fisao import io
from fisao.dvcdata import dvc, read_dvc_file
from tasks.mlflow_store import mlflow_key
from tests.conftest import init_project

pytestmark = pytest.mark.e2e

# One yes/no question per image about a random COCO category, sampled in the two processes' shards.
ROLLOUTS = {"images_per_round": 8, "n_per_image": 2, "questions_per_image": 1}


def test_real_model_campaign_on_coco_runs_one_round_and_logs_it(coco_world, harness, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from flows.campaign import campaign

    project = init_project(tmp_path / "project")
    shutil.copytree(coco_world["coco"], project / "data" / "coco")
    added = dvc(project, "add", "data/coco")
    assert added.returncode == 0, added.stderr
    coco_md5 = read_dvc_file(project / "data" / "coco.dvc").md5
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    monkeypatch.setenv("FISAO_PROJECT", str(project))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two processes on two shared cores
    config = project / "coco.yaml"
    config.write_text(yaml.safe_dump({
        "name": "coco-e2e",
        "model": {"policy": str(coco_world["llava"]), "verifier": str(coco_world["clip"]), "dtype": "float32",
                  "device": "cpu", "gradient_checkpointing": True},
        "data": {"kind": "coco", "root": str(project / "data" / "coco")},
        "rollout": {"split": "train", **ROLLOUTS, "max_new_tokens": 24, "batch_size": 16},
        "reward": {"calibration_images": 40, "calibration_answers": 2},
        "eval": {"limit": 16, "max_new_tokens": 24, "pope_max_new_tokens": 4, "batch_size": 32},
        "ppo": {"rounds": 1, "minibatch_size": 4, "epochs": 1},
        "scale": {"processes": 2},
    }))

    summary = campaign(config_path=str(config), project=str(project))

    # The data is keyed on what `dvc add` recorded; nothing was built (no world, no base models).
    assert summary["world"] == {"path": str(project / "data" / "coco"), "md5": coco_md5, "action": "given"}
    assert summary["llava"]["path"] == str(coco_world["llava"]) and summary["clip"]["path"] == str(coco_world["clip"])
    assert set(summary["stages"]) == {"eval-0", "calibrate", "rollouts-1", "score-1", "update-1", "eval-1"}
    # Calibration on val2014: the base policy's own answers hold correct and hallucinated mentions,
    # and the verifier scores the correct ones higher.
    cal = summary["calibration"]["figures"]
    assert cal["mentions"] >= 20 and 0.1 < cal["hallucinated_share"] < 0.9
    assert cal["auroc"] > 0.7 and cal["width"] > 0
    calibration = io.read_json(f"{summary['calibration']['path']}/calibration.json")["mention"]
    assert calibration["mean_correct"] > calibration["mean_hallucinated"]

    base, after = summary["rounds"]
    for metrics in (base, after):
        assert metrics["chair_n_captions"] == 16
        for key in ("chair_s", "chair_i", "recall", "pope_random_f1", "pope_popular_f1", "pope_adversarial_f1"):
            assert 0.0 <= metrics[key] <= 1.0, key
    assert after["score/mentions"] > 0 and -1 <= after["score/reward_mean"] <= 1
    assert 0 <= after["score/rollout_hallucination_share"] <= 1  # train2014 has instances here: audited
    assert after["update/kl"] == pytest.approx(0.0, abs=1e-6)  # round 1 starts at the reference
    assert summary["checkpoints"][0] == str(coco_world["llava"]) and summary["checkpoints"][1] != summary["checkpoints"][0]
    # Both stages ran on the two processes: one rollout shard each, and the update's steps shared.
    shards = sorted((project / "outputs" / "campaigns" / "coco-e2e" / "rollouts").glob("*-shard*"))
    assert [io.read_json(d / "figures.json")["process"] for d in shards] == [[0, 2], [1, 2]]
    assert io.read_json(Path(summary["checkpoints"][1]).parent / "figures.json")["processes"] == 2

    client = MlflowClient()
    exp = client.get_experiment_by_name("coco-e2e")
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.data.tags["fisao.kind"] for r in runs) == ["campaign", "round", "round"]
    parent = next(r for r in runs if r.data.tags["fisao.kind"] == "campaign")
    by_round = {int(r.data.tags["fisao.round"]): r for r in runs if r.data.tags["fisao.kind"] == "round"}
    for k, metrics in enumerate(summary["rounds"]):
        run = by_round[k]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["fisao.data_md5"] == coco_md5
        assert run.data.tags["fisao.policy"] == str(coco_world["llava"])
        assert set(run.data.metrics) == {mlflow_key(key) for key in metrics}
        for key, value in metrics.items():
            assert run.data.metrics[mlflow_key(key)] == pytest.approx(value), (k, key)
        evaluation = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
        assert {"evaluation/captions.jsonl", "evaluation/chair_details.jsonl", "evaluation/metrics.json",
                "evaluation/pope_adversarial_answers.jsonl"} <= evaluation
    assert by_round[1].data.params["model_path"] == summary["checkpoints"][1]
    assert by_round[1].data.params["rollout.images_per_round"] == "8"
    assert "adapter/adapter_config.json" in {a.path for a in client.list_artifacts(by_round[1].info.run_id, "adapter")}
    assert {a.path for a in client.list_artifacts(by_round[1].info.run_id, "calibration")} >= {
        "calibration/calibration.json", "calibration/scores.png"}
    rows = client.download_artifacts(by_round[1].info.run_id, "scores/rewards.jsonl", str(tmp_path / "dl"))
    per_image = ROLLOUTS["n_per_image"] + ROLLOUTS["questions_per_image"]
    assert len(io.read_jsonl(rows)) == ROLLOUTS["images_per_round"] * per_image
    assert [m.step for m in client.get_metric_history(parent.info.run_id, "eval/chair_i")] == [0, 1]
    assert io.read_json(summary["summary_path"])["rounds"] == summary["rounds"]

    # A second run (say, after a crash) resumes the campaign: round 1 is verified against its
    # manifest and taken from MLflow, the other stages find their directories complete, nothing is logged twice.
    again = campaign(config_path=str(config), project=str(project))
    assert again["resume"]["verified_rounds"] == [1]
    assert all(stage["cached"] for stage in again["stages"].values())
    assert again["rounds"] == summary["rounds"] and again["checkpoints"] == summary["checkpoints"]
    assert len(client.search_runs([exp.experiment_id])) == len(runs)
    assert [m.step for m in client.get_metric_history(parent.info.run_id, "eval/chair_i")] == [0, 1]

    # The evaluate-checkpoint flow on the real-model config: the same COCO md5 and runtime as the
    # campaign, so round 1's evaluation is found on disk rather than run again, and logged once.
    from flows.evaluate import evaluate_checkpoint

    evaluations = sorted((project / "outputs" / "eval").iterdir())
    checked = evaluate_checkpoint(model=summary["checkpoints"][1], config_path=str(config), project=str(project))
    assert sorted((project / "outputs" / "eval").iterdir()) == evaluations and Path(checked["path"]) in evaluations
    assert checked["cached"]  # its directory was complete: nothing evaluated again
    assert checked["metrics"] == {k: summary["rounds"][1][k] for k in checked["metrics"]}
    logged = client.get_run(checked["run_id"])
    assert logged.data.tags["fisao.kind"] == "evaluation" and logged.data.tags["fisao.data_md5"] == coco_md5
