"""`accelerate launch` on 2 CPU processes (gloo) trains the same adapters as one process with the
same global batch: each process takes its share of every optimizer step, the loss is normalised
by the whole step's tokens, and DDP averages the gradients."""
from __future__ import annotations

import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from fisao import io
from fisao.align import shards
from fisao.align.files import CALIBRATION, FIGURES
from fisao.align.sample import rollout_stage
from fisao.align.score import score_stage
from fisao.align.train import update_stage
from fisao.align.calibration import Calibration
from fisao.align.launch import write_args
from fisao.align.rollout import load_rollouts
from tests.test_real_families import campaign_config


def test_two_processes_equal_one_with_the_same_global_batch(real_models, tmp_path):
    cfg = campaign_config(real_models, "llava")
    # A target_kl far below one step's move: the first step sees the sampling policy (approx_kl 0), the
    # second the moved one, and every process must stop there together (the KL is averaged over them).
    cfg = cfg.model_copy(update={"ppo": cfg.ppo.model_copy(update={"epochs": 2, "lr": 1e-2, "target_kl": 1e-6})})
    rt, coco, policy = cfg.model, real_models["coco"], cfg.model.policy
    cal = Calibration(0.1, -0.1, 0.0, 0.1, 0.5, 1, 1)
    io.write_json(tmp_path / "cal" / CALIBRATION, {"mention": cal.to_json(), "sentence": cal.to_json()})
    rollout_stage(policy, coco, cfg.rollout, 1, tmp_path / "r", progress=False, runtime=rt)
    score_stage(tmp_path / "r", policy, cfg.model.verifier, tmp_path / "cal", coco, cfg.reward, tmp_path / "s",
                runtime=rt)
    args = dict(base_dir=policy, adapter_in=None, rollouts_dir=tmp_path / "r", scores_dir=tmp_path / "s", world_dir=coco,
                lora=cfg.lora, cfg=cfg.ppo, round_index=1, runtime=rt)
    one = update_stage(**args, out=tmp_path / "one")
    launch = write_args(tmp_path / "args.json", **args, out=tmp_path / "two")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                          "-m", "fisao.align.launch", str(launch)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    two = io.read_json(tmp_path / "two" / FIGURES)
    assert two["processes"] == 2 and one["processes"] == 1
    assert two["optimizer_steps"] == one["optimizer_steps"] == 2 and two["stopped_early"] == one["stopped_early"] == 1
    a = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    moved = max(float(v.abs().max()) for k, v in a.items() if "lora_B" in k)
    assert moved > 1e-3  # the update did something (B starts at 0)
    assert all(torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4) for k in a), \
        max(float((a[k] - b[k]).abs().max()) for k in a)
    assert abs(two["kl"] - one["kl"]) < 1e-5 and abs(two["loss"] - one["loss"]) < 1e-4


def test_rollouts_sharded_over_two_processes_equal_the_shards_sampled_in_turn(real_models, tmp_path):
    """`accelerate launch` on 2 CPU processes: process p samples shard p of the round, the main
    process gathers them; the result is what one process gives sampling both shards in turn."""
    cfg = campaign_config(real_models, "llava")
    rt, coco, policy = cfg.model, real_models["coco"], cfg.model.policy
    parts = shards.shard_dirs(tmp_path / "one", 2)
    for i, part in enumerate(parts):
        rollout_stage(policy, coco, cfg.rollout, 1, part, progress=False, runtime=rt, shard=(i, 2))
    shards.merge_rollout_shards(parts, tmp_path / "one")
    launch = write_args(tmp_path / "args.json", "rollouts", policy_dir=policy, world_dir=coco, cfg=cfg.rollout,
                        round_index=1, out=tmp_path / "two", shards=2, runtime=rt)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                          "-m", "fisao.align.launch", str(launch)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    sampled_by = [io.read_json(d / FIGURES)["process"] for d in shards.shard_dirs(tmp_path / "two", 2)]
    assert sampled_by == [[0, 2], [1, 2]]  # each process sampled its own shard
    (a, extra_a), (b, extra_b) = load_rollouts(tmp_path / "one"), load_rollouts(tmp_path / "two")
    assert len(b) == cfg.rollout.images_per_round * cfg.rollout.n_per_image
    assert extra_a["image_id"] == extra_b["image_id"] and a.texts == b.texts
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.mask, b.mask)
    assert torch.equal(a.image_index, b.image_index)
    assert torch.allclose(a.logprobs, b.logprobs, atol=1e-6)
    assert io.read_json(tmp_path / "two" / FIGURES)["shards"] == 2
