"""Tasks: the stages of a FiSAO round (cached on their inputs' hashes, config sections and code).

Each task names its output directory after a content key of everything it depends on, runs the
library stage only when that directory is not complete, and returns a small JSON ref: path,
sha256 of the directory, and the stage's figures.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from fisao import io
from fisao.align.launch import write_args
from fisao.align import shards as sharding
from fisao.align.files import FIGURES
from fisao.align.sample import rollout_stage
from fisao.align.score import calibration_stage, score_stage
from fisao.align.train import update_stage
from fisao.config import LoraConfig, ModelConfig, PPOConfig, RewardConfig, RolloutConfig, config_hash
from tasks.common import build_once, cached_task, key_of


def _rt(runtime: ModelConfig | None) -> tuple:
    """Cache-key part of the runtime (nothing for the world, whose keys stay as they were)."""
    return () if runtime is None else (config_hash(runtime),)


def _ref(out: Path, **extra) -> dict:
    return {"path": str(out), "sha256": io.tree_digest(out), "figures": io.read_json(out / FIGURES), **extra}


@cached_task(name="calibrate")
def calibrate(policy: dict, clip: dict, world_dir: str, data_md5: str, reward: RewardConfig, rollout: RolloutConfig,
              code: str, outputs: str, runtime: ModelConfig | None = None) -> dict:
    """Verifier baseline and width from the base policy's answers on a labelled split."""
    out = Path(outputs) / "calibration" / key_of(policy["sha256"], clip["sha256"], data_md5, config_hash(reward),
                                                  config_hash(rollout), code, *_rt(runtime))
    build_once(out, FIGURES, lambda: calibration_stage(policy["path"], clip["path"], world_dir, reward, rollout, out,
                                                        runtime=runtime))
    return _ref(out)


def accelerate_launch(stage: str, out: Path, processes: int, **kwargs) -> None:
    """Run `stage` on `processes` processes (fisao/align/launch.py); its arguments go in a file beside `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    args = write_args(out.parent / f".{out.name}.{stage}.json", stage, out=out, **kwargs)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
           "-m", "fisao.align.launch", str(args)]
    subprocess.run(cmd, check=True)


@cached_task(name="rollouts")
def rollouts(policy: dict, world_dir: str, data_md5: str, cfg: RolloutConfig, round_index: int, code: str,
             outputs: str, runtime: ModelConfig | None = None, shards: int = 1, backend: str = "hf",
             processes: int = 1) -> dict:
    """Sample the round's answers with the current policy (in `shards` parts, then gathered).

    With `processes` > 1 the shards are sampled side by side under `accelerate launch`; the
    rollouts are the same as on one process, so `processes` is not part of the key."""
    extra = () if shards == 1 and backend == "hf" else (shards, backend)
    out = Path(outputs) / "rollouts" / key_of(policy["sha256"], data_md5, config_hash(cfg), round_index, code,
                                               *_rt(runtime), *extra)

    def build() -> None:
        parts = sharding.shard_dirs(out, shards) if shards > 1 else []
        for part in parts:  # what a killed shard left behind (complete shards are kept)
            io.remove_temp_siblings(part)
        if processes > 1:
            accelerate_launch("rollouts", out, processes, policy_dir=policy["path"], world_dir=world_dir, cfg=cfg,
                              round_index=round_index, shards=shards, runtime=runtime, backend=backend)
            return
        if shards == 1:
            rollout_stage(policy["path"], world_dir, cfg, round_index, out, runtime=runtime, backend=backend)
            return
        sharding.merge_rollout_shards(sharding.sample_shards(policy["path"], world_dir, cfg, round_index, out, shards,
                                                            runtime=runtime, backend=backend), out)

    build_once(out, FIGURES, build)
    return _ref(out)


@cached_task(name="score")
def score(rollouts: dict, policy: dict, clip: dict, calibration: dict, world_dir: str, data_md5: str,
          reward: RewardConfig, code: str, outputs: str, runtime: ModelConfig | None = None) -> dict:
    """Per-token verifier rewards of the round's rollouts."""
    out = Path(outputs) / "scores" / key_of(rollouts["sha256"], clip["sha256"], calibration["sha256"], data_md5,
                                             config_hash(reward), code, *_rt(runtime))
    build_once(out, FIGURES, lambda: score_stage(rollouts["path"], policy["path"], clip["path"], calibration["path"],
                                                  world_dir, reward, out, runtime=runtime))
    return _ref(out)


@cached_task(name="update")
def update(base: dict, previous: dict | None, rollouts: dict, scores: dict, world_dir: str, data_md5: str,
           lora: LoraConfig, ppo: PPOConfig, round_index: int, code: str, outputs: str,
           runtime: ModelConfig | None = None, processes: int = 1) -> dict:
    """PPO with LoRA on the scored rollouts; returns the merged checkpoint (`path`) and the adapter.

    With `processes` > 1 the update runs under `accelerate launch` (fisao/align/launch.py)."""
    out = Path(outputs) / "rounds" / key_of(base["sha256"], previous and previous["sha256"], rollouts["sha256"],
                                             scores["sha256"], data_md5, config_hash(lora), config_hash(ppo),
                                             round_index, code, *_rt(runtime))
    args = dict(base_dir=base["path"], adapter_in=previous and previous["adapter"], rollouts_dir=rollouts["path"],
                scores_dir=scores["path"], world_dir=world_dir, lora=lora, cfg=ppo, round_index=round_index,
                runtime=runtime)
    if processes == 1:
        build_once(out, FIGURES, lambda: update_stage(**args, out=out))
    else:
        build_once(out, FIGURES, lambda: accelerate_launch("update", out, processes, **args))
    model = out / "model"
    return {"path": str(model), "sha256": io.tree_digest(model), "adapter": str(out / "adapter"),
            "figures": io.read_json(out / FIGURES)}
