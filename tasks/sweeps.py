"""Tasks: a sweep's parent run in MLflow, and the tag that ties each campaign to its sweep.

Layout: an experiment named after the sweep holds one run (`fisao.kind = sweep`, `fisao.sweep =
NAME`) with the mean/std figures as metrics (at step = number of runs, so a sweep extended by
seeds keeps its earlier means as the curve's earlier points) and `sweep.json` as artifact. Each
campaign of the sweep stays in its own experiment; its parent run carries `fisao.sweep = NAME`,
`fisao.sweep_world` and `fisao.sweep_seed`, so `tags.fisao.sweep = 'NAME'` finds them all.
"""
from __future__ import annotations

from mlflow.tracking import MlflowClient
from prefect import get_run_logger, task

from tasks.mlflow_store import experiment_id, find_runs
from tasks.resume import ResumeMismatch, logged_campaign
from tasks.tracking import log_batch, log_curve_points, new_run


class SweepChanged(ResumeMismatch):
    """The sweep's name was used before with another config."""

    kind = "sweep"


def sweep_parent(sweep: str):
    """The parent run of sweep `sweep`, or None."""
    runs = find_runs(sweep, {"fisao.kind": "sweep", "fisao.sweep": sweep})
    return runs[0] if runs else None


@task(name="open-sweep")
def open_sweep(sweep: str, config_hash: str, params: dict, tags: dict) -> dict:
    """The sweep's parent run, created or resumed; returns {"run_id", "resumed", "experiment_id"}.

    A sweep keeps its config: resuming it with another one raises SweepChanged (its campaigns
    would refuse anyway, one by one). Worlds, seeds and rounds may change (tags, not params)."""
    client = MlflowClient()
    state = {**tags, "fisao.status": "running"}
    parent = sweep_parent(sweep)
    if parent is None:
        run_id = new_run(sweep, sweep, {**state, "fisao.kind": "sweep", "fisao.sweep": sweep,
                                        "fisao.config_hash": config_hash})
        log_batch(client, run_id, params=params)
        return {"run_id": run_id, "resumed": False, "experiment_id": experiment_id(sweep)}
    recorded = parent.data.tags.get("fisao.config_hash")
    if recorded != config_hash:
        raise SweepChanged(sweep, None, f"it was started with another config (MLflow run {parent.info.run_id}: config "
                                        f"hash {recorded}, now {config_hash})", "Give this one a new --name")
    client.update_run(parent.info.run_id, status="RUNNING")
    log_batch(client, parent.info.run_id, tags=state)
    get_run_logger().info("resuming sweep %s (MLflow run %s)", sweep, parent.info.run_id)
    return {"run_id": parent.info.run_id, "resumed": True, "experiment_id": parent.info.experiment_id}


@task(name="tag-campaign")
def tag_campaign(campaign: str, tags: dict[str, str]) -> None:
    """Tag the parent run of `campaign`, which has run (e.g. with the sweep it belongs to);
    CampaignNotLogged when MLflow lost it."""
    log_batch(MlflowClient(), logged_campaign(campaign).info.run_id, tags=tags)


@task(name="close-sweep")
def close_sweep(run_id: str, figures: dict[str, float], step: int, result_file: str, tags: dict[str, str],
                end: str = "finished") -> None:
    """Log the sweep's figures at `step` (points already there are kept) and its result file, then end
    the run as `end` ("finished", or "failed" when a campaign failed)."""
    client = MlflowClient()
    log_curve_points(client, run_id, figures, step)
    log_batch(client, run_id, tags={**tags, "fisao.status": end})
    client.log_artifact(run_id, result_file)
    client.set_terminated(run_id, status="FINISHED" if end == "finished" else "FAILED")
