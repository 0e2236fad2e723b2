"""Tasks: open and close a campaign's parent run in MLflow, refusing to mix input versions.

The parent run records the inputs the campaign started with (`inputs.json`: data md5, config
identity hash, the resolved config) and its state as tags: `fisao.status` (running, finished,
interrupted by Ctrl-C, failed), `fisao.target_rounds`, `fisao.rounds_done`, `fisao.lock` (the
lock file, so `fisao runs` can tell a live campaign from one that was killed).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient
from prefect import get_run_logger, task

from fisao import io
from fisao.inputs import changes
from tasks.mlflow_store import INPUTS, campaign_parent, experiment_id, recorded_inputs, runs_view_tag
from tasks.resume import ResumeMismatch
from tasks.tracking import log_batch, new_run


class InputsChanged(ResumeMismatch):
    """The data or the config differ from those the campaign was started with."""


def _write_inputs(client: MlflowClient, run_id: str, inputs: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        client.log_artifact(run_id, str(io.write_json(Path(tmp) / INPUTS, inputs)))


@task(name="open-campaign")
def open_campaign(campaign: str, inputs: dict, tags: dict, lock_file: str, allow_changed: bool = False,
                  started: float | None = None) -> dict:
    """The campaign's parent run, created or resumed; returns {"run_id", "resumed", "changes", "experiment_id"}.

    A new parent run starts at `started` (seconds since the epoch: when the campaign's flow began, so
    the world's preparation counts) and ends when `campaign_state` ends it.

    `inputs` is {"data_md5", "config_hash", "config": dotted identity, "resolved": full config}.
    Resuming with other inputs raises InputsChanged naming them, unless `allow_changed`.
    """
    log = get_run_logger()
    client = MlflowClient()
    client.set_experiment_tag(experiment_id(campaign), *runs_view_tag())  # the UI's rounds view (set anew: code may change it)
    state = {"fisao.status": "running", "fisao.lock": lock_file}
    parent = campaign_parent(campaign)
    if parent is None:
        run_id = new_run(campaign, campaign, {**tags, **state, "fisao.campaign": campaign, "fisao.kind": "campaign",
                                               "fisao.rounds_done": "0"},
                         None if started is None else int(started * 1000))
        log_batch(client, run_id, params=inputs["config"])
        _write_inputs(client, run_id, inputs)
        return {"run_id": run_id, "resumed": False, "changes": [], "experiment_id": experiment_id(campaign)}
    run_id = parent.info.run_id
    recorded = recorded_inputs(campaign)
    if recorded is None:
        log.warning("campaign %s (MLflow run %s) has no recorded inputs (its first start stopped before recording "
                    "them): recording the current ones, data md5 %s", campaign, run_id, inputs["data_md5"])
        _write_inputs(client, run_id, inputs)
        recorded = inputs
    diff = changes(recorded, inputs)
    if diff and not allow_changed:
        raise InputsChanged(
            campaign, None, f"it was started with other inputs (MLflow run {run_id}), and resuming would mix versions",
            f"Start a new campaign with another --run-name, or pass --allow-changed-data to continue {campaign!r} "
            f"on the new inputs (each round records its own). What changed:\n  " + "\n  ".join(diff))
    if diff:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        log.warning("campaign %s continues on changed inputs (--allow-changed-data):\n  %s", campaign, "\n  ".join(diff))
        client.set_tag(run_id, f"fisao.inputs_changed.{stamp}", "; ".join(diff)[:4000])
        _write_inputs(client, run_id, inputs)
    client.update_run(run_id, status="RUNNING")
    log_batch(client, run_id, tags={**state, "fisao.data_md5": inputs["data_md5"], "fisao.config_hash": inputs["config_hash"]})
    log.info("resuming campaign %s (MLflow run %s)", campaign, run_id)
    return {"run_id": run_id, "resumed": True, "changes": diff, "experiment_id": parent.info.experiment_id}


@task(name="campaign-state")
def campaign_state(run_id: str, tags: dict[str, str], end: str | None = None) -> None:
    """Set state tags on the parent run; `end` ("finished", "interrupted" or "failed") also ends the run."""
    client = MlflowClient()
    log_batch(client, run_id, tags={**tags, **({"fisao.status": end} if end else {})})
    if end:
        client.set_terminated(run_id, status={"finished": "FINISHED", "interrupted": "KILLED"}.get(end, "FAILED"))
