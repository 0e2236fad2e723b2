"""One FiSAO round as functions over directories: roll out, score, update (and calibrate once).

Each stage reads its inputs from paths, writes one output directory atomically and returns a
small dict of figures, so the Prefect tasks around them pass only paths and hashes, and a crash
never leaves a half-written stage behind.

A round's policy is the base model plus LoRA adapters. Round k samples with round k−1's merged
checkpoint (the base model for k = 1), then continues training round k−1's adapters (fresh ones
for k = 1) and writes both its adapters and a merged checkpoint, which is what evaluation and
the next round's rollouts load.
"""
from __future__ import annotations

import random
import time
from pathlib import Path

import torch

from safetensors.torch import load_file, save_file
from transformers import AutoProcessor

from fisao import io
from fisao.align.calibration import Calibration, calibrate, histogram_png, label_mentions
from fisao.align.rewards import SHAPES, last_token_reward, place_rewards, token_offsets
from fisao.align.rollout import load_rollouts, sample_rollouts, save_rollouts
from fisao.align.update import (
    ValueHead, add_lora, load_policy_with_adapter, load_value_head, make_accelerator, merge_and_save, ppo_update,
    save_adapter,
)
from fisao.align.verifier import Verifier, check_vision_tower
from fisao.benchmarks.mentions import parse_mentions
from fisao.benchmarks.vocab import Vocabulary
from fisao.coco import load_image
from fisao.config import LoraConfig, PPOConfig, RewardConfig, RolloutConfig
from fisao.crashpoints import crash_point
from fisao.generate import load_policy
from fisao.world.data import Example, load_split

FIGURES = "figures.json"
CALIBRATION = "calibration.json"
HISTOGRAM = "scores.png"
TOKEN_REWARDS = "token_rewards.safetensors"
REWARDS = "rewards.jsonl"


def world_vocabulary(world_dir: str | Path) -> Vocabulary:
    return Vocabulary.from_file(Path(world_dir) / "vocab.txt")


def load_verifier(clip_dir: str | Path, world_dir: str | Path, cfg: RewardConfig) -> Verifier:
    return Verifier.from_pretrained(clip_dir, world_vocabulary(world_dir), cfg.template)


def calibration_stage(policy_dir: str | Path, clip_dir: str | Path, world_dir: str | Path, reward: RewardConfig,
                      rollout: RolloutConfig, out: str | Path, progress: bool = True) -> dict:
    """Calibrate the verifier on the policy's own answers to `reward.calibration_split` images.

    Writes `calibration.json` (mention-level b, w, AUROC; and the same for whole-answer scores,
    which the sentence-level ablation uses) and `scores.png`, the two score histograms.
    """
    t0 = time.time()
    model, processor = load_policy(policy_dir)
    verifier = load_verifier(clip_dir, world_dir, reward)
    check_vision_tower(model, verifier, reward.require_same_vision, (str(policy_dir), str(clip_dir)))
    examples = load_split(world_dir, reward.calibration_split, limit=reward.calibration_images)
    images = [load_image(e.image) for e in examples]
    rollouts = sample_rollouts(
        model, processor, images, rollout.prompt, reward.calibration_answers, temperature=rollout.temperature,
        top_p=rollout.top_p, max_new_tokens=rollout.max_new_tokens, batch_size=rollout.batch_size,
        seed=rollout.seed + 999_983, progress=progress,
    )
    index = rollouts.image_index.tolist()
    truth = [set(examples[i].objects) for i in index]
    labelled = label_mentions(rollouts.texts, truth, verifier.vocab)
    embeddings = verifier.image_embeddings(images)
    scores = [float(verifier.score(embeddings[index[a]], [m.category])[0]) for a, m, _ in labelled]
    halluc = [h for _, _, h in labelled]
    mention = calibrate(scores, halluc, [m.category for _, m, _ in labelled], reward.per_class)
    # Whole answers: hallucinated when any of its mentions is.
    answer_scores = verifier.text_scores(embeddings[rollouts.image_index], rollouts.texts).tolist()
    bad = [False] * len(rollouts)
    for a, _, h in labelled:
        bad[a] |= h
    sentence = calibrate(answer_scores, bad)
    out = Path(out)
    with io.atomic_dir(out) as tmp:
        io.write_json(tmp / CALIBRATION, {"mention": mention.to_json(), "sentence": sentence.to_json(),
                                          "answers": len(rollouts), "images": len(examples)})
        histogram_png(scores, halluc, mention, tmp / HISTOGRAM)
        figures = {"auroc": mention.auroc, "baseline": mention.baseline, "width": mention.width,
                   "mentions": len(labelled), "hallucinated_share": sum(halluc) / max(1, len(halluc)),
                   "sentence_auroc": sentence.auroc, "seconds": round(time.time() - t0, 2)}
        io.write_json(tmp / FIGURES, figures)
    return figures


def read_calibration(path: str | Path) -> tuple[Calibration, Calibration]:
    """(mention-level, sentence-level) calibration from a calibration directory."""
    data = io.read_json(Path(path) / CALIBRATION)
    return Calibration.from_json(data["mention"]), Calibration.from_json(data["sentence"])


def score_stage(rollouts_dir: str | Path, policy_dir: str | Path, clip_dir: str | Path, calibration_dir: str | Path,
                world_dir: str | Path, reward: RewardConfig, out: str | Path) -> dict:
    """Per-token rewards of one round's rollouts: `token_rewards.safetensors` (N, T) and `rewards.jsonl`.

    Each JSONL row holds the answer, its mentions (text, category, span, score, reward) and, for
    the audit, whether ground truth says each mention is hallucinated (never used in the reward).
    """
    t0 = time.time()
    rollouts, extra = load_rollouts(rollouts_dir)
    verifier = load_verifier(clip_dir, world_dir, reward)
    mention_cal, sentence_cal = read_calibration(calibration_dir)
    by_id = rollout_examples(world_dir, rollouts_dir)
    image_ids = extra["image_id"]
    distinct = sorted(set(image_ids))
    emb = verifier.image_embeddings([load_image(by_id[i].image) for i in distinct])
    emb_of = {image_id: emb[k] for k, image_id in enumerate(distinct)}
    shape = SHAPES[reward.shape]
    tok = AutoProcessor.from_pretrained(str(policy_dir)).tokenizer  # the policy's ids, the policy's tokenizer
    n, width = rollouts.response_ids.shape
    token_rewards = torch.zeros(n, width)
    rows, all_rewards, n_halluc, n_agree = [], [], 0, 0
    for r in range(n):
        ids = rollouts.response_ids[r][rollouts.mask[r]].tolist()
        text, offsets = token_offsets(tok, ids)
        truth = set(by_id[image_ids[r]].objects)
        mentions = parse_mentions(text, verifier.vocab)
        scores = verifier.score(emb_of[image_ids[r]], [m.category for m in mentions]) if mentions else torch.zeros(0)
        rewards = []
        for m, s in zip(mentions, scores):
            b, w = mention_cal.thresholds(m.category)
            rewards.append(float(shape(s, b, w)))
        if reward.level == "token":
            token_rewards[r] = place_rewards(offsets, [(m.start, m.end) for m in mentions], rewards, width)
        records = []
        for m, s, rw in zip(mentions, scores.tolist(), rewards):
            hallucinated = m.category not in truth
            n_halluc += hallucinated
            n_agree += (rw < 0) == hallucinated
            records.append({"text": m.text, "category": m.category, "start": m.start, "end": m.end,
                            "score": round(s, 5), "reward": round(rw, 5), "hallucinated": hallucinated})
        all_rewards += rewards
        rows.append({"row": r, "image_id": image_ids[r], "text": text, "mentions": records})
    if reward.level == "sentence":
        s = verifier.text_scores(torch.stack([emb_of[i] for i in image_ids]), [row["text"] for row in rows])
        answer_reward = shape(s, sentence_cal.baseline, sentence_cal.width)
        token_rewards = last_token_reward(rollouts.mask, answer_reward)
        for row, value, score in zip(rows, answer_reward.tolist(), s.tolist()):
            row["answer_score"], row["answer_reward"] = round(score, 5), round(value, 5)
    n_mentions = len(all_rewards)
    figures = {
        "reward_mean": float(torch.tensor(all_rewards).mean()) if all_rewards else 0.0,
        "answer_reward_mean": float((token_rewards * rollouts.mask).sum(-1).mean()),
        "share_positive": sum(x > 0 for x in all_rewards) / max(1, n_mentions),
        "share_negative": sum(x < 0 for x in all_rewards) / max(1, n_mentions),
        "mentions": n_mentions,
        "rollout_hallucination_share": n_halluc / max(1, n_mentions),
        "verifier_agreement": n_agree / max(1, n_mentions),
    }
    out = Path(out)
    with io.atomic_dir(out) as tmp:
        save_file({"token_rewards": token_rewards.contiguous()}, str(tmp / TOKEN_REWARDS))
        io.write_jsonl(tmp / REWARDS, rows)
        figures["seconds"] = round(time.time() - t0, 2)
        io.write_json(tmp / FIGURES, figures)
    return figures


def round_examples(world_dir: str | Path, cfg: RolloutConfig, round_index: int) -> list[Example]:
    """The images of round `round_index` (from 1): a seeded sample of `cfg.split`, new each round."""
    train = load_split(world_dir, cfg.split)
    if cfg.images_per_round > len(train):
        raise ValueError(f"rollout.images_per_round is {cfg.images_per_round} but the {cfg.split} split has {len(train)} images")
    rng = random.Random(f"fisao-rollouts/{cfg.seed}/{round_index}")
    return sorted(rng.sample(train, cfg.images_per_round), key=lambda e: e.image_id)


def rollout_stage(policy_dir: str | Path, world_dir: str | Path, cfg: RolloutConfig, round_index: int,
                  out: str | Path, progress: bool = True) -> dict:
    """Sample `cfg.n_per_image` answers for each of the round's images with the policy in `policy_dir`."""
    t0 = time.time()
    model, processor = load_policy(policy_dir)
    examples = round_examples(world_dir, cfg, round_index)
    images = [load_image(e.image) for e in examples]
    rollouts = sample_rollouts(
        model, processor, images, cfg.prompt, cfg.n_per_image, temperature=cfg.temperature, top_p=cfg.top_p,
        max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, seed=cfg.seed * 1000 + round_index,
        progress=progress,
    )
    image_ids = [examples[i].image_id for i in rollouts.image_index.tolist()]
    crash_point("rollout:mid", round_index)
    seconds = time.time() - t0
    tokens = int(rollouts.mask.sum())
    figures = {"split": cfg.split, "rollouts": len(rollouts), "tokens": tokens, "seconds": round(seconds, 2),
               "tokens_per_second": round(tokens / max(seconds, 1e-9), 1)}
    # The figures are the completeness marker: written in the same atomic directory as the rollouts.
    with io.atomic_dir(out) as tmp:
        save_rollouts(tmp, rollouts, extra={"image_id": image_ids})
        io.write_json(tmp / FIGURES, figures)
    return figures


def rollout_examples(world_dir: str | Path, rollouts_dir: str | Path) -> dict[int, Example]:
    """The examples of the split the rollouts in `rollouts_dir` were sampled on, by image id."""
    split = io.read_json(Path(rollouts_dir) / FIGURES)["split"]
    return {e.image_id: e for e in load_split(world_dir, split)}


def images_of(examples: dict[int, Example], image_ids: list[int]) -> tuple[list, torch.Tensor]:
    """The distinct images behind `image_ids` and, per id, its index into that list."""
    by_id = examples
    order = sorted(set(image_ids))
    missing = [i for i in order if i not in by_id]
    if missing:
        raise ValueError(f"rollouts refer to image ids {missing[:5]} that their split does not have")
    position = {image_id: k for k, image_id in enumerate(order)}
    return [load_image(by_id[i].image) for i in order], torch.tensor([position[i] for i in image_ids])


def update_stage(base_dir: str | Path, adapter_in: str | Path | None, rollouts_dir: str | Path,
                 scores_dir: str | Path, world_dir: str | Path, lora: LoraConfig, cfg: PPOConfig,
                 round_index: int, out: str | Path) -> dict:
    """PPO on one round's scored rollouts; writes `out/adapter` and the merged `out/model`."""
    t0 = time.time()
    rollouts, extra = load_rollouts(rollouts_dir)
    images, index = images_of(rollout_examples(world_dir, rollouts_dir), extra["image_id"])
    rollouts.image_index = index
    token_rewards = load_token_rewards(Path(scores_dir) / TOKEN_REWARDS, rollouts.response_ids.shape)
    if adapter_in is None:
        base, processor = load_policy(base_dir)
        # LoRA's A matrices are drawn from torch's global RNG: seed it, or a resumed process (which
        # skipped the base-model builds) would start from other adapters than an uninterrupted one.
        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed * 1000 + round_index)
            model = add_lora(base, lora)
        value_head = ValueHead.for_model(model) if cfg.advantage == "gae" else None
    else:
        model, processor = load_policy_with_adapter(base_dir, adapter_in, is_trainable=True)
        value_head = load_value_head(adapter_in, model) if cfg.advantage == "gae" else None
        if cfg.advantage == "gae" and value_head is None:
            value_head = ValueHead.for_model(model)
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + round_index)
    stats = ppo_update(model, processor, images, rollouts, token_rewards, cfg, make_accelerator(cfg, cpu=True),
                       generator, value_head=value_head)
    crash_point("update:mid", round_index)
    out = Path(out)
    with io.atomic_dir(out) as tmp:
        save_adapter(model, tmp / "adapter", value_head)
        merge_and_save(model, processor, tmp / "model")
        crash_point("checkpoint:mid", round_index)
        stats["seconds"] = round(time.time() - t0, 2)
        io.write_json(tmp / FIGURES, stats)
    return stats


def load_token_rewards(path: str | Path, shape: torch.Size) -> torch.Tensor:
    """(N, T) per-token rewards saved by the scoring stage, checked against the rollouts' shape."""
    rewards = load_file(str(path))["token_rewards"]
    if rewards.shape != shape:
        raise ValueError(f"{path} holds rewards of shape {tuple(rewards.shape)} for rollouts of shape {tuple(shape)}")
    return rewards
