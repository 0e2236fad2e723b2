"""Tasks that write to MLflow (the sqlite store and artifacts inside the project).

Layout: one experiment per campaign config name; in it, one run per base-model build
(`build-clip`, `build-llava`) and one parent run per campaign (`fisao.campaign` tag) with a
nested run per round (round 0 = the base model) and the per-round curves on the parent.

Logging is idempotent: every run carries a `fisao.key` tag and is marked complete last; a
complete run with the same key is reused instead of logged twice (MLflow appends duplicate
metric points), and a curve point already present at a step is not logged again. A round is
marked complete only after its artifacts were logged and the logged copies verified against the
round's manifest; a run that a crash left unmarked is deleted when the round is logged again
(tasks/resume.py decides which runs are stale), so MLflow never shows a round twice.

Every run spans the work it records, not the moment it was logged: a stage's output directory is
complete when its marker file is written (last), and the stage records how many seconds it took,
so the work ran from (marker's mtime - seconds) to the marker's mtime (`span_of`). That holds
for work done by an earlier process too (a cached build logged into another campaign's
experiment, a round logged again after a crash).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from mlflow.data.sources import LocalArtifactDatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
from mlflow.tracking import MlflowClient
from prefect import get_run_logger, task

from fisao import io
from fisao.align.files import FIGURES
from fisao.crashpoints import crash_point
from fisao.manifest import verify_files
from fisao.models.files import TRAIN_LOG
from tasks.evaluate import METRICS, TIMING
from tasks.mlflow_store import COMPLETE, MANIFEST, experiment_id, find_run, mlflow_key
from tasks.resume import drop_stale_round_runs, logged_campaign, round_key


def log_batch(client: MlflowClient, run_id: str, metrics: list[Metric] = (), params: dict | None = None,
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


def new_run(experiment: str, name: str, tags: dict, start_ms: int | None = None) -> str:
    """A new run of `experiment`; `start_ms` (ms since the epoch) is when its work began (default: now)."""
    return MlflowClient().create_run(experiment_id(experiment), start_time=start_ms, run_name=name,
                                     tags=tags).info.run_id


def span_of(directory: str | Path, marker: str, seconds: float | None) -> tuple[int, int]:
    """(start, end) in ms of the work that wrote `directory`: it ended when its `marker` file (written
    last) was written and began `seconds` earlier (at the end, when the work recorded no seconds)."""
    end = Path(directory, marker).stat().st_mtime
    return int((end - (seconds or 0.0)) * 1000), int(end * 1000)


def covering(*spans: tuple[int, int]) -> tuple[int, int]:
    """The span from the earliest start to the latest end of `spans`."""
    return min(s for s, _ in spans), max(e for _, e in spans)


def evaluation_span(path: str | Path) -> tuple[int, int]:
    """The span of an evaluation's output directory (tasks/evaluate.py records its seconds in TIMING;
    directories written before it did count from their end only)."""
    timing = Path(path) / TIMING
    return span_of(path, METRICS, io.read_json(timing)["seconds"] if timing.is_file() else None)


def round_span(rollouts: dict, scores: dict, model: dict, evaluation: dict) -> tuple[int, int]:
    """A FiSAO round's span: from its rollouts' start to the end of its last stage (the evaluation)."""
    stages = [(rollouts["path"], rollouts), (scores["path"], scores), (Path(model["path"]).parent, model)]
    return covering(*(span_of(path, FIGURES, ref["figures"].get("seconds")) for path, ref in stages),
                    evaluation_span(evaluation["path"]))


@task(name="log-build")
def log_build(experiment: str, kind: str, ref: dict, params: dict, tags: dict, campaign: str | None = None) -> str:
    """Log one base-model build (params, curves, figures, the model directory); returns the run id.

    With `campaign`, the run is nested under the campaign's parent run and tagged `fisao.campaign`:
    each campaign logs the builds it used into its own experiment (a build shared on disk by two
    campaigns gets a run in each), so nesting is always possible and the campaign's view shows what
    it was built from.
    """
    log = get_run_logger()
    key = f"build-{kind}:{ref['sha256']}"
    existing = find_run(experiment, {"fisao.key": key, COMPLETE: "true"})
    if existing:
        log.info("MLflow already has build-%s (run %s): not logged again", kind, existing)
        return existing
    client = MlflowClient()
    start, end = span_of(ref["path"], TRAIN_LOG, ref["figures"].get("seconds"))
    group = {} if campaign is None else {"mlflow.parentRunId": campaign_run(campaign), "fisao.campaign": campaign}
    run_id = new_run(experiment, f"build-{kind}", {**tags, **group, "fisao.key": key, "fisao.kind": f"build-{kind}",
                                                       "fisao.sha256": ref["sha256"]}, start)
    train_log = io.read_json(Path(ref["path"]) / "train_log.json")
    ts = _now()
    curves = [Metric(f"train/{name}", float(v), ts, step)
              for name, values in train_log.items() if isinstance(values, list) for step, v in enumerate(values)]
    figures = [Metric(k, float(v), ts, 0) for k, v in ref["figures"].items()]
    log_batch(client, run_id, curves + figures, params)
    client.log_artifacts(run_id, ref["path"], artifact_path=kind)
    client.set_tag(run_id, COMPLETE, "true")
    client.set_terminated(run_id, end_time=end)
    log.info("logged build-%s to MLflow run %s", kind, run_id)
    return run_id


def campaign_run(campaign: str) -> str:
    """The id of the parent run of `campaign` (tasks.campaigns.open_campaign creates it; CampaignNotLogged
    when MLflow lost it)."""
    return logged_campaign(campaign).info.run_id


def log_curve_points(client: MlflowClient, run_id: str, metrics: dict[str, float], step: int) -> None:
    """Per-round curves on the parent run (named as `mlflow_key` names them), skipping points already
    logged at `step`."""
    ts = _now()
    fresh = [Metric(mlflow_key(k), float(v), ts, step) for k, v in metrics.items()
             if not any(m.step == step for m in client.get_metric_history(run_id, mlflow_key(k)))]
    log_batch(client, run_id, fresh)


def _log_artifacts(client: MlflowClient, run_id: str, artifacts: dict[str, str]) -> None:
    for name, path in artifacts.items():
        if Path(path).is_dir():
            client.log_artifacts(run_id, path, artifact_path=name)
        else:
            client.log_artifact(run_id, path, artifact_path=name)


def verify_logged(run_id: str, manifest: dict, names) -> list[str]:
    """Download the run's copies of the artifacts `names` and compare them with the manifest."""
    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            local = Path(MlflowClient().download_artifacts(run_id, name, tmp))
            problems += [p.describe() for p in verify_files(manifest["groups"][name], local, name)]
    return problems


def log_datasets(client: MlflowClient, run_id: str, datasets: list[dict]) -> None:
    """The data a run used as MLflow dataset inputs (the runs table's Dataset column): each
    {"path": the world or COCO directory, "md5": its DVC md5 (the digest), "split", "images": how many
    it used, "context": "training" or "evaluation"}, named after the directory and the split."""
    inputs = []
    for d in datasets:
        dataset = MetaDataset(LocalArtifactDatasetSource(str(d["path"])), name=f"{Path(d['path']).name}-{d['split']}",
                              digest=d["md5"])
        tags = {MLFLOW_DATASET_CONTEXT: d["context"], "split": d["split"],
                **({} if d.get("images") is None else {"images": str(int(d["images"]))})}
        inputs.append(DatasetInput(dataset._to_mlflow_entity(), [InputTag(k, v) for k, v in tags.items()]))
    client.log_inputs(run_id, datasets=inputs)


@task(name="log-round")
def log_round(experiment: str, campaign: str, round_index: int, metrics: dict, params: dict, tags: dict,
              artifacts: dict[str, str], manifest: dict | None = None, span: tuple[int, int] | None = None,
              datasets: list[dict] = ()) -> str:
    """Log round `round_index` of `campaign` as a nested run; returns its run id.

    `artifacts` maps an artifact folder name to a local directory or file to upload; `manifest`
    (fisao.manifest) lists their files: it is logged too, and the run is marked complete only
    when the logged copies match it. `span` (start, end in ms) is when the round's work ran
    (`round_span`, `evaluation_span`); without it the run spans its logging. `datasets`: the data
    the round used (`log_datasets`).
    """
    log = get_run_logger()
    start, end = span if span is not None else (None, None)
    client = MlflowClient()
    parent = campaign_run(campaign)
    key = round_key(campaign, round_index)
    run_id = drop_stale_round_runs(experiment, campaign, round_index, tags.get("fisao.model_sha256"))
    if run_id is None:
        run_id = new_run(experiment, f"round-{round_index}", {
            **tags, "mlflow.parentRunId": parent, "fisao.key": key, "fisao.kind": "round",
            "fisao.campaign": campaign, "fisao.round": str(round_index),
            "fisao.baseline": str(round_index == 0).lower(), COMPLETE: "false"}, start)
        log_batch(client, run_id, [Metric(mlflow_key(k), float(v), _now(), round_index) for k, v in metrics.items()],
                  params)
        log_datasets(client, run_id, list(datasets))
        items = list(artifacts.items())
        _log_artifacts(client, run_id, dict(items[: len(items) // 2]))
        crash_point("log:mid", round_index)  # the testing hook: metrics and half the artifacts logged
        _log_artifacts(client, run_id, dict(items[len(items) // 2 :]))
        if manifest is not None:
            with tempfile.TemporaryDirectory() as tmp:
                client.log_artifact(run_id, str(io.write_json(Path(tmp) / MANIFEST, manifest)))
            problems = verify_logged(run_id, manifest, [n for n in artifacts if n in manifest["groups"]])
            if problems:
                raise RuntimeError(f"MLflow run {run_id} (round {round_index} of {campaign}) does not hold what was "
                                   f"logged: {'; '.join(problems[:5])}. The round stays incomplete; run it again")
            client.set_tag(run_id, "fisao.manifest", "true")
        client.set_tag(run_id, COMPLETE, "true")
        client.set_terminated(run_id, end_time=end)
        log.info("logged round %d of %s to MLflow run %s", round_index, campaign, run_id)
    else:
        log.info("MLflow already has round %d of %s (run %s): not logged again", round_index, campaign, run_id)
    log_curve_points(client, parent, metrics, round_index)
    return run_id


NOTE = "mlflow.note.content"  # what MLflow's UI shows as a run's or an experiment's description


@task(name="describe")
def describe(run_id: str, text: str) -> None:
    """Make `text` the description of the run and of its experiment (one experiment per campaign or sweep)."""
    client = MlflowClient()
    client.set_tag(run_id, NOTE, text)
    client.set_experiment_tag(client.get_run(run_id).info.experiment_id, NOTE, text)


@task(name="log-curve")
def log_curve(campaign: str, metrics: dict, round_index: int) -> None:
    """Round `round_index`'s point of the per-round curves on the campaign's parent run (once per step)."""
    log_curve_points(MlflowClient(), campaign_run(campaign), metrics, round_index)


@task(name="log-evaluation")
def log_checkpoint_eval(experiment: str, model: dict, data_md5: str, result: dict, params: dict) -> str:
    """One MLflow run per (checkpoint, data, eval settings), reused when it exists."""
    key = f"eval:{model['sha256']}:{data_md5}:{result['path']}"
    existing = find_run(experiment, {"fisao.key": key, COMPLETE: "true"})
    if existing:
        return existing
    client = MlflowClient()
    start, end = evaluation_span(result["path"])
    run_id = new_run(experiment, f"eval-{Path(model['path']).name}", {
        "fisao.key": key, "fisao.kind": "evaluation", "fisao.model_sha256": model["sha256"],
        "fisao.model_path": model["path"], "fisao.data_md5": data_md5}, start)
    log_batch(client, run_id, [Metric(mlflow_key(k), float(v), _now(), 0) for k, v in result["metrics"].items()], params)
    client.log_artifacts(run_id, result["path"], artifact_path="evaluation")
    client.set_tag(run_id, COMPLETE, "true")
    client.set_terminated(run_id, end_time=end)
    return run_id
