"""What fisao writes to MLflow, checked on a real sqlite store without Prefect's server.

The log tasks are called through `.fn` (their plain functions); only Prefect's run logger is
replaced, since it needs a flow or task run.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest

from fisao import io

HOUR = 3600.0


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A fresh MLflow sqlite store in `tmp_path` (the project), with Prefect's run logger replaced."""
    import tasks.campaigns
    import tasks.resume
    import tasks.tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("FISAO_PROJECT", str(tmp_path))
    for module in (tasks.tracking, tasks.campaigns, tasks.resume):
        monkeypatch.setattr(module, "get_run_logger", lambda: logging.getLogger("test"))
    from mlflow.tracking import MlflowClient

    return MlflowClient()


def finished_at(directory: Path, name: str, content: dict, when: float) -> Path:
    """Write `directory/name` as a stage's marker and date it `when` (seconds since the epoch)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = io.write_json(directory / name, content)
    os.utime(path, (when, when))
    return directory


def duration_s(run) -> float:
    return (run.info.end_time - run.info.start_time) / 1000


def test_a_build_run_spans_the_builds_own_seconds_even_when_logged_an_hour_later(tmp_path, store):
    from tasks.tracking import log_build

    ended = time.time() - HOUR
    model = finished_at(tmp_path / "clip", "train_log.json", {"loss": [2.0, 1.0], "seconds": 528.7}, ended)
    ref = {"path": str(model), "sha256": "abc", "figures": {"seconds": 528.7, "test_auroc": 0.9}}

    run = store.get_run(log_build.fn("demo", "clip", ref, {"steps": 2}, {}))

    assert duration_s(run) == pytest.approx(528.7, abs=0.01)
    assert run.info.end_time / 1000 == pytest.approx(ended, abs=0.01)


def test_a_round_run_spans_rollouts_to_evaluation_and_the_parent_starts_with_the_flow(tmp_path, store):
    from tasks.campaigns import open_campaign
    from tasks.tracking import log_round, round_span

    t = time.time() - HOUR  # the round ran an hour ago, from t to t + 60
    samples = {"path": str(finished_at(tmp_path / "rollouts", "figures.json", {"seconds": 10.0}, t + 10)),
               "figures": {"seconds": 10.0}}
    scores = {"path": str(finished_at(tmp_path / "scores", "figures.json", {"seconds": 2.0}, t + 13)),
              "figures": {"seconds": 2.0}}
    update_dir = finished_at(tmp_path / "update", "figures.json", {"seconds": 30.0}, t + 45)
    model = {"path": str(update_dir / "model"), "figures": {"seconds": 30.0}}
    evaluation = finished_at(tmp_path / "eval", "metrics.json", {"metrics": {}}, t + 60)
    finished_at(evaluation, "timing.json", {"seconds": 14.0}, t + 60)
    inputs = {"data_md5": "m", "config_hash": "h", "config": {"ppo.rounds": 1}, "resolved": {}}
    parent = open_campaign.fn("demo", inputs, {}, "lock", started=t - 100)["run_id"]

    run_id = log_round.fn("demo", "demo", 1, {"chair_i": 0.1}, {}, {}, {},
                          span=round_span(samples, scores, model, {"path": str(evaluation)}))

    run = store.get_run(run_id)
    assert run.info.start_time / 1000 == pytest.approx(t, abs=0.01)
    assert duration_s(run) == pytest.approx(60.0, abs=0.01)
    assert store.get_run(parent).info.start_time / 1000 == pytest.approx(t - 100, abs=0.01)


def test_an_evaluation_written_before_its_seconds_were_recorded_spans_from_its_end(tmp_path):
    from tasks.tracking import evaluation_span

    ended = time.time() - HOUR
    evaluation = finished_at(tmp_path / "eval", "metrics.json", {"metrics": {}}, ended)

    start, end = evaluation_span(evaluation)

    assert start == end == int(ended * 1000)


def test_every_round_has_round_as_a_parameter_and_the_base_model_the_rounds_parameter_set():
    from fisao.config import load_config
    from flows.rounds import round_params

    cfg = load_config(None)
    base, third = round_params(cfg, {"path": "/m0"}, 0), round_params(cfg, {"path": "/m3"}, 3)

    assert (base["round"], third["round"]) == (0, 3)
    assert base.keys() == third.keys()
    assert third["ppo.rounds"] == cfg.ppo.rounds and third["model_path"] == "/m3"


def test_the_base_model_round_is_tagged_as_the_baseline(tmp_path, store):
    from tasks.campaigns import open_campaign
    from tasks.tracking import log_round

    inputs = {"data_md5": "m", "config_hash": "h", "config": {}, "resolved": {}}
    open_campaign.fn("demo", inputs, {}, "lock")
    runs = {k: store.get_run(log_round.fn("demo", "demo", k, {"chair_i": 0.1}, {"round": k}, {}, {}))
            for k in (0, 1)}

    assert [runs[k].data.tags["fisao.baseline"] for k in (0, 1)] == ["true", "false"]
    assert [runs[k].data.params["round"] for k in (0, 1)] == ["0", "1"]


def test_a_build_run_is_nested_under_the_campaign_that_used_it(tmp_path, store):
    from tasks.campaigns import open_campaign
    from tasks.tracking import log_build

    model = finished_at(tmp_path / "llava", "train_log.json", {"loss": [1.0], "seconds": 3.0}, time.time())
    ref = {"path": str(model), "sha256": "abc", "figures": {"seconds": 3.0}}
    inputs = {"data_md5": "m", "config_hash": "h", "config": {}, "resolved": {}}
    parent = open_campaign.fn("demo", inputs, {}, "lock")["run_id"]

    tags = store.get_run(log_build.fn("demo", "llava", ref, {}, {}, campaign="demo")).data.tags

    assert tags["mlflow.parentRunId"] == parent and tags["fisao.campaign"] == "demo"


def test_describe_writes_the_runs_and_its_experiments_description_and_experiments_are_marked_ml(tmp_path, store):
    from tasks.campaigns import open_campaign
    from tasks.tracking import NOTE, describe

    inputs = {"data_md5": "m", "config_hash": "h", "config": {}, "resolved": {}}
    opened = open_campaign.fn("demo", inputs, {}, "lock")

    describe.fn(opened["run_id"], "demo: CHAIR_i 0.145 base → 0.059 best (round 3 of 3)")

    experiment = store.get_experiment(opened["experiment_id"])
    assert experiment.name == "demo"
    assert experiment.tags[NOTE] == store.get_run(opened["run_id"]).data.tags[NOTE] == (
        "demo: CHAIR_i 0.145 base → 0.059 best (round 3 of 3)")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert open_campaign.fn("demo", inputs, {}, "lock")["experiment_id"] == opened["experiment_id"]  # resumed


def test_a_round_logs_the_data_it_used_as_datasets_with_the_dvc_md5_as_digest(tmp_path, store):
    from fisao.config import load_config
    from flows.rounds import round_datasets
    from tasks.campaigns import open_campaign
    from tasks.tracking import log_round

    cfg = load_config(None)
    world = {"path": str(tmp_path / "data" / "world"), "md5": "221863b2c1bcc38626fc724af3b0b652.dir"}
    samples = {"figures": {"split": "pretrain", "rollouts": 768}}
    open_campaign.fn("demo", {"data_md5": "m", "config_hash": "h", "config": {}, "resolved": {}}, {}, "lock")
    metrics = {"chair_i": 0.2, "chair_n_captions": 500}
    base = log_round.fn("demo", "demo", 0, metrics, {}, {}, {}, datasets=round_datasets(cfg, world, metrics))
    first = log_round.fn("demo", "demo", 1, metrics, {}, {}, {}, datasets=round_datasets(cfg, world, metrics, samples))

    def inputs(run_id):
        return sorted((i.dataset.name, i.dataset.digest, i.dataset.source, {t.key: t.value for t in i.tags})
                      for i in store.get_run(run_id).inputs.dataset_inputs)

    source = f'{{"uri": "{world["path"]}"}}'
    evaluation = ("world-test", world["md5"], source, {"mlflow.data.context": "evaluation", "split": "test",
                                                      "images": "500"})
    assert inputs(base) == [evaluation]
    assert inputs(first) == [("world-pretrain", world["md5"], source, {
        "mlflow.data.context": "training", "split": "pretrain", "images": str(cfg.rollout.images_per_round)}), evaluation]


def test_evaluation_metrics_are_logged_under_eval_and_read_back_under_their_summary_names(tmp_path, store):
    from tasks.campaigns import open_campaign
    from tasks.mlflow_store import round_runs, summary_key
    from tasks.tracking import log_round

    parent = open_campaign.fn("demo", {"data_md5": "m", "config_hash": "h", "config": {}, "resolved": {}}, {}, "lock")
    metrics = {"chair_i": 0.2, "pope_adversarial_f1": 0.7, "update/kl": 0.01, "seconds/round": 3.0}
    run = store.get_run(log_round.fn("demo", "demo", 1, metrics, {}, {}, {}))

    assert run.data.metrics == {"eval/chair_i": 0.2, "eval/pope_adversarial_f1": 0.7, "update/kl": 0.01,
                                "seconds/round": 3.0}
    assert [m.step for m in store.get_metric_history(parent["run_id"], "eval/chair_i")] == [1]  # the curve
    assert {summary_key(k): v for k, v in round_runs("demo")[1].data.metrics.items()} == metrics


def test_a_campaigns_experiment_gets_the_saved_rounds_view_with_headline_columns(tmp_path, store):
    import json

    from fisao.summary import runs_link
    from tasks.campaigns import open_campaign

    opened = open_campaign.fn("demo", {"data_md5": "m", "config_hash": "h", "config": {}, "resolved": {}}, {}, "lock")

    envelope = json.loads(store.get_experiment(opened["experiment_id"]).tags["mlflow.sharedViewState.fisao-rounds"])
    state = json.loads(envelope["state"])
    assert envelope["name"] == "fisao: rounds, headline metrics" and isinstance(envelope["createdAt"], int)
    assert state["searchFilter"] == "tags.`fisao.kind` = 'round'"
    assert state["selectedColumns"][:5] == ["attributes.`Dataset`", "attributes.`Models`", "params.`round`",
                                            "metrics.`eval/chair_i`", "metrics.`eval/chair_s`"]
    assert runs_link("3", "fisao-rounds").endswith("/#/experiments/3/runs?workflowType=machine_learning"
                                                   "&viewStateShareKey=fisao-rounds")
