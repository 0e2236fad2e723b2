"""Training on a round's scored rollouts: PPO with LoRA, then the adapters and a merged checkpoint.

A round's policy is the base model plus LoRA adapters. Round k continues training round k−1's
adapters (fresh ones for k = 1) and writes both its adapters and a merged checkpoint, which is
what evaluation and the next round's rollouts load.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from fisao import io
from fisao.align.files import FIGURES, TOKEN_REWARDS
from fisao.align.lora import ValueHead, add_lora, load_adapter, load_value_head, merge_and_save, save_adapter
from fisao.align.rewards import NameSlots
from fisao.align.rollout import load_rollouts
from fisao.align.sample import rollout_images
from fisao.align.update import make_accelerator, ppo_update
from fisao.coco import load_image
from fisao.config import LoraConfig, ModelConfig, PPOConfig
from fisao.crashpoints import crash_point
from fisao.runtime import load_runtime_policy, prepare_for_training, runtime_device


def update_stage(base_dir: str | Path, adapter_in: str | Path | None, rollouts_dir: str | Path,
                 scores_dir: str | Path, world_dir: str | Path, lora: LoraConfig, cfg: PPOConfig,
                 round_index: int, out: str | Path, runtime: ModelConfig | None = None, accelerator=None) -> dict:
    """PPO on one round's scored rollouts; writes `out/adapter` and the merged `out/model`.

    Under `accelerate launch` every process runs this with the same arguments: each trains on its
    share of every optimizer step (fisao/align/update.py) and the main process writes `out`.
    """
    t0 = time.time()
    rollouts, extra = load_rollouts(rollouts_dir)
    examples, index = rollout_images(rollouts_dir, world_dir, extra["image_id"])
    images = [load_image(e.image) for e in examples]
    rollouts.image_index = torch.tensor(index)
    token_rewards, slots = load_scores(Path(scores_dir) / TOKEN_REWARDS, rollouts.response_ids.shape)
    accelerator = accelerator or make_accelerator(cfg, cpu=runtime_device(runtime) == "cpu")
    device = None if runtime is None else str(accelerator.device)
    base, processor = load_runtime_policy(base_dir, runtime, device)
    model, value_head = policy_to_train(base, adapter_in, lora, cfg, round_index)
    prepare_for_training(model, runtime)
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + round_index)
    stats = ppo_update(model, processor, images, rollouts, token_rewards, cfg, accelerator, generator,
                       value_head=value_head, slots=slots)
    crash_point("update:mid", round_index)
    out = Path(out)
    if accelerator.is_main_process:
        with io.atomic_dir(out) as tmp:
            save_adapter(model, tmp / "adapter", value_head)
            merge_and_save(model, processor, tmp / "model")
            crash_point("checkpoint:mid", round_index)
            stats["seconds"] = round(time.time() - t0, 2)
            stats["processes"] = accelerator.num_processes
            io.write_json(tmp / FIGURES, stats)
    accelerator.wait_for_everyone()
    return stats


def policy_to_train(base, adapter_in: str | Path | None, lora: LoraConfig, cfg: PPOConfig, round_index: int):
    """(model with trainable LoRA adapters, value head or None) on `base`: round k−1's adapters
    (`adapter_in`) and value head, or fresh ones for round 1 (`adapter_in` None).

    The value head exists only for `cfg.advantage` "gae"; a previous round without one (trained
    critic-free) gets a fresh one.
    """
    if adapter_in is None:
        # LoRA's A matrices are random: seeded, so every process, every rerun and a resumed campaign
        # (whose process skipped the base-model builds that drew from the RNG) start from the same ones.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed * 1000 + round_index)
            model = add_lora(base, lora)
        value_head = None
    else:
        model = load_adapter(base, adapter_in, is_trainable=True)
        value_head = load_value_head(adapter_in, model) if cfg.advantage == "gae" else None
    if cfg.advantage == "gae" and value_head is None:
        value_head = ValueHead.for_model(model)
    return model, value_head


def load_scores(path: str | Path, shape: torch.Size) -> tuple[torch.Tensor, NameSlots | None]:
    """The scoring stage's file, read once: (N, T) per-token rewards, checked against the rollouts'
    shape, and the round's name slots (fisao/align/score.py `round_name_slots`; None in a file
    without them, which ppo_update refuses when `ppo.name_slot_coef` needs them)."""
    saved = load_file(str(path))
    rewards = saved["token_rewards"]
    if rewards.shape != shape:
        raise ValueError(f"{path} holds rewards of shape {tuple(rewards.shape)} for rollouts of shape {tuple(shape)}")
    slots = NameSlots(saved["slot_index"], saved["slot_tokens"], saved["slot_rewards"]) if "slot_index" in saved else None
    return rewards, slots
