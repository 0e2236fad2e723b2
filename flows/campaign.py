"""The campaign flow: world and base models, calibration, then FiSAO rounds, in one flow run.

Round 0 is the base model. Round k: rollouts with round k−1's policy -> verifier scores ->
PPO/LoRA update -> evaluation. One flow run per campaign (Prefect's ephemeral API costs seconds
per process); every step is a task whose cache key holds the hashes of its inputs, its config
section and the code version, so a second run skips finished work and says so.
"""
from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, get_run_logger

from fisao import io
from fisao.config import Config, load_config
from fisao.versioning import code_version, package_versions
from flows.steps import run_step
from tasks.align import calibrate, rollouts, score, update
from tasks.evaluate import evaluate
from tasks.models import build_clip, build_llava
from tasks.realdata import memory_check, real_models
from tasks.tracking import log_build, log_round
from tasks.world import prepare_world

# The world's base-model builds: the files they run (not the real-model parts of fisao/models/,
# such as eva_clip.py and known.py, whose changes must not rebuild the world's models).
MODEL_CODE = ("models/__init__.py", "models/build.py", "models/clip.py", "models/llava.py", "models/tokenizer.py",
              "models/images.py", "models/families.py", "world", "config.py", "coco.py", "io.py", "auroc.py",
              "generate.py")
EVAL_CODE = ("benchmarks", "evaluate.py", "generate.py", "coco.py", "config.py", "io.py", "world/pope.py",
             "runtime.py", "models/families.py")
ALIGN_CODE = ("align", "benchmarks", "models/clip.py", "generate.py", "coco.py", "config.py", "io.py", "auroc.py",
              "world/data.py", "examples.py", "runtime.py", "models/families.py", "models/eva_clip.py")


def build_base(cfg: Config, project: str) -> dict:
    """World, CLIP and LLaVA (cached), each build logged once to MLflow."""
    stages: dict[str, dict] = {}
    t = time.time()
    world = prepare_world(project, cfg.data_dir, cfg.world)
    stages["world"] = {"seconds": round(time.time() - t, 1), "cached": world["action"] == "verified"}
    outputs = str(Path(project) / cfg.outputs_dir)
    code = code_version(*MODEL_CODE)
    t = time.time()
    clip, cached = run_step(build_clip, world["path"], world["md5"], cfg.clip, code, outputs)
    stages["clip"] = {"seconds": round(time.time() - t, 1), "cached": cached}
    t = time.time()
    llava, cached = run_step(build_llava, world["path"], world["md5"], clip, cfg.llava, code, outputs)
    stages["llava"] = {"seconds": round(time.time() - t, 1), "cached": cached}
    tags = {"fisao.data_md5": world["md5"], "fisao.code": code, **{f"version.{k}": v for k, v in package_versions().items()}}
    log_build(cfg.name, "clip", clip, cfg.clip.model_dump(), tags)
    log_build(cfg.name, "llava", llava, {**cfg.llava.model_dump(), "clip_sha256": clip["sha256"]}, tags)
    return {"world": world, "clip": clip, "llava": llava, "stages": stages, "tags": tags}


def real_base(cfg: Config, project: str) -> dict:
    """Policy, verifier and COCO as the config names them (nothing built), after the memory check."""
    refs = real_models(cfg)
    memory_check(cfg, refs["policy"]["path"])
    tags = {"fisao.data_md5": refs["data"]["md5"], "fisao.policy": cfg.model.policy,
            **{f"version.{k}": v for k, v in package_versions().items()}}
    return {"world": refs["data"], "clip": refs["verifier"], "llava": refs["policy"], "stages": {}, "tags": tags}


def evaluate_round(cfg: Config, project: str, campaign_name: str, round_index: int, model: dict, world: dict,
                   tags: dict, stages: dict, extra_metrics: dict | None = None, artifacts: dict | None = None) -> dict:
    """Benchmarks of one round's model, logged with the round's other figures as its MLflow run."""
    t = time.time()
    result, cached = run_step(evaluate, model, world["path"], world["md5"], ("chair", "pope"), cfg.eval,
                              code_version(*EVAL_CODE), str(Path(project) / cfg.outputs_dir), runtime=cfg.model)
    stages[f"eval-{round_index}"] = {"seconds": round(time.time() - t, 1), "cached": cached}
    metrics = {**result["metrics"], **(extra_metrics or {})}
    params = {"model_path": model["path"], **{f"eval.{k}": v for k, v in cfg.eval.model_dump().items()}}
    if round_index:
        for section in ("rollout", "reward", "lora", "ppo"):
            params.update({f"{section}.{k}": v for k, v in getattr(cfg, section).model_dump().items()})
    log_round(cfg.name, campaign_name, round_index, metrics, params,
              {**tags, "fisao.model_sha256": model["sha256"]}, {"evaluation": result["path"], **(artifacts or {})})
    return {**result, "metrics": metrics}


def _timed(stages: dict, name: str, task, *args) -> dict:
    t = time.time()
    result, cached = run_step(task, *args)
    stages[name] = {"seconds": round(time.time() - t, 1), "cached": cached}
    return result


ROUND_FIGURES = {
    "rollouts": ("tokens", "tokens_per_second"),
    "score": ("reward_mean", "answer_reward_mean", "share_positive", "share_negative", "mentions",
              "rollout_hallucination_share", "verifier_agreement"),
    "update": ("kl", "loss", "policy_loss", "value_loss", "clipfrac", "approx_kl", "grad_norm"),
}


def fisao_round(cfg: Config, project: str, k: int, base: dict, policy: dict, previous: dict | None,
                calibration: dict) -> tuple[dict, dict, dict]:
    """Round k's rollouts, scores and update; returns (new policy, round figures, artifacts)."""
    outputs, code, world = str(Path(project) / cfg.outputs_dir), code_version(*ALIGN_CODE), base["world"]
    stages = base["stages"]
    rt, scale = cfg.model, cfg.scale
    samples = _timed(stages, f"rollouts-{k}", rollouts, policy, world["path"], world["md5"], cfg.rollout, k, code, outputs,
                     rt, scale.shards, scale.rollout_backend, scale.processes)
    scores = _timed(stages, f"score-{k}", score, samples, policy, base["clip"], calibration, world["path"],
                    world["md5"], cfg.reward, code, outputs, rt)
    new = _timed(stages, f"update-{k}", update, base["llava"], previous, samples, scores, world["path"], world["md5"],
                 cfg.lora, cfg.ppo, k, code, outputs, rt, scale.processes)
    figures = {}
    for stage, ref in (("rollouts", samples), ("score", scores), ("update", new)):
        figures.update({f"{stage}/{name}": ref["figures"][name] for name in ROUND_FIGURES[stage] if name in ref["figures"]})
    # What the stages took when they ran (a cached rerun reports the same figures).
    for stage, ref in (("rollouts", samples), ("score", scores), ("update", new)):
        figures[f"seconds/{stage}"] = ref["figures"]["seconds"]
    figures["seconds/round"] = round(sum(figures[f"seconds/{s}"] for s in ("rollouts", "score", "update")), 2)
    artifacts = {"adapter": new["adapter"], "rollouts": str(Path(scores["path"]) / "rewards.jsonl")}
    return new, figures, artifacts


@flow(name="fisao-campaign")
def campaign(config_path: str | None = None, project: str = ".", overrides: dict | None = None) -> dict:
    """Run the campaign described by `config_path` inside `project`; returns its summary."""
    t0 = time.time()
    cfg = load_config(config_path, overrides)
    log = get_run_logger()
    base = build_base(cfg, project) if cfg.model is None else real_base(cfg, project)
    log.info("base models ready: %s", base["llava"]["path"])
    world, stages = base["world"], base["stages"]
    rounds = [evaluate_round(cfg, project, cfg.name, 0, base["llava"], world, base["tags"], stages)["metrics"]]
    outputs = str(Path(project) / cfg.outputs_dir)
    cal = _timed(stages, "calibrate", calibrate, base["llava"], base["clip"], world["path"], world["md5"], cfg.reward,
                 cfg.rollout, code_version(*ALIGN_CODE), outputs, cfg.model)
    log.info("verifier calibration: AUROC %.3f, baseline %.4f, width %.4f", cal["figures"]["auroc"],
             cal["figures"]["baseline"], cal["figures"]["width"])
    policy, previous = base["llava"], None
    checkpoints = [base["llava"]["path"]]
    for k in range(1, cfg.ppo.rounds + 1):
        policy, figures, artifacts = fisao_round(cfg, project, k, base, policy, previous, cal)
        previous = policy
        artifacts["calibration"] = cal["path"]
        rounds.append(evaluate_round(cfg, project, cfg.name, k, policy, world, base["tags"], stages, figures,
                                     artifacts)["metrics"])
        checkpoints.append(policy["path"])
        log.info("round %d: CHAIR_i %.3f, recall %.3f", k, rounds[-1].get("chair_i", float("nan")),
                 rounds[-1].get("recall", float("nan")))
    summary = {"name": cfg.name, "config": cfg.model_dump(mode="json"), **base, "calibration": cal,
               "rounds": rounds, "checkpoints": checkpoints, "seconds": round(time.time() - t0, 1)}
    summary_path = Path(outputs) / "campaigns" / cfg.name / "summary.json"
    io.write_json(summary_path, summary)
    summary["summary_path"] = str(summary_path)
    return summary
