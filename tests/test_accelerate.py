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
from fisao.align import stages
from fisao.align.calibration import Calibration
from fisao.align.launch import write_args
from tests.test_real_families import campaign_config


def test_two_processes_equal_one_with_the_same_global_batch(real_models, tmp_path):
    cfg = campaign_config(real_models, "llava")
    cfg = cfg.model_copy(update={"ppo": cfg.ppo.model_copy(update={"epochs": 2, "lr": 1e-2})})
    rt, coco, policy = cfg.model, real_models["coco"], cfg.model.policy
    cal = Calibration(0.1, -0.1, 0.0, 0.1, 0.5, 1, 1)
    io.write_json(tmp_path / "cal" / stages.CALIBRATION, {"mention": cal.to_json(), "sentence": cal.to_json()})
    stages.rollout_stage(policy, coco, cfg.rollout, 1, tmp_path / "r", progress=False, runtime=rt)
    stages.score_stage(tmp_path / "r", policy, cfg.model.verifier, tmp_path / "cal", coco, cfg.reward, tmp_path / "s",
                       runtime=rt)
    args = dict(base_dir=policy, adapter_in=None, rollouts_dir=tmp_path / "r", scores_dir=tmp_path / "s", world_dir=coco,
                lora=cfg.lora, cfg=cfg.ppo, round_index=1, runtime=rt)
    one = stages.update_stage(**args, out=tmp_path / "one")
    launch = write_args(tmp_path / "args.json", **args, out=tmp_path / "two")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                          "-m", "fisao.align.launch", str(launch)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    two = io.read_json(tmp_path / "two" / stages.FIGURES)
    assert two["processes"] == 2 and one["processes"] == 1
    assert two["optimizer_steps"] == one["optimizer_steps"] == 4
    a = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    moved = max(float(v.abs().max()) for k, v in a.items() if "lora_B" in k)
    assert moved > 1e-3  # the update did something (B starts at 0)
    assert all(torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4) for k in a), \
        max(float((a[k] - b[k]).abs().max()) for k in a)
    assert abs(two["kl"] - one["kl"]) < 1e-5 and abs(two["loss"] - one["loss"]) < 1e-4
