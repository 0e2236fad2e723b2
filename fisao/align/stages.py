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

import functools
import random
import time
from pathlib import Path
from typing import Callable

import torch

from safetensors.torch import load_file, save_file
from transformers import AutoProcessor

from fisao import io
from fisao.align.calibration import Calibration, calibrate, histogram_png, label_mentions
from fisao.align.rewards import (
    QUESTION_BASELINES, REPEATS, SHAPES, SPANS, claim_reward, decision_spans, last_token_reward, place_rewards, token_offsets,
)
from fisao.align.backends import BACKENDS
from fisao.align.rollout import batch_seed, concat_rollouts, load_rollouts, sample_rollouts, save_rollouts
from fisao.align.lora import ValueHead, add_lora, load_adapter, load_value_head, merge_and_save, save_adapter
from fisao.align.update import make_accelerator, ppo_update
from fisao.align.verifier import Verifier, check_vision_tower
from fisao.benchmarks.mentions import parse_mentions
from fisao.benchmarks.vocab import Vocabulary
from fisao.benchmarks.pope import pope_answer
from fisao.coco import load_image
from fisao.config import LoraConfig, ModelConfig, PPOConfig, RewardConfig, RolloutConfig
from fisao.crashpoints import crash_point
from fisao.examples import data_vocabulary, example_truth, load_examples
from fisao.runtime import load_runtime_policy, prepare_for_training, runtime_device
from fisao.world.data import Example

FIGURES = "figures.json"
CALIBRATION = "calibration.json"
HISTOGRAM = "scores.png"
TOKEN_REWARDS = "token_rewards.safetensors"
REWARDS = "rewards.jsonl"
# reward.verifier "oracle": ground truth scores 1 (present) or 0 (absent); b = 0.5, w = 0.5 make them ±1.
ORACLE = Calibration(mean_correct=1.0, mean_hallucinated=0.0, baseline=0.5, width=0.5, auroc=1.0,
                     n_correct=0, n_hallucinated=0)


def load_verifier(clip_dir: str | Path, world_dir: str | Path, cfg: RewardConfig, runtime: ModelConfig | None = None) -> Verifier:
    return Verifier.from_pretrained(clip_dir, data_vocabulary(world_dir), cfg.template, device=runtime_device(runtime),
                                    trust_remote_code=bool(runtime and runtime.trust_remote_code))


def calibration_stage(policy_dir: str | Path, clip_dir: str | Path, world_dir: str | Path, reward: RewardConfig,
                      rollout: RolloutConfig, out: str | Path, progress: bool = True,
                      runtime: ModelConfig | None = None) -> dict:
    """Calibrate the verifier on the policy's own answers to `reward.calibration_split` images.

    Writes `calibration.json` (mention-level b, w, AUROC; and the same for whole-answer scores,
    which the sentence-level ablation uses) and `scores.png`, the two score histograms.
    """
    t0 = time.time()
    model, processor = load_runtime_policy(policy_dir, runtime)
    verifier = load_verifier(clip_dir, world_dir, reward, runtime)
    check_vision_tower(model, verifier, reward.require_same_vision, (str(policy_dir), str(clip_dir)))
    examples = load_examples(world_dir, reward.calibration_split, limit=reward.calibration_images, need_objects=True)
    images = [load_image(e.image) for e in examples]
    rollouts = sample_rollouts(
        model, processor, images, rollout.prompt, reward.calibration_answers, temperature=rollout.temperature,
        top_p=rollout.top_p, max_new_tokens=rollout.max_new_tokens, batch_size=rollout.batch_size,
        seed=rollout.seed + 999_983, progress=progress,
    )
    index = rollouts.image_index.tolist()
    truths = example_truth(world_dir, examples, verifier.vocab)
    truth = [truths[i] for i in index]
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
                world_dir: str | Path, reward: RewardConfig, out: str | Path, runtime: ModelConfig | None = None) -> dict:
    """Per-token rewards of one round's rollouts: `token_rewards.safetensors` (N, T) and `rewards.jsonl`.

    Each JSONL row holds the answer, its mentions (text, category, span, score, reward) and, for
    the audit, whether ground truth says each mention is hallucinated (never used in the reward).
    """
    t0 = time.time()
    rollouts, extra = load_rollouts(rollouts_dir)
    verifier = load_verifier(clip_dir, world_dir, reward, runtime)
    mention_cal, sentence_cal = read_calibration(calibration_dir)
    by_id = rollout_examples(world_dir, rollouts_dir)
    truth_of = dict(zip(by_id, example_truth(world_dir, list(by_id.values()), verifier.vocab)))
    image_ids = extra["image_id"]
    distinct = sorted(set(image_ids))
    emb = verifier.image_embeddings([load_image(by_id[i].image) for i in distinct])
    emb_of = {image_id: emb[k] for k, image_id in enumerate(distinct)}
    shape = SHAPES[reward.shape]
    tok = AutoProcessor.from_pretrained(str(policy_dir), trust_remote_code=bool(runtime and runtime.trust_remote_code)).tokenizer
    n, width = rollouts.response_ids.shape
    token_rewards = torch.zeros(n, width)
    kinds = extra.get("kind", ["caption"] * n)
    asked = extra.get("category", [None] * n)
    rows, all_rewards, n_halluc, n_agree, n_known = [], [], 0, 0, 0
    claims: list[tuple[float, bool, bool | None]] = []  # (reward, says yes, object present) of each question
    answer_rewards = torch.zeros(n)
    questions = [r for r in range(n) if kinds[r] == "question"]  # each asks about one object: score, reward
    if reward.verifier == "oracle":
        mention_cal = ORACLE

    def score(image_id: int, categories: list[str]) -> torch.Tensor:
        """(M,) scores of `categories` on image `image_id`: CLIP's, or ground truth's (1 present, 0 absent)."""
        if reward.verifier == "clip":
            return verifier.score(emb_of[image_id], categories)
        truth = truth_of[image_id]
        if truth is None:
            raise ValueError(f"reward.verifier 'oracle' needs ground truth, and image {image_id} of the rollout split "
                             "has none: use a split with instances (rollout.split) or reward.verifier 'clip'")
        return torch.tensor([float(c in truth) for c in categories])

    q_scores = {r: float(score(image_ids[r], [asked[r]])[0]) for r in questions}
    objects = torch.tensor([float(shape(torch.tensor(q_scores[r]), *mention_cal.thresholds(asked[r]))) for r in questions])
    q_rewards = dict(zip(questions, QUESTION_BASELINES[reward.question_baseline](objects).tolist()))
    for r in range(n):
        ids = rollouts.response_ids[r][rollouts.mask[r]].tolist()
        text, offsets = token_offsets(tok, ids)
        truth = truth_of[image_ids[r]]  # None: no ground truth (COCO train2014 without instances)
        if kinds[r] == "question":
            s = q_scores[r]
            says_yes = pope_answer(text) == "yes"
            value = claim_reward(says_yes, q_rewards[r])
            answer_rewards[r] = value
            if reward.level == "token":
                spans = decision_spans(text)
                token_rewards[r] = place_rewards(offsets, spans, [value] * len(spans), width)
            claims.append((value, says_yes, None if truth is None else asked[r] in truth))
            rows.append({"row": r, "image_id": image_ids[r], "kind": "question", "category": asked[r], "text": text,
                         "says_yes": says_yes, "score": round(s, 5), "reward": round(value, 5),
                         "present": claims[-1][2]})
            continue
        mentions, scores, rewards, token_rewards[r] = answer_rewards_of(
            text, offsets, functools.partial(score, image_ids[r]), verifier.vocab, mention_cal, reward, width)
        records = []
        for m, s, rw in zip(mentions, scores.tolist(), rewards):
            hallucinated = None if truth is None else m.category not in truth
            if hallucinated is not None:
                n_known += 1
                n_halluc += hallucinated
                n_agree += (rw < 0) == hallucinated
            records.append({"text": m.text, "category": m.category, "start": m.start, "end": m.end,
                            "score": round(s, 5), "reward": round(rw, 5), "hallucinated": hallucinated})
        all_rewards += rewards
        rows.append({"row": r, "image_id": image_ids[r], "kind": "caption", "text": text, "mentions": records})
    if reward.level == "sentence":
        captions = [k for k in range(n) if kinds[k] != "question"]
        s = torch.zeros(0)
        if captions:
            s = verifier.text_scores(torch.stack([emb_of[image_ids[k]] for k in captions]),
                                     [rows[k]["text"] for k in captions])
            answer_rewards[captions] = shape(s, sentence_cal.baseline, sentence_cal.width).float()
        token_rewards = last_token_reward(rollouts.mask, answer_rewards)
        for k, score in zip(captions, s.tolist()):
            rows[k]["answer_score"], rows[k]["answer_reward"] = round(score, 5), round(float(answer_rewards[k]), 5)
    n_mentions = len(all_rewards)
    figures = {
        "reward_mean": float(torch.tensor(all_rewards).mean()) if all_rewards else 0.0,
        "answer_reward_mean": float((token_rewards * rollouts.mask).sum(-1).mean()),
        "share_positive": sum(x > 0 for x in all_rewards) / max(1, n_mentions),
        "share_negative": sum(x < 0 for x in all_rewards) / max(1, n_mentions),
        "mentions": n_mentions,
        "rollout_hallucination_share": n_halluc / max(1, n_known),
        "verifier_agreement": n_agree / max(1, n_known),
        "audited_mentions": n_known,
        **_claim_figures(claims),
    }
    out = Path(out)
    with io.atomic_dir(out) as tmp:
        save_file({"token_rewards": token_rewards.contiguous()}, str(tmp / TOKEN_REWARDS))
        io.write_jsonl(tmp / REWARDS, rows)
        figures["seconds"] = round(time.time() - t0, 2)
        io.write_json(tmp / FIGURES, figures)
    return figures


def answer_rewards_of(text: str, offsets: list[tuple[int, int]], score: Callable[[list[str]], torch.Tensor],
                      vocab: Vocabulary, calibration: Calibration, reward: RewardConfig, width: int):
    """One description's mentions, their verifier scores (M,), rewards (M,) and token rewards (width,).

    `score(categories)` gives the (M,) verifier scores of categories on the answer's image
    (`functools.partial(verifier.score, image_embedding)` for CLIP). The mentions are the CHAIR
    parser's (over `vocab`); each reward is `reward.shape` of its score against the
    calibration's (b, w), then `reward.repeats`; at `reward.level` "token" the rewards sit on the
    tokens (character `offsets`, from `token_offsets`) of `reward.span`, else the row is all 0
    (the sentence-level reward goes on the last token, from the whole answer's score).
    """
    mentions = parse_mentions(text, vocab)
    scores = score([m.category for m in mentions]) if mentions else torch.zeros(0)
    shape = SHAPES[reward.shape]
    rewards = [float(shape(s, *calibration.thresholds(m.category))) for m, s in zip(mentions, scores)]
    rewards = REPEATS[reward.repeats]([m.category for m in mentions], rewards)
    row = torch.zeros(width)
    if reward.level == "token":
        spans = SPANS[reward.span](text, [(m.start, m.end) for m in mentions], reward.span_words)
        row = place_rewards(offsets, spans, rewards, width)
    return mentions, scores, rewards, row


def _claim_figures(claims: list[tuple[float, bool, bool | None]]) -> dict[str, float]:
    """Figures of a round's yes/no answers: mean reward, share of yes, agreement with ground truth."""
    if not claims:
        return {}
    known = [(yes, present) for _, yes, present in claims if present is not None]
    return {"questions": len(claims), "question_reward_mean": sum(c[0] for c in claims) / len(claims),
            "question_yes_share": sum(c[1] for c in claims) / len(claims),
            "question_accuracy": sum(y == p for y, p in known) / max(1, len(known))}


def round_examples(world_dir: str | Path, cfg: RolloutConfig, round_index: int) -> list[Example]:
    """The images of round `round_index` (from 1): a seeded sample of `cfg.split`, new each round."""
    train = load_examples(world_dir, cfg.split)
    if cfg.images_per_round > len(train):
        raise ValueError(f"rollout.images_per_round is {cfg.images_per_round} but the {cfg.split} split has {len(train)} images")
    rng = random.Random(f"fisao-rollouts/{cfg.seed}/{round_index}")
    return sorted(rng.sample(train, cfg.images_per_round), key=lambda e: e.image_id)


def rollout_stage(policy_dir: str | Path, world_dir: str | Path, cfg: RolloutConfig, round_index: int,
                  out: str | Path, progress: bool = True, runtime: ModelConfig | None = None,
                  shard: tuple[int, int] = (0, 1), backend: str = "hf", device: str | None = None) -> dict:
    """Sample `cfg.n_per_image` answers for each of the round's images with the policy in `policy_dir`.

    shard (index, count): only images index, index + count, … of the round (merge the shards
    with `merge_rollout_shards`); one shard is the whole round, seeded as it always was. A shard's
    answers depend on (index, count) only, not on the process or device that samples it.
    device: where the policy runs (default: the runtime's; one per process under `accelerate launch`).
    """
    t0 = time.time()
    index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"shard {index} of {count} does not exist")
    model, processor = load_runtime_policy(policy_dir, runtime, device)
    examples = round_examples(world_dir, cfg, round_index)[index::count]
    seed = cfg.seed * 1000 + round_index
    if count > 1:
        seed = batch_seed(seed, 1_000_000 + index)
    images = [load_image(e.image) for e in examples]
    sample = functools.partial(BACKENDS[backend], model, processor, temperature=cfg.temperature, top_p=cfg.top_p,
                               max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, progress=progress)
    parts = [sample(images, cfg.prompt, cfg.n_per_image, seed=seed)]
    row_image = parts[0].image_index.tolist()  # each row's index into `examples`
    categories: list[str | None] = [None] * len(row_image)
    if cfg.questions_per_image:
        asked = round_questions([e.image_id for e in examples], data_vocabulary(world_dir).categories,
                                cfg.questions_per_image, cfg.seed, round_index)
        about = [(i, c) for i, cs in enumerate(asked) for c in cs]
        parts.append(sample([images[i] for i, _ in about], [cfg.question_template.format(c) for _, c in about], 1,
                            seed=batch_seed(seed, 2_000_000)))
        row_image += [about[k][0] for k in parts[1].image_index.tolist()]
        categories += [about[k][1] for k in parts[1].image_index.tolist()]
    rollouts = concat_rollouts(parts, torch.tensor(row_image), processor.tokenizer.pad_token_id)
    columns = {"image_id": [examples[i].image_id for i in row_image],
               "kind": ["caption" if c is None else "question" for c in categories], "category": categories}
    crash_point("rollout:mid", round_index)
    seconds = time.time() - t0
    tokens = int(rollouts.mask.sum())
    figures = {"split": cfg.split, "rollouts": len(rollouts), "tokens": tokens, "seconds": round(seconds, 2),
               "tokens_per_second": round(tokens / max(seconds, 1e-9), 1)}
    if count > 1:
        figures["shard"] = [index, count]
    # The figures are the completeness marker: written in the same atomic directory as the rollouts.
    with io.atomic_dir(out) as tmp:
        save_rollouts(tmp, rollouts, extra=columns)
        io.write_json(tmp / FIGURES, figures)
    return figures


def round_questions(image_ids: list[int], categories: list[str], k: int, seed: int, round_index: int) -> list[list[str]]:
    """For each image, `k` distinct categories to ask about, drawn uniformly from `categories`.

    No ground truth is used; the draw depends on (seed, round, image id) only, so it is the same
    whichever shard or process samples the image.
    """
    return [random.Random(f"fisao-questions/{seed}/{round_index}/{image_id}").sample(list(categories), min(k, len(categories)))
            for image_id in image_ids]


def rollout_examples(world_dir: str | Path, rollouts_dir: str | Path) -> dict[int, Example]:
    """The examples of the split the rollouts in `rollouts_dir` were sampled on, by image id."""
    split = io.read_json(Path(rollouts_dir) / FIGURES)["split"]
    return {e.image_id: e for e in load_examples(world_dir, split)}


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
                 round_index: int, out: str | Path, runtime: ModelConfig | None = None, accelerator=None) -> dict:
    """PPO on one round's scored rollouts; writes `out/adapter` and the merged `out/model`.

    Under `accelerate launch` every process runs this with the same arguments: each trains on its
    share of every optimizer step (fisao/align/update.py) and the main process writes `out`.
    """
    t0 = time.time()
    rollouts, extra = load_rollouts(rollouts_dir)
    images, index = images_of(rollout_examples(world_dir, rollouts_dir), extra["image_id"])
    rollouts.image_index = index
    token_rewards = load_token_rewards(Path(scores_dir) / TOKEN_REWARDS, rollouts.response_ids.shape)
    accelerator = accelerator or make_accelerator(cfg, cpu=runtime_device(runtime) == "cpu")
    device = None if runtime is None else str(accelerator.device)
    if adapter_in is None:
        base, processor = load_runtime_policy(base_dir, runtime, device)
        # LoRA's A matrices are random: seeded, so every process, every rerun and a resumed campaign
        # (whose process skipped the base-model builds that drew from the RNG) start from the same ones.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed * 1000 + round_index)
            model = add_lora(base, lora)
        value_head = ValueHead.for_model(model) if cfg.advantage == "gae" else None
    else:
        base, processor = load_runtime_policy(base_dir, runtime, device)
        model = load_adapter(base, adapter_in, is_trainable=True)
        value_head = load_value_head(adapter_in, model) if cfg.advantage == "gae" else None
        if cfg.advantage == "gae" and value_head is None:
            value_head = ValueHead.for_model(model)
    prepare_for_training(model, runtime)
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + round_index)
    stats = ppo_update(model, processor, images, rollouts, token_rewards, cfg, accelerator, generator,
                       value_head=value_head)
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


def load_token_rewards(path: str | Path, shape: torch.Size) -> torch.Tensor:
    """(N, T) per-token rewards saved by the scoring stage, checked against the rollouts' shape."""
    rewards = load_file(str(path))["token_rewards"]
    if rewards.shape != shape:
        raise ValueError(f"{path} holds rewards of shape {tuple(rewards.shape)} for rollouts of shape {tuple(shape)}")
    return rewards
