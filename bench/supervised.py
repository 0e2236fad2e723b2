"""How far LoRA on the language model gets with the truth itself: a bound for a shapes world's cut.

    python bench/supervised.py --world data/world --llava outputs/models/llava-<key> [--images 768] [--epochs 2]
        [--lr 1e-3] [--config configs/demo.yaml] [--split val] [--out DIR]

FiSAO's rounds teach the policy from its own verifier, through LoRA adapters on its language model
(the vision tower frozen). This trains the same adapters (the config's `lora` section, seeded as
round 1's) with plain cross-entropy on what FiSAO never sees: the world's ground-truth captions of
`--images` images of the rollout pool (`rollout.split`, drawn with seed 0), answering
`rollout.prompt`, `ppo.minibatch_size` captions per AdamW step at `--lr`, `--epochs` passes. Then it
evaluates the base policy and the merged supervised one with the config's `eval` section on
`--split` (val by default: a bound to reason with, not a figure to report on test). If the truth
itself moves CHAIR_i little, the rounds cannot be expected to: the policy sees no better than its
frozen vision features let it (docs/method.md, "Why the cut is small").

Prints both evaluations and the changes; the last line is JSON.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fisao.localstate import OFFLINE  # noqa: E402

KEYS = ("chair_i", "chair_s", "recall", "pope_adversarial_f1", "pope_random_f1")


def caption_batches(examples, processor, prompt: str, batch_size: int, epochs: int, seed: int):
    """Per step: (images, the processor's prompt inputs, answer ids (B, T) with EOS, mask (B, T)); the
    answers are a random one of each image's captions, read as the base LLaVA was trained on them
    (" " + caption, then EOS)."""
    import torch

    from fisao.coco import load_image
    from fisao.models.families import chat_prompt

    tok, rng = processor.tokenizer, random.Random(seed)
    order_rng = torch.Generator().manual_seed(seed)
    text = chat_prompt(processor, prompt)
    for _ in range(epochs):
        order = torch.randperm(len(examples), generator=order_rng).tolist()
        for start in range(0, len(order) - batch_size + 1, batch_size):
            rows = [examples[i] for i in order[start : start + batch_size]]
            answers = [tok(" " + rng.choice(e.captions), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                       for e in rows]
            width = max(map(len, answers))
            ids = torch.tensor([a + [tok.pad_token_id] * (width - len(a)) for a in answers])
            mask = torch.tensor([[1] * len(a) + [0] * (width - len(a)) for a in answers])
            images = [load_image(e.image) for e in rows]
            yield processor(images=images, text=[text] * len(rows), return_tensors="pt", padding=True), ids, mask


def train_supervised(llava_dir, world_dir, cfg, images: int, epochs: int, lr: float, out: Path, progress: bool) -> dict:
    """Train, merge and save to `out`; {steps, seconds, loss_first, loss_last}."""
    import torch

    from fisao.align.lora import merge_and_save
    from fisao.align.train import policy_to_train
    from fisao.generate import load_policy
    from fisao.progress import bar
    from fisao.world.data import load_split

    pool = load_split(world_dir, cfg.rollout.split)
    if images > len(pool):
        raise SystemExit(f"--images {images}: the {cfg.rollout.split} split has {len(pool)} images")
    examples = sorted(random.Random(0).sample(pool, images), key=lambda e: e.image_id)
    base, processor = load_policy(llava_dir)
    model, _ = policy_to_train(base, None, cfg.lora, cfg.ppo, 1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    batch = cfg.ppo.minibatch_size
    steps = epochs * (images // batch)
    if steps == 0:
        raise SystemExit(f"--images {images} is fewer than one step of ppo.minibatch_size {batch}")
    losses, start = [], time.perf_counter()
    model.train()
    for inputs, ids, mask in bar(caption_batches(examples, processor, cfg.rollout.prompt, batch, epochs, cfg.ppo.seed),
                                 "supervised LoRA", enabled=progress, total=steps):
        labels = torch.cat([torch.full_like(inputs["input_ids"], -100), ids.masked_fill(mask == 0, -100)], dim=1)
        full = {**inputs, "input_ids": torch.cat([inputs["input_ids"], ids], 1),
                "attention_mask": torch.cat([inputs["attention_mask"], mask.to(inputs["attention_mask"].dtype)], 1)}
        loss = model(**full, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
    model.eval()
    merge_and_save(model, processor, out)
    return {"steps": len(losses), "seconds": round(time.perf_counter() - start, 2),
            "loss_first": round(losses[0], 4), "loss_last": round(sum(losses[-10:]) / len(losses[-10:]), 4)}


def main() -> int:
    import os

    os.environ.update(OFFLINE)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", required=True, help="the world directory (fisao world build)")
    p.add_argument("--llava", required=True, help="the base LLaVA directory (outputs/models/llava-<key>)")
    p.add_argument("--config", default="configs/demo.yaml", help="whose lora, ppo.minibatch_size, rollout and eval to use")
    p.add_argument("--images", type=int, default=768, help="captioned images of the rollout pool (768: three rounds' images)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--split", default="val", help="the split both policies are evaluated on")
    p.add_argument("--out", default=None, help="where the supervised policy and both evaluations go (default: a temp dir)")
    args = p.parse_args()
    if args.images < 1 or args.epochs < 1 or not args.lr > 0:
        p.error("--images and --epochs must be at least 1 and --lr positive")

    from fisao.config import load_config
    from fisao.evaluate import evaluate_model

    cfg = load_config(args.config)
    eval_cfg = cfg.eval.model_copy(update={"split": args.split})
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="fisao-supervised-"))
    trained = train_supervised(args.llava, args.world, cfg, args.images, args.epochs, args.lr, out / "policy", True)
    figures = {name: evaluate_model(model, args.world, ("chair", "pope"), eval_cfg, out / f"eval-{name}")
               for name, model in (("base", args.llava), ("supervised", out / "policy"))}
    base, sup = figures["base"], figures["supervised"]
    print(f"supervised LoRA: {args.images} images x {args.epochs} epochs, {trained['steps']} steps at lr {args.lr} "
          f"({trained['seconds']} s; loss {trained['loss_first']} -> {trained['loss_last']}); {args.split} split")
    for k in KEYS:
        print(f"  {k:22s} {base[k]:.3f} -> {sup[k]:.3f}")
    cut = (sup["chair_i"] - base["chair_i"]) / base["chair_i"] if base["chair_i"] else None
    print(f"  CHAIR_i change {cut:+.1%}" if cut is not None else "  CHAIR_i change: the base names nothing wrong")
    print(json.dumps({"images": args.images, "epochs": args.epochs, "lr": args.lr, "split": args.split, **trained,
                      "base": {k: round(base[k], 4) for k in KEYS}, "supervised": {k: round(sup[k], 4) for k in KEYS},
                      "chair_i_change": None if cut is None else round(cut, 4), "out": str(out)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
