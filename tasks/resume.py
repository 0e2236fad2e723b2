"""What a resumed campaign takes as finished, what is stale, and what it redoes: decided here only.

Running a campaign name again resumes it (flows/campaign.py). The questions, in the order a
resume asks them:

1. What to run: `fisao resume NAME` runs the config the campaign started with, to the round
   target it last had (`recorded_campaign`).
2. What is finished (`verify_finished_rounds`): a round whose MLflow run is complete
   (tasks.mlflow_store.round_runs) and whose files are still, byte for byte, those its manifest
   lists (`write_manifest` wrote it when the round completed). A file that is missing, truncated
   or modified is reported by name and the directory its stage wrote is removed
   (`remove_stage_dirs`), so the round is recomputed (a stage whose directory is gone builds it
   again) instead of loading a damaged checkpoint.
3. How many rounds are done, and to which round to go (`rounds_done`, `target_rounds`).
4. What to redo (`take_round`): a finished round is taken as it is only when it was trained from
   the checkpoint the campaign has now; any other round runs, its stages whose directories are
   complete as cache hits. A round so recomputed that trains the checkpoint its complete run
   records keeps that run, and that run's lineage on disk (`restore_recorded_lineage`).
5. What is stale in MLflow, deleted before a round is logged or registered again: runs of the
   round a crash left incomplete and complete runs of another checkpoint (`drop_stale_round_runs`,
   called by tasks.tracking.log_round), and logged models a crash left unfinished
   (`drop_unfinished_models`, called by tasks.registry).

When what MLflow or the disk holds disagrees with what a resume needs, the error is a
ResumeMismatch (a ValueError) that names the campaign, the round, what disagrees and what to do;
"this name was started with other inputs" is one too (tasks.campaigns.InputsChanged,
tasks.sweeps.SweepChanged), so a caller catches one error for all of them.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import ClassVar

import mlflow
from mlflow.entities import LoggedModel, LoggedModelStatus, Run
from mlflow.tracking import MlflowClient
from prefect import get_run_logger, task

from fisao import io
from fisao.config import Config
from fisao.manifest import build_manifest, group_digest, verify_manifest
from tasks.mlflow_store import (COMPLETE, MANIFEST, SHA256, campaign_parent, download, find_runs, has_artifact,
                                read_json_artifact, recorded_inputs, round_runs, summary_key)


class ResumeMismatch(ValueError):
    """What MLflow or the disk holds about a campaign (or a sweep: `kind`) disagrees with what
    resuming it needs.

    Carries the name (`campaign`), the round (None: the campaign as a whole), what disagrees and the
    fix; the message's first line says all four."""

    kind: ClassVar[str] = "campaign"

    def __init__(self, campaign: str, round_index: int | None, what: str, fix: str):
        self.campaign, self.round, self.what, self.fix = campaign, round_index, what, fix
        where = f"{self.kind} {campaign!r}"
        where = where if round_index is None else f"round {round_index} of {where}"
        super().__init__(f"{where}: {what}. {fix}")


class UnknownCampaign(ResumeMismatch):
    """`fisao resume NAME` of a campaign that MLflow does not hold."""


class CampaignNotLogged(ResumeMismatch):
    """A campaign that has run (or is running) has no parent run in MLflow."""


class ManifestDisagrees(ResumeMismatch):
    """A complete round's manifest lists another checkpoint than its MLflow run says it trained."""


class RoundNotLogged(ResumeMismatch):
    """A round's checkpoint is to be registered, but MLflow holds no complete run of it."""


def _store() -> str:
    return mlflow.get_tracking_uri()


def recorded_campaign(campaign: str) -> dict:
    """What `fisao resume NAME` runs: {"config": the resolved config the campaign started with,
    "target_rounds": the round target it last had (else that config's ppo.rounds)}."""
    inputs = recorded_inputs(campaign)
    if inputs is None:
        raise UnknownCampaign(campaign, None, f"MLflow ({_store()}) holds no such campaign, or none that recorded "
                                              f"the config it started with",
                              f"Start it with `fisao run --config CONFIG --run-name {campaign}`, or list the "
                              f"campaigns with `fisao runs`")
    target = logged_campaign(campaign).data.tags.get("fisao.target_rounds", inputs["resolved"]["ppo"]["rounds"])
    return {"config": inputs["resolved"], "target_rounds": int(target)}


def logged_campaign(campaign: str) -> Run:
    """The parent run of a campaign that has run (tasks.campaigns.open_campaign opens it first)."""
    parent = campaign_parent(campaign)
    if parent is None:
        raise CampaignNotLogged(campaign, None, f"MLflow ({_store()}) holds no parent run of it (was it deleted "
                                                f"there while the campaign ran?)",
                                f"Run the campaign again (`fisao run --run-name {campaign}`, or the same "
                                f"`fisao sweep` command): its parent run is opened anew and its finished stages "
                                f"are cache hits")
    return parent


@task(name="write-manifest")
def write_manifest(groups: dict[str, list[str] | str], path: str) -> dict:
    """sha256 of every file of a round's artifacts (name -> root or [root, stage dir]), written to `path`."""
    manifest = build_manifest({k: tuple(v) if isinstance(v, list) else v for k, v in groups.items()})
    io.write_json(path, manifest)
    return manifest


LINEAGE = "lineage/lineage.json"  # a round run's record of what trained its checkpoint (flows/rounds.py)


@task(name="recorded-lineage")
def restore_recorded_lineage(campaign: str, k: int, model_sha256: str, path: str) -> bool:
    """Write the lineage that MLflow's complete run of round k recorded for checkpoint
    `model_sha256` to `path`, and return True; False when MLflow holds no such run (the caller
    writes a new lineage).

    A round recomputed from cached stages (e.g. after a code change rebuilt the base models to the
    same bytes) trained the checkpoint its run already records: that run is kept, not logged
    again (tasks.tracking.log_round), so the round's files on disk must stay those of its manifest.
    A new lineage.json, naming the code version of the recomputation, would not be, and every
    later resume would find the round "modified" and recompute it again.
    """
    try:
        run = logged_round(campaign, k, model_sha256)
    except RoundNotLogged:
        return False
    if not has_artifact(run.info.run_id, LINEAGE):
        return False
    with tempfile.TemporaryDirectory() as tmp:
        recorded = download(run.info.run_id, LINEAGE, tmp)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(recorded, path)
    get_run_logger().info("round %d of %s: its checkpoint is MLflow run %s's; the run's lineage is kept", k, campaign,
                          run.info.run_id)
    return True


@task(name="verify-rounds")
def verify_finished_rounds(campaign: str) -> dict[str, dict]:
    """Round (as a string) -> {"ok", "run_id", "metrics", "parent_sha256", "model_sha256", "policy"}
    for each complete round k > 0 of `campaign`.

    Damaged rounds come back with "ok": False (and no "policy") after their damaged stage
    directories were removed; a round whose manifest is gone from the artifact store comes back as
    {"ok": False, "run_id"}. ManifestDisagrees when an intact manifest lists another checkpoint
    than its run's tag.
    """
    return {str(k): _verify_round(campaign, k, run) for k, run in round_runs(campaign).items() if k > 0}


def _verify_round(campaign: str, k: int, run: Run) -> dict:
    log, run_id, tags = get_run_logger(), run.info.run_id, run.data.tags
    if not has_artifact(run_id, MANIFEST):
        log.warning("round %d of %s (MLflow run %s) has lost its manifest from the artifact store: it is "
                    "recomputed from the cache and logged again", k, campaign, run_id)
        return {"ok": False, "run_id": run_id}
    manifest = read_json_artifact(run_id, MANIFEST)
    problems = verify_manifest(manifest)
    entry = {"ok": not problems, "run_id": run_id,
             "metrics": {summary_key(key): v for key, v in run.data.metrics.items()},  # as summary.json names them
             "parent_sha256": tags.get("fisao.parent_sha256"), "model_sha256": tags.get(SHA256)}
    if problems:
        log.warning("round %d of %s (MLflow run %s) is damaged on disk, so it is recomputed, not loaded:\n  %s",
                    k, campaign, run_id, "\n  ".join(p.describe() for p in problems[:10]))
        remove_stage_dirs(sorted({p.stage_dir for p in problems}))
        return entry
    return {**entry, "policy": manifest_policy(campaign, k, run, manifest)}


def manifest_policy(campaign: str, k: int, run: Run, manifest: dict) -> dict:
    """The checkpoint ref ({"path", "sha256", "adapter"}) that round k's intact manifest lists;
    ManifestDisagrees unless it is the checkpoint the round's run names (`fisao.model_sha256`)."""
    groups, run_id, tagged = manifest["groups"], run.info.run_id, run.data.tags.get(SHA256)
    fix = (f"Delete MLflow run {run_id} (in the MLflow UI, or `mlflow runs delete --run-id {run_id}`) and resume "
           f"the campaign: round {k} is then recomputed from the cache and logged again")
    if "model" not in groups or "adapter" not in groups:
        raise ManifestDisagrees(campaign, k, f"the manifest of MLflow run {run_id} lists no "
                                             f"{'model' if 'model' not in groups else 'adapter'}", fix)
    model, adapter = groups["model"], groups["adapter"]
    policy = {"path": model["root"], "sha256": group_digest(model), "adapter": adapter["root"]}
    if policy["sha256"] != tagged:
        raise ManifestDisagrees(campaign, k, f"MLflow run {run_id} says it trained checkpoint sha256 {tagged}, but "
                                             f"its manifest lists {model['root']} with sha256 {policy['sha256']}", fix)
    return policy


def remove_stage_dirs(stage_dirs: list[str]) -> None:
    """Remove the stage outputs a damaged round named (directories, or a file written as one unit),
    so the stages that wrote them run again from their cached inputs."""
    log = get_run_logger()
    for stage_dir in stage_dirs:
        path = Path(stage_dir)
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        log.warning("removed %s (it is rebuilt from its inputs)", stage_dir)


def rounds_done(finished: dict[str, dict]) -> int:
    """How many rounds in a row, from round 1, MLflow holds as complete (`verify_finished_rounds`'s
    answer; a damaged one counts, it is recomputed on the way): the campaign goes on after them."""
    return next(k for k in range(1, len(finished) + 2) if str(k) not in finished) - 1


def target_rounds(cfg: Config, done: int, rounds: int | None, add_rounds: int | None) -> int:
    """The round to reach: `rounds` (a total), else `add_rounds` more than `done`, else the config's ppo.rounds."""
    if rounds is not None and add_rounds is not None:
        raise ValueError("give either rounds (a total) or add_rounds (more than are done), not both")
    for key, value in (("rounds", rounds), ("add_rounds", add_rounds)):
        if value is not None and value < 0:  # a deployment's parameters do not pass the command line's check
            raise ValueError(f"{key} must be a whole number >= 0, got {value}")
    if add_rounds is not None:
        return done + add_rounds
    return rounds if rounds is not None else cfg.ppo.rounds


def take_round(finished: dict[str, dict], k: int, parent_sha256: str) -> dict | None:
    """Round k as verified from an earlier run when it can be taken as it is: intact, and trained from
    checkpoint `parent_sha256` (the one the campaign has now). None: round k runs (again)."""
    done = finished.get(str(k))
    return done if done and done["ok"] and done["parent_sha256"] == parent_sha256 else None


def round_key(campaign: str, k: int) -> str:
    """The `fisao.key` tag that every MLflow run of round k of `campaign` carries."""
    return f"{campaign}:round-{k}"


def stale_runs(runs: list[Run], model_sha256: str | None) -> tuple[str | None, list[str]]:
    """(complete run to keep, runs to delete) among the runs logged under one key, newest first.

    The newest complete run is kept when it describes checkpoint `model_sha256` (None: any); runs a
    crash left incomplete, complete runs of another checkpoint (a recomputed round that came out
    different) and older duplicates go.
    """
    keep, stale = None, []
    for run in runs:
        same = model_sha256 is None or run.data.tags.get(SHA256) == model_sha256
        if keep is None and run.data.tags.get(COMPLETE) == "true" and same:
            keep = run.info.run_id
        else:
            stale.append(run.info.run_id)
    return keep, stale


def drop_stale_round_runs(experiment: str, campaign: str, k: int, model_sha256: str | None) -> str | None:
    """Delete the stale runs of round k of `campaign` (`stale_runs`); returns the complete run to keep, if any."""
    log, client = get_run_logger(), MlflowClient()
    keep, stale = stale_runs(find_runs(experiment, {"fisao.key": round_key(campaign, k)}), model_sha256)
    for run_id in stale:
        log.warning("MLflow run %s of round %d of %s was left incomplete by an interrupted run (or describes another "
                    "checkpoint): deleted, the round is logged again", run_id, k, campaign)
        client.delete_run(run_id)
    return keep


def drop_unfinished_models(client: MlflowClient, models: list[LoggedModel], campaign: str, k: int) -> None:
    """Delete the logged models of round k that a crash left unfinished (status not READY): logged again."""
    for model in models:
        if model.status != LoggedModelStatus.READY:
            get_run_logger().warning("logged model %s of round %d of %s was left unfinished by an interrupted run: "
                                     "deleted, logged again", model.model_id, k, campaign)
            client.delete_logged_model(model.model_id)


def logged_round(campaign: str, k: int, sha256: str) -> Run:
    """The complete MLflow run of round k of `campaign` that trained checkpoint `sha256` (the run a
    round's logged model and registered version hang on); RoundNotLogged when there is none."""
    run = round_runs(campaign).get(k)
    if run is not None and run.data.tags.get(SHA256) == sha256:
        return run
    what = ("MLflow holds no complete run of it" if run is None else
            f"its complete MLflow run {run.info.run_id} trained checkpoint sha256 {run.data.tags.get(SHA256)}")
    raise RoundNotLogged(campaign, k, f"{what}, so its checkpoint sha256 {sha256} cannot be registered",
                         f"Resume the campaign (`fisao resume {campaign}`): round {k} is logged again, then registered")
