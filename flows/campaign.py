"""The campaign flow: world and base models, calibration, then FiSAO rounds, in one flow run.

Round 0 is the base model: built from the shapes world, or, with a `model` section, the real
checkpoints it names (on COCO-layout data, after a memory check that refuses what cannot fit).
One flow run per campaign (Prefect's ephemeral API costs seconds per
process); every stage is a task that writes into a directory keyed on the hashes of its inputs
(the data md5 among them), its config section and the code version (tasks/common.py), so a second
run finds those directories complete and skips the work.

Running a campaign name again resumes it. Under the campaign's lock (one process per name), the
inputs are checked against those it started with (InputsChanged, a ResumeMismatch, says what
differs); what is finished, what is stale and what to redo is decided in tasks/resume.py: rounds
that MLflow holds as complete are verified against their manifests and taken as they are, a
damaged one is recomputed, and an unfinished round continues from its last finished stage (whose
directory is complete).
How many rounds: `rounds`, else `add_rounds` more than are done (a schedule's "one more round"),
else the config's `ppo.rounds`.

In Prefect's UI the flow run is named after the campaign (`demo`), each round it computes is a
subflow (`demo: round 3`, flows/rounds.py), both carry the tag `campaign:demo` (their task runs are
found under them: tasks/publish.py `flow_run_tags`), and the rounds table and the summary are
published as artifacts (tasks/publish.py). Each round's policy is
registered in MLflow's model registry as a version of the model named after the campaign, the
alias `best` on the lowest CHAIR_i (tasks/registry.py; `models:/demo@best`, `models:/demo/latest`).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.exceptions import TerminationSignal
from prefect.runtime import flow_run

from fisao import io
from fisao.config import Config, load_config
from fisao.inputs import config_identity_hash, identity
from fisao import localstate
from fisao.localstate import use_project
from fisao.locks import RunLock
from fisao.summary import headline, summary_markdown
from fisao.versioning import code_version, git_state, package_versions
from flows.rounds import (MODEL_CODE, align_context, evaluate_model, round_datasets, round_params, run_round,
                          timed)
from runner.ephemeral import servers_started_by, stop_orphaned
from tasks.align import calibrate
from tasks.campaigns import campaign_state, open_campaign
from tasks.models import build_clip, build_llava
from tasks.publish import flow_run_tags, publish_summary, run_tag, tag_this_flow_run
from tasks.realdata import memory_check, real_models
from tasks.refs import DataRef, ModelRef, StageContext
from tasks.mlflow_store import RUNS_VIEW, init_store, registered_name
from tasks.registry import register_round
from tasks.resume import rounds_done, take_round, target_rounds, verify_finished_rounds
from tasks.tracking import describe, evaluation_span, log_build, log_curve, log_round
from tasks.world import prepare_world


def campaign_dir(cfg: Config, project: str) -> Path:
    return localstate.campaign_dir(project, cfg.outputs_dir, cfg.name)


def build_base(cfg: Config, project: str, world: dict, tags: dict, t0: float, real: dict | None = None) -> dict:
    """CLIP and LLaVA (cached), each build logged once to MLflow; `real` (a policy and a verifier) as they are."""
    stages: dict[str, dict] = {}
    if real is not None:
        return {"world": world, "clip": real["verifier"], "llava": real["policy"], "stages": stages, "tags": tags}
    ctx = StageContext(code=code_version(*MODEL_CODE), outputs=str(Path(project) / cfg.outputs_dir))
    data = DataRef.of(world)
    clip = timed(stages, t0, "clip", build_clip, data=data, cfg=cfg.clip, ctx=ctx)
    llava = timed(stages, t0, "llava", build_llava, data=data, clip=ModelRef.of(clip), cfg=cfg.llava, ctx=ctx)
    log_build(cfg.name, "clip", clip, cfg.clip.model_dump(), tags, campaign=cfg.name)
    log_build(cfg.name, "llava", llava, {**cfg.llava.model_dump(), "clip_sha256": clip["sha256"]}, tags,
              campaign=cfg.name)
    return {"world": world, "clip": clip, "llava": llava, "stages": stages, "tags": tags}


def campaign_run_name() -> str:
    """The campaign flow run's name in Prefect's UI: the campaign's (`demo`), not two random words."""
    params = flow_run.parameters
    return params.get("run_name") or load_config(params.get("config_path"), params.get("overrides")).name


@flow(name="fisao-campaign", flow_run_name=campaign_run_name)
def campaign(config_path: str | None = None, project: str = ".", overrides: dict | None = None,
             run_name: str | None = None, rounds: int | None = None, add_rounds: int | None = None,
             allow_changed_data: bool = False) -> dict:
    """Run (or resume) the campaign described by `config_path` inside `project`; returns its summary."""
    t0 = time.time()
    project = str(Path(project).resolve())
    use_project(project)
    cfg = load_config(config_path, {**(overrides or {}), **({"name": run_name} if run_name else {})})
    lock = RunLock(campaign_dir(cfg, project) / ".lock", cfg.name)
    with lock:
        log = get_run_logger()
        if lock.took_over:
            log.warning("took over the lock of campaign %s from %s, which is no longer running", cfg.name,
                        lock.took_over.describe())
            for pid in stop_orphaned(lock.took_over.extra.get("prefect_servers", [])):
                log.warning("stopped the ephemeral Prefect server (pid %d) that the killed run left behind", pid)
        lock.annotate(prefect_servers=servers_started_by(os.getpid()))
        with flow_run_tags(run_tag("campaign", cfg.name)):  # this run and its round subflows
            tag_this_flow_run()
            return _run(cfg, project, t0, rounds, add_rounds, allow_changed_data, str(lock.path))


def _lineage_tags(cfg: Config, world: dict) -> dict[str, str]:
    commit, dirty = git_state()
    real = {} if cfg.model is None else {"fisao.policy": cfg.model.policy}
    return {"fisao.data_md5": world["md5"], "fisao.code": code_version(*MODEL_CODE),
            "fisao.git_commit": commit, "fisao.git_dirty": str(dirty).lower(),
            "fisao.config_hash": config_identity_hash(cfg), **real,
            **{f"version.{k}": v for k, v in package_versions().items()}}


def _run(cfg: Config, project: str, t0: float, rounds: int | None, add_rounds: int | None, allow_changed: bool,
         lock_file: str) -> dict:
    log = get_run_logger()
    init_store(project)
    stages: dict[str, dict] = {}
    world, real = timed_inputs(cfg, project, stages, t0)
    tags = _lineage_tags(cfg, world)
    inputs = {"data_md5": world["md5"], "config_hash": tags["fisao.config_hash"], "config": identity(cfg),
              "resolved": cfg.model_dump(mode="json")}
    parent = open_campaign(cfg.name, inputs, tags, lock_file, allow_changed, started=t0)
    try:
        finished = verify_finished_rounds(cfg.name) if parent["resumed"] else {}
        target = target_rounds(cfg, rounds_done(finished), rounds, add_rounds)
        campaign_state(parent["run_id"], {"fisao.target_rounds": str(target)})
        summary = _rounds(cfg, project, t0, stages, world, real, tags, finished, target)
        describe(parent["run_id"], f"{cfg.name}: {headline(summary['rounds'])}")
        campaign_state(parent["run_id"], {"fisao.rounds_done": str(target)}, end="finished")
    except BaseException as e:  # Ctrl-C and SIGTERM included: the campaign's run says how it ended, then the error goes on
        end = "interrupted" if isinstance(e, (KeyboardInterrupt, TerminationSignal)) else "failed"
        campaign_state(parent["run_id"], {"fisao.error": f"{type(e).__name__}: {e}"[:4000]}, end=end)
        raise
    log.info("campaign %s: %d rounds done (%d verified from an earlier run), summary %s", cfg.name, target,
             len(summary["resume"]["verified_rounds"]), summary["summary_path"])
    summary = {**summary, "mlflow": {"experiment_id": parent["experiment_id"], "run_id": parent["run_id"],
                                     "view": RUNS_VIEW}}
    publish_summary(cfg.name, summary_markdown(summary))
    return summary


def timed_inputs(cfg: Config, project: str, stages: dict, t0: float) -> tuple[dict, dict | None]:
    """(data, real models): the world (verified, pulled or built) and None; or, with a `model`
    section, the COCO directory's fingerprint and the policy and verifier refs, after the memory
    check (so a campaign that cannot fit stops before loading anything or opening an MLflow run)."""
    if cfg.model is not None:
        refs = real_models(cfg)
        memory_check(cfg, refs["policy"]["path"])
        return refs["data"], {"policy": refs["policy"], "verifier": refs["verifier"]}
    t = time.time()
    world = prepare_world(project, cfg.data_dir, cfg.world)
    stages["world"] = {"seconds": round(time.time() - t, 1), "cached": world["action"] == "verified", "start": 0.0}
    return world, None


def _rounds(cfg: Config, project: str, t0: float, stages: dict, world: dict, real: dict | None, tags: dict,
            finished: dict, target: int) -> dict:
    log = get_run_logger()
    out_dir = str(campaign_dir(cfg, project))
    base = build_base(cfg, project, world, tags, t0, real)
    base["stages"] = stages = {**stages, **base["stages"]}
    llava = base["llava"]
    evaluation = evaluate_model(cfg, project, 0, llava, world, stages, t0)
    metrics = [evaluation["metrics"]]
    record_base = {**tags, "fisao.model_sha256": llava["sha256"], "fisao.model_path": llava["path"]}
    log_round(experiment=cfg.name, campaign=cfg.name, round_index=0, metrics=metrics[0],
              params=round_params(cfg, llava, 0), tags=record_base, artifacts={"evaluation": evaluation["path"]},
              span=evaluation_span(evaluation["path"]), datasets=round_datasets(cfg, world, metrics[0]))
    cal = timed(stages, t0, "calibrate", calibrate, policy=ModelRef.of(llava), verifier=ModelRef.of(base["clip"]),
                data=DataRef.of(world), reward=cfg.reward, rollout=cfg.rollout,
                ctx=align_context(cfg, str(Path(project) / cfg.outputs_dir)))
    log.info("verifier calibration: AUROC %.3f, baseline %.4f, width %.4f", cal["figures"]["auroc"],
             cal["figures"]["baseline"], cal["figures"]["width"])
    policy, previous, checkpoints, verified = llava, None, [llava["path"]], []
    versions, registered = {}, {"aliases": {}}
    for k in range(1, target + 1):
        done = take_round(finished, k, policy["sha256"])
        if done:
            policy = previous = done["policy"]
            metrics.append(done["metrics"])
            log_curve(cfg.name, done["metrics"], k)
            stages[f"round-{k}"] = {"seconds": 0.0, "cached": True, "start": round(time.time() - t0, 1)}
            verified.append(k)
            log.info("round %d: verified against its manifest, taken from MLflow run %s", k, done["run_id"])
        else:
            done = run_round(cfg, project, k, base, policy, previous, cal, metrics, tags, t0)
            metrics.append(done["metrics"])
            policy = previous = done["policy"]
        checkpoints.append(policy["path"])
        registered = register_round(cfg.name, k, policy)
        versions[str(k)] = registered["version"]
        log.info("round %d: CHAIR_i %.3f, recall %.3f", k, metrics[-1].get("chair_i", float("nan")),
                 metrics[-1].get("recall", float("nan")))
    new_starts = [s["start"] for s in stages.values() if not s["cached"] and "start" in s]
    summary = {"name": cfg.name, "config": cfg.model_dump(mode="json"), **base, "calibration": cal, "rounds": metrics,
               "checkpoints": checkpoints, "seconds": round(time.time() - t0, 1),
               "registry": {"name": registered_name(cfg.name), "versions": versions, "aliases": registered["aliases"]},
               "resume": {"verified_rounds": verified, "flow_started_at": t0,
                          "first_new_stage_at": min(new_starts) if new_starts else None}}
    summary_path = Path(out_dir) / "summary.json"
    io.write_json(summary_path, summary)
    summary["summary_path"] = str(summary_path)
    return summary
