"""One FiSAO round, timed: per-stage wall time, rollout tokens/s, update samples/s and peak memory.

    python bench/round.py [--config configs/demo.yaml] [--set rollout.images_per_round=64 ...]

    python bench/round.py --world data/world --clip outputs/models/clip-<key> --llava outputs/models/llava-<key>

    python bench/round.py --config configs/llava-1.5-7b.yaml [--set rollout.images_per_round=32 ...]

A config without a `model` section runs on the shapes world, building the world and base models
in a temp directory unless given (`make run` prints their paths). A config with one (real
checkpoints and COCO, as `fisao run` takes it) prints the memory estimate first, then runs the
round on the configured policy, verifier and data with the configured device and dtype, and
reports each stage's peak GPU memory next to the estimate's. Prints one line per stage and a JSON
object; nothing is asserted: speed is reported, never tested.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fisao.localstate import OFFLINE  # noqa: E402


GIB = 1024 ** 3


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_gpu_gib() -> float | None:
    """Peak GPU memory allocated since the last call (None without CUDA); resets the counter."""
    import torch

    if not torch.cuda.is_available():
        return None
    peak = torch.cuda.max_memory_allocated() / GIB
    torch.cuda.reset_peak_memory_stats()
    return round(peak, 2)


def main() -> int:
    import os

    os.environ.update(OFFLINE)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--world", default=None, help="world directory (default: build one in a temp dir)")
    p.add_argument("--clip", default=None, help="CLIP directory (default: build)")
    p.add_argument("--llava", default=None, help="base LLaVA directory (default: build)")
    p.add_argument("--set", nargs="*", default=[], help="config overrides, dotted.key=value (the value as in YAML)")
    args = p.parse_args()

    from fisao.align.sample import rollout_stage
    from fisao.align.score import calibration_stage, score_stage
    from fisao.align.train import update_stage
    from fisao.config import load_config, parse_settings

    cfg = load_config(args.config, parse_settings(args.set))
    work = Path(tempfile.mkdtemp(prefix="fisao-bench-"))
    times: dict[str, float] = {}
    gpu: dict[str, float | None] = {}

    def timed(name, fn, *a, **kw):
        peak_gpu_gib()
        t = time.perf_counter()
        result = fn(*a, **kw)
        times[name] = round(time.perf_counter() - t, 2)
        gpu[name] = peak_gpu_gib()
        where = "" if gpu[name] is None else f"   peak GPU {gpu[name]:6.2f} GiB"
        print(f"{name:<12} {times[name]:8.2f} s   peak RSS {peak_rss_mb():7.0f} MB{where}", flush=True)
        return result

    estimate = None
    if cfg.model is not None:
        if args.world or args.clip or args.llava:
            raise SystemExit("--world/--clip/--llava are for the shapes world; this config names model and data")
        from fisao.memory import campaign_estimate, report

        estimate = campaign_estimate(cfg)
        print(report(estimate), flush=True)
        world, clip, llava, runtime = cfg.data.root, cfg.model.verifier, cfg.model.policy, cfg.model
    else:
        from fisao.models.build import build_clip, build_llava
        from fisao.world.build import build_world

        world = Path(args.world) if args.world else timed("world", build_world, work / "world", cfg.world, progress=False)
        clip, llava, runtime = args.clip, args.llava, None
        if clip is None:
            clip = work / "clip"
            timed("clip", build_clip, world, cfg.clip, clip, progress=False)
        if llava is None:
            llava = work / "llava"
            timed("llava", build_llava, world, clip, cfg.llava, llava, progress=False)
    timed("calibrate", calibration_stage, llava, clip, world, cfg.reward, cfg.rollout, work / "cal",
          progress=False, runtime=runtime)
    rollouts = timed("rollouts", rollout_stage, llava, world, cfg.rollout, 1, work / "rollouts", progress=False,
                     runtime=runtime)
    timed("score", score_stage, work / "rollouts", llava, clip, work / "cal", world, cfg.reward, work / "scores",
          runtime=runtime)
    update = timed("update", update_stage, llava, None, work / "rollouts", work / "scores", world, cfg.lora,
                   cfg.ppo, 1, work / "update", runtime=runtime)
    from fisao.evaluate import evaluate_model

    timed("evaluate", evaluate_model, work / "update" / "model", world, ("chair", "pope"), cfg.eval, work / "eval",
          progress=False, runtime=runtime)
    round_seconds = sum(times[k] for k in ("rollouts", "score", "update", "evaluate"))
    trained = int(update["optimizer_steps"]) * cfg.ppo.minibatch_size * cfg.ppo.grad_accum
    out = {
        "stage_seconds": times, "round_seconds": round(round_seconds, 2),
        "rollouts": rollouts["rollouts"], "rollout_tokens": rollouts["tokens"],
        "rollout_tokens_per_second": rollouts["tokens_per_second"],
        "update_samples_per_second": round(trained / max(update["seconds"], 1e-9), 2),
        "peak_rss_mb": round(peak_rss_mb()), "workdir": str(work),
    }
    if any(v is not None for v in gpu.values()):
        out["peak_gpu_gib"] = gpu
    if estimate is not None:
        out["estimated_peak_gib"] = {k: round(v / GIB, 2) for k, v in estimate.peaks.items()}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
