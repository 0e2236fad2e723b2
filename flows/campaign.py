"""The campaign flow: world and base models, then their evaluation, in one flow run.

One flow run per campaign (Prefect's ephemeral API costs seconds per process); every step is
a task whose cache key holds the data md5, its config section and the code version, so a second
run skips finished work and says so.
"""
from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, get_run_logger

from fisao.config import Config, load_config
from fisao.versioning import code_version, package_versions
from flows.steps import run_step
from tasks.evaluate import evaluate
from tasks.models import build_clip, build_llava
from tasks.tracking import log_build, log_round
from tasks.world import prepare_world

MODEL_CODE = ("models", "world", "config.py", "coco.py", "io.py", "auroc.py", "generate.py")
EVAL_CODE = ("benchmarks", "evaluate.py", "generate.py", "coco.py", "config.py", "io.py", "world/pope.py")


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


def evaluate_round(cfg: Config, project: str, campaign_name: str, round_index: int, model: dict, world: dict,
                   tags: dict, stages: dict) -> dict:
    """Benchmarks of one round's model, logged as that round's MLflow run."""
    t = time.time()
    result, cached = run_step(evaluate, model, world["path"], world["md5"], ("chair", "pope"), cfg.eval,
                              code_version(*EVAL_CODE), str(Path(project) / cfg.outputs_dir))
    stages[f"eval-{round_index}"] = {"seconds": round(time.time() - t, 1), "cached": cached}
    log_round(cfg.name, campaign_name, round_index, result["metrics"],
              {"model_path": model["path"], **{f"eval.{k}": v for k, v in cfg.eval.model_dump().items()}},
              {**tags, "fisao.model_sha256": model["sha256"]}, {"evaluation": result["path"]})
    return result


@flow(name="fisao-campaign")
def campaign(config_path: str | None = None, project: str = ".", overrides: dict | None = None) -> dict:
    """Run the campaign described by `config_path` inside `project`; returns its summary."""
    cfg = load_config(config_path, overrides)
    base = build_base(cfg, project)
    get_run_logger().info("base models ready: %s", base["llava"]["path"])
    rounds = [evaluate_round(cfg, project, cfg.name, 0, base["llava"], base["world"], base["tags"], base["stages"])]
    return {"config": cfg.model_dump(mode="json"), **base, "rounds": [r["metrics"] for r in rounds]}
