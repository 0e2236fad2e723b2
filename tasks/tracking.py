"""Tasks that write to MLflow (the sqlite store and artifacts inside the project).

Logging is idempotent: every run carries a `fisao.key` tag, and a run whose key is already
logged and marked complete is found and reused instead of logged twice (MLflow would append
duplicate metric points).
"""
from __future__ import annotations

import os
from pathlib import Path

import mlflow
from mlflow.entities import Metric
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


def find_run(experiment: str, key: str) -> str | None:
    """The id of a completely logged run tagged with `key`, if any."""
    runs = MlflowClient().search_runs(
        [experiment_id(experiment)],
        filter_string=f"tags.`fisao.key` = '{key}' and tags.`{COMPLETE}` = 'true'",
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def log_curves(run_id: str, curves: dict[str, list[float]], prefix: str = "") -> None:
    """Each list as a metric over steps, in batches of MLflow's 1000-metric limit."""
    metrics = [Metric(f"{prefix}{name}", float(v), 0, step) for name, values in curves.items() for step, v in enumerate(values)]
    client = MlflowClient()
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i : i + 1000])


@task(name="log-build")
def log_build(experiment: str, kind: str, ref: dict, params: dict, tags: dict) -> str:
    """Log one base-model build (params, curves, figures, the model directory); returns the run id."""
    log = get_run_logger()
    key = f"{kind}:{ref['sha256']}"
    existing = find_run(experiment, key)
    if existing:
        log.info("MLflow already has build-%s (run %s): not logged again", kind, existing)
        return existing
    train_log = io.read_json(Path(ref["path"]) / "train_log.json")
    with mlflow.start_run(experiment_id=experiment_id(experiment), run_name=f"build-{kind}") as run:
        mlflow.set_tags({**tags, "fisao.key": key, "fisao.kind": f"build-{kind}", "fisao.sha256": ref["sha256"]})
        mlflow.log_params(params)
        log_curves(run.info.run_id, {k: v for k, v in train_log.items() if isinstance(v, list)}, prefix="train/")
        mlflow.log_metrics({k: float(v) for k, v in ref["figures"].items()})
        mlflow.log_artifacts(ref["path"], artifact_path=kind)
        mlflow.set_tag(COMPLETE, "true")
    log.info("logged build-%s to MLflow run %s", kind, run.info.run_id)
    return run.info.run_id
