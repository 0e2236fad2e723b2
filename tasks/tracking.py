"""Tasks that write to MLflow (the sqlite store and artifacts inside the project).

Layout: one experiment per campaign config name; in it, one run per base-model build
(`build-clip`, `build-llava`) and one parent run per campaign (`fisao.campaign` tag) with a
nested run per round (round 0 = the base model) and the per-round curves on the parent.

Logging is idempotent: every run carries a `fisao.key` tag and is marked complete last; a
complete run with the same key is reused instead of logged twice (MLflow appends duplicate
metric points), and a curve point already present at a step is not logged again.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from prefect import get_run_logger, task

from fisao import io

COMPLETE = "fisao.complete"


def experiment_id(name: str) -> str:
    """The experiment called `name`, created with its artifacts under the project's mlartifacts/."""
    client = MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    project = Path(os.environ.get("FISAO_PROJECT", ".")).resolve()
    return client.create_experiment(name, artifact_location=(project / "mlartifacts" / name).as_uri())


def find_run(experiment: str, tags: dict[str, str]) -> str | None:
    """The id of a run of `experiment` carrying all `tags`, if any (the newest)."""
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = MlflowClient().search_runs([experiment_id(experiment)], filter_string=query, max_results=1,
                                      order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id if runs else None


def _log(client: MlflowClient, run_id: str, metrics: list[Metric] = (), params: dict | None = None,
         tags: dict | None = None) -> None:
    """log_batch within MLflow's limits (1000 metrics, 100 params per call)."""
    metrics = list(metrics)
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i : i + 1000])
    items = [Param(k, str(v)[:6000]) for k, v in (params or {}).items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])
    if tags:
        client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def _now() -> int:
    return int(time.time() * 1000)


def _new_run(experiment: str, name: str, tags: dict) -> str:
    return MlflowClient().create_run(experiment_id(experiment), run_name=name, tags=tags).info.run_id


@task(name="log-build")
def log_build(experiment: str, kind: str, ref: dict, params: dict, tags: dict) -> str:
    """Log one base-model build (params, curves, figures, the model directory); returns the run id."""
    log = get_run_logger()
    key = f"build-{kind}:{ref['sha256']}"
    existing = find_run(experiment, {"fisao.key": key, COMPLETE: "true"})
    if existing:
        log.info("MLflow already has build-%s (run %s): not logged again", kind, existing)
        return existing
    client = MlflowClient()
    run_id = _new_run(experiment, f"build-{kind}", {**tags, "fisao.key": key, "fisao.kind": f"build-{kind}",
                                                       "fisao.sha256": ref["sha256"]})
    train_log = io.read_json(Path(ref["path"]) / "train_log.json")
    ts = _now()
    curves = [Metric(f"train/{name}", float(v), ts, step)
              for name, values in train_log.items() if isinstance(values, list) for step, v in enumerate(values)]
    figures = [Metric(k, float(v), ts, 0) for k, v in ref["figures"].items()]
    _log(client, run_id, curves + figures, params)
    client.log_artifacts(run_id, ref["path"], artifact_path=kind)
    client.set_tag(run_id, COMPLETE, "true")
    client.set_terminated(run_id)
    log.info("logged build-%s to MLflow run %s", kind, run_id)
    return run_id


def campaign_run(experiment: str, campaign: str, tags: dict) -> str:
    """The parent run of `campaign` (created on first use)."""
    found = find_run(experiment, {"fisao.campaign": campaign, "fisao.kind": "campaign"})
    if found:
        return found
    return _new_run(experiment, campaign, {**tags, "fisao.campaign": campaign, "fisao.kind": "campaign"})


def _log_curve_points(client: MlflowClient, run_id: str, metrics: dict[str, float], step: int) -> None:
    """Per-round curves on the parent run, skipping points already logged at `step`."""
    ts = _now()
    fresh = [Metric(k, float(v), ts, step) for k, v in metrics.items()
             if not any(m.step == step for m in client.get_metric_history(run_id, k))]
    _log(client, run_id, fresh)


@task(name="log-round")
def log_round(experiment: str, campaign: str, round_index: int, metrics: dict, params: dict, tags: dict,
              artifacts: dict[str, str]) -> str:
    """Log round `round_index` of `campaign` as a nested run; returns its run id.

    `artifacts` maps an artifact folder name to a local directory or file to upload.
    """
    log = get_run_logger()
    client = MlflowClient()
    parent = campaign_run(experiment, campaign, tags)
    key = f"{campaign}:round-{round_index}"
    existing = find_run(experiment, {"fisao.key": key, COMPLETE: "true"})
    if existing is None:
        run_id = _new_run(experiment, f"round-{round_index}", {
            **tags, "mlflow.parentRunId": parent, "fisao.key": key, "fisao.kind": "round",
            "fisao.campaign": campaign, "fisao.round": str(round_index)})
        _log(client, run_id, [Metric(k, float(v), _now(), round_index) for k, v in metrics.items()], params)
        for name, path in artifacts.items():
            if Path(path).is_dir():
                client.log_artifacts(run_id, path, artifact_path=name)
            else:
                client.log_artifact(run_id, path, artifact_path=name)
        client.set_tag(run_id, COMPLETE, "true")
        client.set_terminated(run_id)
        log.info("logged round %d of %s to MLflow run %s", round_index, campaign, run_id)
    else:
        run_id = existing
        log.info("MLflow already has round %d of %s (run %s): not logged again", round_index, campaign, run_id)
    _log_curve_points(client, parent, metrics, round_index)
    return run_id
