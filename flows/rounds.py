"""A campaign's rounds as wiring of tasks: evaluate a model, run a FiSAO round, record a round.

Round k: rollouts with round k−1's policy -> verifier scores -> PPO/LoRA update -> evaluation ->
report -> manifest -> MLflow -> the metrics table in Prefect's UI. Each round that runs is a
subflow named after it (`demo: round 3`), in the campaign's process. Round stages write under the
campaign's own directory (`outputs/campaigns/NAME/`), so campaigns never write each other's files;
the world, the base models, calibration and evaluations are content-addressed and shared.
"""
from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from fisao import io, localstate
from fisao.config import Config
from fisao.versioning import code_version, stage_files
from fisao.summary import round_rows
from tasks import align
from tasks.audit import round_report
from tasks.evaluate import evaluate
from tasks.publish import publish_round, tag_this_flow_run
from tasks.refs import DataRef, ModelRef, StageContext, StageRef
from tasks.resume import restore_recorded_lineage, write_manifest
from tasks.tracking import log_round, round_span

# The files each kind of stage depends on, derived from what its library entry points import
# (fisao.versioning.stage_files; tests/test_versioning.py): the world and its base-model builds,
# the benchmarks, and a round's rollouts, scores and update (run in-process or by the launcher).
MODEL_CODE = stage_files("fisao.world.store", "fisao.models.build")
EVAL_CODE = stage_files("fisao.evaluate")
ALIGN_CODE = stage_files("fisao.align.sample", "fisao.align.score", "fisao.align.train", "fisao.align.launch",
                         "fisao.align.shards")

ROUND_FIGURES = {
    "rollouts": ("tokens", "tokens_per_second"),
    "score": ("reward_mean", "answer_reward_mean", "share_positive", "share_negative", "mentions",
              "rollout_hallucination_share", "verifier_agreement",
              "questions", "question_reward_mean", "question_yes_share", "question_accuracy",
              # the world's causes (fisao/world/causes.py): what the verifier gives each kind of mention
              "reward_correct", "reward_lookalike", "reward_pair", "reward_other", "share_lookalike", "share_pair",
              "share_other"),
    "update": ("kl", "loss", "policy_loss", "kl_loss", "value_loss", "clipfrac", "approx_kl", "grad_norm"),
}


def timed(stages: dict, t0: float, name: str, task, /, **inputs) -> dict:
    """Run the stage task `task(**inputs)`, recording as stage `name` when it started (since t0), how
    long and whether cached (its directory was already complete: the task's `cached`, taken out of
    the result it returns)."""
    t = time.time()
    result = task(**inputs)
    cached = result.pop("cached")
    stages[name] = {"seconds": round(time.time() - t, 1), "cached": cached, "start": round(t - t0, 1)}
    get_run_logger().info("%s: %s", name, "cache hit, skipped" if cached else "done")
    return result


def evaluate_model(cfg: Config, project: str, k: int, model: dict, world: dict, stages: dict, t0: float) -> dict:
    """Benchmarks of one round's model (its directory keyed on the checkpoint's hash)."""
    ctx = StageContext(code=code_version(*EVAL_CODE), outputs=str(Path(project) / cfg.outputs_dir), runtime=cfg.model)
    return timed(stages, t0, f"eval-{k}", evaluate, model=ModelRef.of(model), data=DataRef.of(world),
                 benchmarks=("chair", "pope"), cfg=cfg.eval, ctx=ctx)


def align_context(cfg: Config, campaign_dir: str) -> StageContext:
    """What every calibration, rollout, score and update call of campaign `cfg` repeats."""
    return StageContext(code=code_version(*ALIGN_CODE), outputs=campaign_dir, runtime=cfg.model)


def checkpoint_ref(update_result: dict) -> dict:
    """What later rounds need of a round's checkpoint (the same whether it was just trained or verified
    from an earlier run, so the next round's stage keys are too)."""
    return {k: update_result[k] for k in ("path", "sha256", "adapter")}


def round_params(cfg: Config, model: dict, k: int) -> dict:
    """Round k's MLflow parameters: `round` (an axis in MLflow's compare view), the checkpoint and the
    eval and training settings. Round 0 (the base model, tagged `fisao.baseline`) gets the same keys,
    so the compare view highlights what differs, not every row."""
    params = {"round": k, "model_path": model["path"]}
    for section in ("eval", "rollout", "reward", "lora", "ppo"):
        params.update({f"{section}.{key}": v for key, v in getattr(cfg, section).model_dump().items()})
    return params


def round_datasets(cfg: Config, world: dict, metrics: dict, rollouts: dict | None = None) -> list[dict]:
    """The data a round used, for its MLflow run's dataset inputs: the rollouts' images (FiSAO rounds;
    `rollouts` the rollout stage's ref) and the evaluation's, each with the data directory's md5."""
    data = {"path": world["path"], "md5": world["md5"]}
    evaluation = {**data, "context": "evaluation", "split": cfg.eval.split, "images": metrics.get("chair_n_captions")}
    if rollouts is None:
        return [evaluation]
    split = rollouts["figures"].get("split", cfg.rollout.split)
    return [{**data, "context": "training", "split": split, "images": cfg.rollout.images_per_round}, evaluation]


def fisao_round(cfg: Config, campaign_dir: str, k: int, base: dict, policy: dict, previous: dict | None,
                calibration: dict, t0: float) -> tuple[dict, dict, dict, dict]:
    """Round k's rollouts, scores and update; returns (new policy, figures, rollouts, scores)."""
    stages, data, ctx = base["stages"], DataRef.of(base["world"]), align_context(cfg, campaign_dir)
    policy = ModelRef.of(policy)
    rollouts = timed(stages, t0, f"rollouts-{k}", align.rollouts, policy=policy, data=data, cfg=cfg.rollout,
                     round_index=k, ctx=ctx, scale=cfg.scale)
    scores = timed(stages, t0, f"score-{k}", align.score, rollouts=StageRef.of(rollouts), policy=policy,
                   verifier=ModelRef.of(base["clip"]), calibration=StageRef.of(calibration), data=data,
                   reward=cfg.reward, ctx=ctx)
    # The round count is the campaign's business, not a round's: "one more round" must not change
    # the update's key (ppo.rounds is read nowhere in fisao/align).
    ppo = cfg.ppo.model_copy(update={"rounds": 1})
    new = timed(stages, t0, f"update-{k}", align.update, base=ModelRef.of(base["llava"]),
                previous=previous and ModelRef.of(previous), rollouts=StageRef.of(rollouts),
                scores=StageRef.of(scores), data=data, lora=cfg.lora, ppo=ppo, round_index=k, ctx=ctx,
                scale=cfg.scale)
    figures = {}
    for stage, ref in (("rollouts", rollouts), ("score", scores), ("update", new)):
        figures.update({f"{stage}/{name}": ref["figures"][name] for name in ROUND_FIGURES[stage] if name in ref["figures"]})
    # What the stages took when they ran (a cached rerun reports the same figures).
    for stage, ref in (("rollouts", rollouts), ("score", scores), ("update", new)):
        figures[f"seconds/{stage}"] = ref["figures"]["seconds"]
    figures["seconds/round"] = round(sum(figures[f"seconds/{s}"] for s in ("rollouts", "score", "update")), 2)
    return new, figures, rollouts, scores


def record_round(cfg: Config, campaign_dir: str, k: int, lineage: dict, metrics: dict, rounds: list[dict],
                 model: dict, evaluation: dict, calibration: dict, rollouts: dict, scores: dict,
                 tokenizer_dir: str, world: dict) -> str:
    """Round k's report and manifest, then its MLflow run (complete once the logged copies verify)."""
    round_dir = Path(campaign_dir) / f"round-{k}"
    facts = {"campaign": cfg.name, "round": str(k), **{key.removeprefix("fisao."): str(v) for key, v in lineage.items()}}
    audit = round_report(rollouts=StageRef.of(rollouts), scores=StageRef.of(scores), tokenizer_dir=tokenizer_dir,
                         rounds=[*rounds, metrics], facts=facts, title=f"{cfg.name} round {k}",
                         out=str(round_dir / "audit"), repeats=cfg.reward.repeats)
    lineage_file = round_dir / "lineage.json"
    if not restore_recorded_lineage(cfg.name, k, model["sha256"], str(lineage_file)):
        io.write_json(lineage_file, {"tags": lineage, "config": cfg.model_dump(mode="json")})
    artifacts = {"adapter": model["adapter"], "rollouts": rollouts["path"], "scores": scores["path"],
                 "calibration": calibration["path"], "evaluation": evaluation["path"], "audit": audit,
                 "lineage": str(lineage_file)}
    groups = {**artifacts, "model": [model["path"], str(Path(model["path"]).parent)],
              "adapter": [model["adapter"], str(Path(model["adapter"]).parent)]}
    manifest = write_manifest(groups, str(round_dir / "manifest.json"))
    return log_round(experiment=cfg.name, campaign=cfg.name, round_index=k, metrics=metrics,
                     params=round_params(cfg, model, k), tags=lineage, artifacts=artifacts, manifest=manifest,
                     span=round_span(rollouts, scores, model, evaluation),
                     datasets=round_datasets(cfg, world, metrics, rollouts))


def round_run_name() -> str:
    """The round subflow's name in Prefect's UI: `demo: round 3`."""
    params = flow_run.parameters
    return f"{params['cfg'].name}: round {params['k']}"


# Parameters pass as they are: validation would copy `base`, whose `stages` the round fills in
# (Prefect's input resolution copies a collection only when it holds futures, and these hold none).
@flow(name="fisao-round", flow_run_name=round_run_name, validate_parameters=False)
def run_round(cfg: Config, project: str, k: int, base: dict, policy: dict, previous: dict | None, calibration: dict,
              rounds: list[dict], tags: dict, t0: float) -> dict:
    """Round k of campaign `cfg.name` from `policy` (round k−1's; `rounds` the metrics of rounds 0…k−1):
    train, evaluate, record in MLflow and publish the metrics table; returns {"policy": the new
    checkpoint's ref, "metrics": round k's metrics}. Stage timings go into `base["stages"]`."""
    tag_this_flow_run()  # the campaign's tag (and a sweep's), as its flow run has
    out_dir = str(localstate.campaign_dir(project, cfg.outputs_dir, cfg.name))
    new, figures, rollouts, scores = fisao_round(cfg, out_dir, k, base, policy, previous, calibration, t0)
    evaluation = evaluate_model(cfg, project, k, checkpoint_ref(new), base["world"], base["stages"], t0)
    lineage = {**tags, "fisao.parent_sha256": policy["sha256"], "fisao.parent_path": policy["path"],
               "fisao.model_sha256": new["sha256"], "fisao.model_path": new["path"]}
    metrics = {**evaluation["metrics"], **figures}
    record_round(cfg, out_dir, k, lineage, metrics, rounds, new, evaluation, calibration, rollouts, scores,
                 policy["path"], base["world"])
    publish_round(cfg.name, k, round_rows([*rounds, metrics]))
    return {"policy": checkpoint_ref(new), "metrics": metrics}
