"""Tasks: the stages of a FiSAO round, each in a content-addressed directory (tasks/common.py).

Each task names its output directory after a content key of everything it depends on, runs the
library stage only when that directory is not complete, and returns a small JSON ref: path,
sha256 of the directory, the stage's figures and whether the directory was already complete
(`cached`). They take refs (tasks/refs.py): the policy and
verifier as ModelRefs, the data as a DataRef, earlier stages' outputs as StageRefs, and a
StageContext (code version, outputs directory, runtime).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from fisao import io
from fisao.align.launch import write_args
from fisao.align.files import FIGURES
from fisao.config import LoraConfig, PPOConfig, RewardConfig, RolloutConfig, ScaleConfig, config_hash
from tasks.common import build_once, key_of, library, stage_task
from tasks.refs import DataRef, ModelRef, StageContext, StageRef


def _ref(out: Path, built: bool) -> dict:
    return {"path": str(out), "sha256": io.tree_digest(out), "figures": io.read_json(out / FIGURES),
            "cached": not built}


@stage_task(name="calibrate")
def calibrate(policy: ModelRef, verifier: ModelRef, data: DataRef, reward: RewardConfig, rollout: RolloutConfig,
              ctx: StageContext) -> dict:
    """Verifier baseline and width from the base policy's answers on a labelled split."""
    out = Path(ctx.outputs) / "calibration" / key_of(policy.sha256, verifier.sha256, data.md5, config_hash(reward),
                                                      config_hash(rollout), *ctx.key_parts)
    stage = library("fisao.align.score:calibration_stage")
    built = build_once(out, FIGURES, lambda: stage(policy.path, verifier.path, data.path, reward, rollout, out,
                                                   runtime=ctx.runtime))
    return _ref(out, built)


def accelerate_launch(stage: str, out: Path, processes: int, **kwargs) -> None:
    """Run `stage` on `processes` processes (fisao/align/launch.py); its arguments go in a file beside `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    args = write_args(out.parent / f".{out.name}.{stage}.json", stage, out=out, **kwargs)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
           "-m", "fisao.align.launch", str(args)]
    subprocess.run(cmd, check=True)


@stage_task(name="rollouts")
def rollouts(policy: ModelRef, data: DataRef, cfg: RolloutConfig, round_index: int, ctx: StageContext,
             scale: ScaleConfig = ScaleConfig()) -> dict:
    """Sample the round's answers with the current policy (in `scale.shards` parts, then gathered).

    With `scale.processes` > 1 the shards are sampled side by side under `accelerate launch`; the
    rollouts are the same as on one process, so `processes` is not part of the key."""
    shards, backend, runtime = scale.shards, scale.rollout_backend, ctx.runtime
    extra = () if shards == 1 and backend == "hf" else (shards, backend)
    out = Path(ctx.outputs) / "rollouts" / key_of(policy.sha256, data.md5, config_hash(cfg), round_index,
                                                   *ctx.key_parts, *extra)

    def build() -> None:
        from fisao.align import shards as sharding  # torch: only when the stage runs

        parts = sharding.shard_dirs(out, shards) if shards > 1 else []
        for part in parts:  # what a killed shard left behind (complete shards are kept)
            io.remove_temp_siblings(part)
        if scale.processes > 1:
            accelerate_launch("rollouts", out, scale.processes, policy_dir=policy.path, world_dir=data.path, cfg=cfg,
                              round_index=round_index, shards=shards, runtime=runtime, backend=backend)
            return
        if shards == 1:
            library("fisao.align.sample:rollout_stage")(policy.path, data.path, cfg, round_index, out, runtime=runtime,
                                                        backend=backend)
            return
        sharding.merge_rollout_shards(sharding.sample_shards(policy.path, data.path, cfg, round_index, out, shards,
                                                            runtime=runtime, backend=backend), out)

    return _ref(out, build_once(out, FIGURES, build))


@stage_task(name="score")
def score(rollouts: StageRef, policy: ModelRef, verifier: ModelRef, calibration: StageRef, data: DataRef,
          reward: RewardConfig, ctx: StageContext) -> dict:
    """Per-token verifier rewards of the round's rollouts."""
    out = Path(ctx.outputs) / "scores" / key_of(rollouts.sha256, verifier.sha256, calibration.sha256, data.md5,
                                                 config_hash(reward), *ctx.key_parts)
    stage = library("fisao.align.score:score_stage")
    built = build_once(out, FIGURES, lambda: stage(rollouts.path, policy.path, verifier.path, calibration.path,
                                                   data.path, reward, out, runtime=ctx.runtime))
    return _ref(out, built)


@stage_task(name="update")
def update(base: ModelRef, previous: ModelRef | None, rollouts: StageRef, scores: StageRef, data: DataRef,
           lora: LoraConfig, ppo: PPOConfig, round_index: int, ctx: StageContext,
           scale: ScaleConfig = ScaleConfig()) -> dict:
    """PPO with LoRA on the scored rollouts, from `previous`'s adapter (None: a fresh one on `base`);
    returns the merged checkpoint (`path`) and the adapter.

    With `scale.processes` > 1 the update runs under `accelerate launch` (fisao/align/launch.py)."""
    if previous is not None and previous.adapter is None:
        raise ValueError(f"update of round {round_index}: previous checkpoint {previous.path} has no adapter; pass "
                         "the ModelRef of the previous round's update result (ModelRef.of(result)), or None for round 1")
    out = Path(ctx.outputs) / "rounds" / key_of(base.sha256, previous and previous.sha256, rollouts.sha256,
                                                 scores.sha256, data.md5, config_hash(lora), config_hash(ppo),
                                                 round_index, *ctx.key_parts)
    args = dict(base_dir=base.path, adapter_in=previous and previous.adapter, rollouts_dir=rollouts.path,
                scores_dir=scores.path, world_dir=data.path, lora=lora, cfg=ppo, round_index=round_index,
                runtime=ctx.runtime)
    if scale.processes == 1:
        built = build_once(out, FIGURES, lambda: library("fisao.align.train:update_stage")(**args, out=out))
    else:
        built = build_once(out, FIGURES, lambda: accelerate_launch("update", out, scale.processes, **args))
    model = out / "model"
    return {"path": str(model), "sha256": io.tree_digest(model), "adapter": str(out / "adapter"),
            "figures": io.read_json(out / FIGURES), "cached": not built}
