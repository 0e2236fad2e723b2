"""One FiSAO round, timed: per-stage wall time and peak memory, each against a plain loop measured in the same run.

    python bench/round.py [--config configs/demo.yaml] [--set rollout.images_per_round=64 ...]

    python bench/round.py --world data/world --clip outputs/models/clip-<key> --llava outputs/models/llava-<key>

    python bench/round.py --config configs/llava-1.5-7b.yaml [--set rollout.images_per_round=32 ...]

A config without a `model` section runs on the shapes world, building the world and base models
in a temp directory unless given (`make run` prints their paths). A config with one (real
checkpoints and COCO, as `fisao run` takes it) prints the memory estimate first, then runs the
round on the configured policy, verifier and data with the configured device and dtype, and
reports each stage's peak GPU memory next to the estimate's.

After the round, two plain loops run on the same model, as references measured in the same
process (these machines are noisy: compare the ratios, not the seconds, across runs):
- a plain `model.generate` loop over the rollouts' own images and prompts (the same rows, the same
  batches of `rollout.batch_size`, the same max new tokens, temperature, top-p, top-k 0 and
  suppressed tokens), with the base policy loaded before the clock starts; tokens are counted as
  ours are, each answer up to and including its first EOS. Ours (`tokens_per_s`) is the rollout
  stage's own figure: tokens over the stage's seconds, which hold loading the policy and images,
  sampling, the teacher-forced log-prob forward and decoding; `sampling_s` is the part inside the
  sampler (generate and the log-prob forward). `generate_ratio` = ours / plain.
- a plain forward + backward loop over the update's own micro-batches (the same rows in the same
  order, `ppo.minibatch_size` answers each, cut to their longest answer, `ppo.grad_accum` of them
  per AdamW step at `ppo.lr`, as many steps as the update took), on the same LoRA model (fresh
  adapters seeded as round 1's, gradient checkpointing as the runtime says), its loss the
  model's own cross-entropy on the answer tokens: no reference log-probs, advantages, clipping,
  statistics, grad-norm clipping, saving or merging. Ours (`update_answers_per_s`) is the answers
  the update trained on (steps × minibatch × grad_accum, every epoch) over the update stage's
  seconds (loading to the merged checkpoint written). `update_ratio` = ours / plain.

`peak_rss_mb` is the process's peak resident memory over the round's stages, read before the
plain loops load their own copies of the policy. The last line printed is one JSON object;
nothing is asserted: speed is reported, never tested.
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


def round_inputs(rollouts_dir: Path, world_dir):
    """(rollouts, their extra fields, the round's images, each rollout's image index), read once
    for both plain loops."""
    from fisao.align.rollout import load_rollouts
    from fisao.align.sample import rollout_images
    from fisao.coco import load_image

    rollouts, extra = load_rollouts(rollouts_dir)
    examples, index = rollout_images(rollouts_dir, world_dir, extra["image_id"])
    return rollouts, extra, [load_image(e.image) for e in examples], index


def rollout_batches(inputs, batch_size: int) -> list[tuple[list, list[str]]]:
    """The batches the rollout stage sampled, as (images, prompts): its descriptions, then its
    questions (each part cut into `batch_size` rows, as `sample_rollouts` cuts it)."""
    rollouts, extra, images, index = inputs
    batches = []
    for kind in ("caption", "question"):
        rows = [i for i, k in enumerate(extra["kind"]) if k == kind]
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            batches.append(([images[index[i]] for i in chunk], [rollouts.prompts[i] for i in chunk]))
    return batches


def plain_generate(policy_dir, batches, cfg, runtime) -> dict:
    """A plain sampling loop with `model.generate` over `batches`: {answers, tokens, seconds, tokens_per_s}."""
    import torch

    from fisao.align.rollout import response_mask
    from fisao.generate import banned_token_ids
    from fisao.models.families import chat_prompt
    from fisao.runtime import load_runtime_policy

    model, processor = load_runtime_policy(policy_dir, runtime)
    tok, device = processor.tokenizer, next(model.parameters()).device
    suppress = banned_token_ids(processor)
    torch.manual_seed(cfg.seed)
    answers = tokens = 0
    t = time.perf_counter()
    with torch.no_grad():
        for images, prompts in batches:
            inputs = processor(images=images, text=[chat_prompt(processor, p) for p in prompts], return_tensors="pt",
                               padding=True).to(device)
            seqs = model.generate(**inputs, do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0,
                                  max_new_tokens=cfg.max_new_tokens, suppress_tokens=suppress,
                                  pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            response = seqs[:, inputs["input_ids"].shape[1]:]
            tokens += int(response_mask(response, tok.eos_token_id).sum())
            answers += len(prompts)
    seconds = time.perf_counter() - t
    return {"answers": answers, "tokens": tokens, "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / max(seconds, 1e-9), 1)}


def update_micro_batches(n: int, cfg, round_index: int, steps: int):
    """The update's micro-batches, row indices (minibatch,), in its order: `ppo_update`'s own
    `step_order` from a generator seeded as `update_stage` seeds it, `steps` optimizer steps of
    `grad_accum` micro-batches each (one process)."""
    import itertools

    import torch

    from fisao.align.update import step_order

    generator = torch.Generator().manual_seed(cfg.seed * 1000 + round_index)
    torch.randint(2**62, (1,), generator=generator)  # ppo_update's dropout seed comes first
    return [rows for step in itertools.islice(step_order(n, cfg, generator), steps)
            for rows in step.split(cfg.minibatch_size)]


def plain_update(policy_dir, inputs, cfg, round_index: int, steps: int, runtime) -> dict:
    """A plain LoRA forward + backward loop with AdamW over the update's micro-batches (`inputs`:
    `round_inputs`'s): {answers, optimizer_steps, seconds, answers_per_s}."""
    import torch

    from fisao.align.train import policy_to_train
    from fisao.models.families import chat_prompt
    from fisao.runtime import load_runtime_policy, prepare_for_training, runtime_device

    rollouts, _, images, index = inputs
    base, processor = load_runtime_policy(policy_dir, runtime, runtime_device(runtime))
    model, _ = policy_to_train(base, None, cfg.lora, cfg.ppo, round_index)
    prepare_for_training(model, runtime)
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.ppo.lr, weight_decay=0.0)
    micro = update_micro_batches(len(rollouts), cfg.ppo, round_index, steps)
    model.train()
    t = time.perf_counter()
    for i, rows in enumerate(micro):
        width = int(rollouts.mask[rows].sum(1).max())
        inputs = processor(images=[images[index[r]] for r in rows.tolist()],
                           text=[chat_prompt(processor, rollouts.prompts[r]) for r in rows.tolist()],
                           return_tensors="pt", padding=True).to(device)
        ids, mask = rollouts.response_ids[rows, :width].to(device), rollouts.mask[rows, :width].to(device)
        prompt_labels = torch.full_like(inputs["input_ids"], -100)
        labels = torch.cat([prompt_labels, ids.masked_fill(~mask, -100)], dim=1)
        batch = {**inputs, "input_ids": torch.cat([inputs["input_ids"], ids], dim=1),
                 "attention_mask": torch.cat([inputs["attention_mask"], mask.to(inputs["attention_mask"].dtype)], dim=1)}
        (model(**batch, labels=labels).loss / cfg.ppo.grad_accum).backward()
        if (i + 1) % cfg.ppo.grad_accum == 0:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()  # the last step's kernels, queued, count too
    seconds = time.perf_counter() - t
    answers = sum(len(rows) for rows in micro)
    return {"answers": answers, "optimizer_steps": len(micro) // cfg.ppo.grad_accum, "seconds": round(seconds, 2),
            "answers_per_s": round(answers / max(seconds, 1e-9), 2)}


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

    from fisao.align import backends
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
    sampler, sampling = backends.BACKENDS["hf"], []

    def timed_sampler(*a, **kw):  # the sampler's own share of the rollout stage
        t = time.perf_counter()
        try:
            return sampler(*a, **kw)
        finally:
            sampling.append(time.perf_counter() - t)

    backends.BACKENDS["hf"] = timed_sampler
    try:
        rollouts = timed("rollouts", rollout_stage, llava, world, cfg.rollout, 1, work / "rollouts", progress=False,
                         runtime=runtime)
    finally:
        backends.BACKENDS["hf"] = sampler
    timed("score", score_stage, work / "rollouts", llava, clip, work / "cal", world, cfg.reward, work / "scores",
          runtime=runtime)
    update = timed("update", update_stage, llava, None, work / "rollouts", work / "scores", world, cfg.lora,
                   cfg.ppo, 1, work / "update", runtime=runtime)
    from fisao.evaluate import evaluate_model

    timed("evaluate", evaluate_model, work / "update" / "model", world, ("chair", "pope"), cfg.eval, work / "eval",
          progress=False, runtime=runtime)
    peak = round(peak_rss_mb())  # the round's, before the plain loops load their copies

    inputs = round_inputs(work / "rollouts", world)
    plain_gen = plain_generate(llava, rollout_batches(inputs, cfg.rollout.batch_size), cfg.rollout, runtime)
    steps = int(update["optimizer_steps"])
    trained = steps * cfg.ppo.minibatch_size * cfg.ppo.grad_accum
    plain_upd = plain_update(llava, inputs, cfg, 1, steps, runtime)
    ours_tps = rollouts["tokens_per_second"]
    ours_aps = round(trained / max(update["seconds"], 1e-9), 2)
    generate_ratio = round(ours_tps / plain_gen["tokens_per_s"], 3)
    update_ratio = round(ours_aps / plain_upd["answers_per_s"], 3)
    print(f"rollouts     {ours_tps:8.1f} tokens/s   plain generate loop {plain_gen['tokens_per_s']:8.1f} tokens/s   "
          f"ratio {generate_ratio:.3f}", flush=True)
    print(f"update       {ours_aps:8.2f} answers/s  plain forward+backward {plain_upd['answers_per_s']:8.2f} answers/s   "
          f"ratio {update_ratio:.3f}", flush=True)
    out = {
        "round_s": round(sum(times[k] for k in ("rollouts", "score", "update", "evaluate")), 2),
        "rollouts_s": times["rollouts"], "score_s": times["score"], "update_s": times["update"],
        "eval_s": times["evaluate"], "stage_seconds": times,
        "rollouts": rollouts["rollouts"], "rollout_tokens": rollouts["tokens"], "sampling_s": round(sum(sampling), 2),
        "tokens_per_s": ours_tps, "generate_tokens_per_s": plain_gen["tokens_per_s"], "generate_ratio": generate_ratio,
        "plain_generate": plain_gen,
        "update_answers": trained, "update_stage_s": update["seconds"], "update_answers_per_s": ours_aps,
        "plain_update_answers_per_s": plain_upd["answers_per_s"], "update_ratio": update_ratio,
        "plain_update": plain_upd,
        "peak_rss_mb": peak, "workdir": str(work),
    }
    if any(v is not None for v in gpu.values()):
        out["peak_gpu_gib"] = gpu
    if estimate is not None:
        out["estimated_peak_gib"] = {k: round(v / GIB, 2) for k, v in estimate.peaks.items()}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
