"""Tasks: the stages of a FiSAO round (cached on their inputs' hashes, config sections and code).

Each task names its output directory after a content key of everything it depends on, runs the
library stage only when that directory is not complete, and returns a small JSON ref: path,
sha256 of the directory, and the stage's figures.
"""
from __future__ import annotations

from pathlib import Path

from fisao import io
from fisao.align import stages
from fisao.config import LoraConfig, PPOConfig, RewardConfig, RolloutConfig, config_hash
from tasks.common import build_once, cached_task, key_of


def _ref(out: Path, **extra) -> dict:
    return {"path": str(out), "sha256": io.tree_digest(out), "figures": io.read_json(out / stages.FIGURES), **extra}


@cached_task(name="calibrate")
def calibrate(policy: dict, clip: dict, world_dir: str, data_md5: str, reward: RewardConfig, rollout: RolloutConfig,
              code: str, outputs: str) -> dict:
    """Verifier baseline and width from the base policy's answers on a labelled split."""
    out = Path(outputs) / "calibration" / key_of(policy["sha256"], clip["sha256"], data_md5, config_hash(reward),
                                                  config_hash(rollout), code)
    build_once(out, stages.FIGURES, lambda: stages.calibration_stage(policy["path"], clip["path"], world_dir, reward,
                                                                      rollout, out))
    return _ref(out)


@cached_task(name="rollouts")
def rollouts(policy: dict, world_dir: str, data_md5: str, cfg: RolloutConfig, round_index: int, code: str,
             outputs: str) -> dict:
    """Sample the round's answers with the current policy."""
    out = Path(outputs) / "rollouts" / key_of(policy["sha256"], data_md5, config_hash(cfg), round_index, code)
    build_once(out, stages.FIGURES, lambda: stages.rollout_stage(policy["path"], world_dir, cfg, round_index, out))
    return _ref(out)


@cached_task(name="score")
def score(samples: dict, policy: dict, clip: dict, calibration: dict, world_dir: str, data_md5: str,
          reward: RewardConfig, code: str, outputs: str) -> dict:
    """Per-token verifier rewards of the round's rollouts."""
    out = Path(outputs) / "scores" / key_of(samples["sha256"], clip["sha256"], calibration["sha256"], data_md5,
                                             config_hash(reward), code)
    build_once(out, stages.FIGURES, lambda: stages.score_stage(samples["path"], policy["path"], clip["path"],
                                                                calibration["path"], world_dir, reward, out))
    return _ref(out)


@cached_task(name="update")
def update(base: dict, previous: dict | None, samples: dict, scores: dict, world_dir: str, data_md5: str,
           lora: LoraConfig, ppo: PPOConfig, round_index: int, code: str, outputs: str) -> dict:
    """PPO with LoRA on the scored rollouts; returns the merged checkpoint (`path`) and the adapter."""
    out = Path(outputs) / "rounds" / key_of(base["sha256"], previous and previous["sha256"], samples["sha256"],
                                             scores["sha256"], data_md5, config_hash(lora), config_hash(ppo),
                                             round_index, code)
    build_once(out, stages.FIGURES, lambda: stages.update_stage(base["path"], previous and previous["adapter"],
                                                                 samples["path"], scores["path"], world_dir, lora, ppo,
                                                                 round_index, out))
    model = out / "model"
    return {"path": str(model), "sha256": io.tree_digest(model), "adapter": str(out / "adapter"),
            "figures": io.read_json(out / stages.FIGURES)}
