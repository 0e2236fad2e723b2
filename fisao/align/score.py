"""Scoring a round's rollouts: the verifier's calibration, and per-token rewards from its scores.

The two stages load models and files and ask the verifier for scores; what they compute from
those scores is the pure functions below them:
- `caption_rewards`: one description's mention rewards from its mentions' scores, and
  `caption_token_rewards`: where they sit among its tokens;
- `question_rewards`: the round's yes/no answers' rewards from the scores of the objects asked about;
- `sentence_rewards`: the sentence-level ablation (one reward per description, on its last token);
- `oracle_scores`: ground truth as the scores (`reward.verifier` "oracle");
- `mention_records`, `reward_figures`, `mention_audit`, `claim_figures`: the stage's rows and
  figures; the audit's ground truth is counted, never used in a reward.
"""
from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors.torch import save_file
from torch import Tensor
from transformers import AutoProcessor

from fisao import io
from fisao.align.calibration import Calibration, calibrate, histogram_png, label_mentions
from fisao.align.files import CALIBRATION, FIGURES, HISTOGRAM, REWARDS, TOKEN_REWARDS
from fisao.align.rewards import (
    QUESTION_BASELINES, REPEATS, REWARD_SHAPES, SPANS, NameSlots, claim_reward, decision_spans, last_token_reward, name_slots,
    name_token_ids, place_rewards, token_offsets,
)
from fisao.align.rollout import load_rollouts, sample_rollouts
from fisao.align.sample import rollout_images, rollout_split
from fisao.align.verifier import Verifier, check_vision_tower
from fisao.benchmarks.mentions import Mention, parse_mentions
from fisao.benchmarks.pope import pope_answer
from fisao.coco import load_image
from fisao.config import ModelConfig, RewardConfig, RolloutConfig
from fisao.examples import data_vocabulary, example_truth, is_world, load_examples
from fisao.runtime import load_runtime_policy, runtime_device
from fisao.world.causes import rewards_by_cause, world_facts

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
    labelled = label_mentions(rollouts.texts, truth, verifier.vocab, reward.split_glued)
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

    The same safetensors file holds the round's name slots (`round_name_slots`: `slot_index`,
    `slot_tokens`, `slot_rewards`; none at `reward.level` "sentence"), which `ppo.name_slot_coef` trains on.

    Each JSONL row holds the answer, its mentions (text, category, span, score, reward) and, for
    the audit, whether ground truth says each mention is hallucinated (never used in the reward).
    """
    t0 = time.time()
    rollouts, extra = load_rollouts(rollouts_dir)
    image_ids, kinds, asked = extra["image_id"], extra["kind"], extra["category"]
    examples, index = rollout_images(rollouts_dir, world_dir, image_ids)
    verifier = load_verifier(clip_dir, world_dir, reward, runtime)
    mention_cal, sentence_cal = read_calibration(calibration_dir)
    if reward.verifier == "oracle":
        mention_cal = ORACLE
    truth = example_truth(world_dir, examples, verifier.vocab)  # None: no ground truth (COCO train2014 without instances)
    embeddings = verifier.image_embeddings([load_image(e.image) for e in examples])
    tok = AutoProcessor.from_pretrained(str(policy_dir), trust_remote_code=bool(runtime and runtime.trust_remote_code)).tokenizer
    n, width = rollouts.response_ids.shape
    texts, offsets = zip(*(token_offsets(tok, rollouts.response_ids[r][rollouts.mask[r]].tolist()) for r in range(n)))

    def verify(r: int, categories: list[str]) -> Tensor:
        """(M,) scores of `categories` on row r's image: CLIP's, or ground truth's (reward.verifier)."""
        if reward.verifier == "clip":
            return verifier.score(embeddings[index[r]], categories)
        return oracle_scores(truth[index[r]], categories, image_ids[r])

    questions = [r for r in range(n) if kinds[r] == "question"]  # each asks about one object
    captions = [r for r in range(n) if kinds[r] != "question"]
    q_scores = [float(verify(r, [asked[r]])[0]) for r in questions]
    says_yes = [pope_answer(texts[r]) == "yes" for r in questions]
    q_rewards = question_rewards(q_scores, [asked[r] for r in questions], says_yes, mention_cal, reward)
    described = {r: description_rewards(texts[r], verifier.vocab, functools.partial(verify, r), mention_cal, reward)
                 for r in captions}
    mentions, scores, rewards = ({r: d[i] for r, d in described.items()} for i in range(3))
    rows: list[dict] = [{} for _ in range(n)]
    for r, s, yes, value in zip(questions, q_scores, says_yes, q_rewards):
        present = None if truth[index[r]] is None else asked[r] in truth[index[r]]
        rows[r] = {"row": r, "image_id": image_ids[r], "kind": "question", "category": asked[r], "text": texts[r],
                   "says_yes": yes, "score": round(s, 5), "reward": round(value, 5), "present": present}
    for r in captions:
        rows[r] = {"row": r, "image_id": image_ids[r], "kind": "caption", "text": texts[r],
                   "mentions": mention_records(mentions[r], scores[r], rewards[r], truth[index[r]])}
    slots = NameSlots.build([], len(verifier.vocab.categories))
    if reward.level == "token":
        slots = round_name_slots(texts, offsets, rollouts, captions, mentions, verifier.vocab.categories, verify,
                                 functools.lru_cache(maxsize=None)(functools.partial(name_token_ids, tok, verifier.vocab.categories)),
                                 mention_cal, reward)
        token_rewards = torch.zeros(n, width)
        for r, value in zip(questions, q_rewards):
            spans = decision_spans(texts[r])
            token_rewards[r] = place_rewards(offsets[r], spans, [value] * len(spans), width)
        for r in captions:
            token_rewards[r] = caption_token_rewards(texts[r], offsets[r], mentions[r], rewards[r], reward, width)
    else:
        answer_scores = torch.zeros(0)
        if captions:
            answer_scores = verifier.text_scores(torch.stack([embeddings[index[r]] for r in captions]),
                                                 [texts[r] for r in captions])
        claims = torch.zeros(n)
        claims[questions] = torch.tensor(q_rewards)
        answer_rewards, token_rewards = sentence_rewards(rollouts.mask, claims, captions, answer_scores, sentence_cal,
                                                         reward)
        for r, s in zip(captions, answer_scores.tolist()):
            rows[r]["answer_score"], rows[r]["answer_reward"] = round(s, 5), round(float(answer_rewards[r]), 5)
    audited = [(rw, m["hallucinated"]) for r in captions for rw, m in zip(rewards[r], rows[r]["mentions"])]
    figures = {**reward_figures([rw for r in captions for rw in rewards[r]], token_rewards, rollouts.mask),
               **mention_audit(audited),
               **claim_figures([(value, yes, rows[r]["present"]) for r, yes, value in zip(questions, says_yes, q_rewards)]),
               "name_slots": len(slots.index)}
    known = world_facts(world_dir, rollout_split(rollouts_dir)) if is_world(world_dir) else None
    if known:  # which kinds of hallucination the verifier punishes (fisao/world/causes.py)
        figures.update(rewards_by_cause(((image_ids[r], [(m.category, rw) for m, rw in zip(mentions[r], rewards[r])])
                                         for r in captions), *known))
    out = Path(out)
    with io.atomic_dir(out) as tmp:
        save_file({"token_rewards": token_rewards.contiguous(), "slot_index": slots.index, "slot_tokens": slots.tokens,
                   "slot_rewards": slots.rewards}, str(tmp / TOKEN_REWARDS))
        io.write_jsonl(tmp / REWARDS, rows)
        figures["seconds"] = round(time.time() - t0, 2)
        io.write_json(tmp / FIGURES, figures)
    return figures


def oracle_scores(truth: set[str] | None, categories: Sequence[str], image_id: int) -> Tensor:
    """(M,) ground truth as the verifier's scores of `categories` on image `image_id`: 1.0 present, 0.0 absent.

    truth: the image's categories; None (no ground truth) is a ValueError naming the fix.
    """
    if truth is None:
        raise ValueError(f"reward.verifier 'oracle' needs ground truth, and image {image_id} of the rollout split "
                         "has none: use a split with instances (rollout.split) or reward.verifier 'clip'")
    return torch.tensor([float(c in truth) for c in categories])


def category_rewards(scores: Tensor, categories: Sequence[str], calibration: Calibration,
                     reward: RewardConfig) -> list[float]:
    """(K,) the reward of each of K objects (`categories`, repeats allowed) from its verifier score (K,):
    `reward.shape` against the calibration's (b, w) for its category. A mention's, a yes/no question's
    object's and a name slot candidate's reward all start here."""
    shape = REWARD_SHAPES[reward.shape]
    return [float(shape(s, *calibration.thresholds(c))) for c, s in zip(categories, scores)]


def caption_rewards(mentions: Sequence[Mention], scores: Tensor, calibration: Calibration,
                    reward: RewardConfig) -> list[float]:
    """The M rewards of one description's mentions (the CHAIR parser's) from their verifier scores (M,).

    Each is `reward.shape` of its score against the calibration's (b, w) for its category, then
    `reward.repeats` over the description (by default a repeated category keeps only a penalty).
    """
    categories = [m.category for m in mentions]
    return REPEATS[reward.repeats](categories, category_rewards(scores, categories, calibration, reward))


def description_rewards(text: str, vocab, score: Callable[[list[str]], Tensor], calibration: Calibration,
                        reward: RewardConfig) -> tuple[list[Mention], Tensor, list[float]]:
    """One description's mentions (the CHAIR parser's over `vocab`, glued words split with
    `reward.split_glued`), their scores (M,) from
    `score(categories)` (not called without a mention) and their rewards (M,) (`caption_rewards`)."""
    mentions = parse_mentions(text, vocab, split_glued=reward.split_glued)
    scores = score([m.category for m in mentions]) if mentions else torch.zeros(0)
    return mentions, scores, caption_rewards(mentions, scores, calibration, reward)


def mention_records(mentions: Sequence[Mention], scores: Tensor, rewards: Sequence[float],
                    truth: set[str] | None) -> list[dict]:
    """One JSON record per mention of a description (M mentions, scores (M,), rewards (M,)): its words,
    category, character span, score and reward (to 5 decimals) and, for the audit only, whether the
    image's ground truth `truth` (its categories; None: unknown) says it is hallucinated."""
    return [{"text": m.text, "category": m.category, "start": m.start, "end": m.end, "score": round(s, 5),
             "reward": round(rw, 5), "hallucinated": None if truth is None else m.category not in truth}
            for m, s, rw in zip(mentions, scores.tolist(), rewards)]


def round_name_slots(texts: Sequence[str], offsets: Sequence[Sequence[tuple[int, int]]], rollouts, captions: Sequence[int],
                     mentions: dict[int, list[Mention]], categories: Sequence[str], verify: Callable[[int, list[str]], Tensor],
                     tokens_for: Callable[[str], list[int]], calibration: Calibration, reward: RewardConfig) -> NameSlots:
    """The name slots (fisao/align/rewards.py `name_slots`) of the round's descriptions (rows `captions`):
    every category's reward on each description's image from `verify(row, categories)` (K,)."""
    found = []
    for r in captions:
        if not mentions[r]:
            continue
        rewards = category_rewards(verify(r, list(categories)), categories, calibration, reward)
        ids = rollouts.response_ids[r][rollouts.mask[r]].tolist()
        for t, tokens, slot_rewards in name_slots(texts[r], offsets[r], ids, [(m.start, m.end) for m in mentions[r]],
                                                  [m.category for m in mentions[r]], categories, rewards, tokens_for):
            found.append((r, t, tokens, slot_rewards))
    return NameSlots.build(found, len(categories))


def caption_token_rewards(text: str, offsets: Sequence[tuple[int, int]], mentions: Sequence[Mention],
                          rewards: Sequence[float], reward: RewardConfig, width: int) -> Tensor:
    """(width,) token rewards of one description at `reward.level` "token": each of its M mentions' rewards
    on the tokens (character `offsets` (T,), T <= width) overlapping the mention's `reward.span`
    (its name, or the phrase that led to it), 0 elsewhere."""
    spans = SPANS[reward.span](text, [(m.start, m.end) for m in mentions], reward.span_words)
    return place_rewards(offsets, spans, rewards, width)


def question_rewards(scores: Sequence[float], categories: Sequence[str], says_yes: Sequence[bool],
                     calibration: Calibration, reward: RewardConfig) -> list[float]:
    """The Q rewards of a round's yes/no answers, each asking whether one object is in its image.

    scores (Q,): the verifier's score of the object asked about (category (Q,)) on the image;
    says_yes (Q,): whether the answer says yes. The object's reward is `reward.shape` of its score
    against the calibration's (b, w), less `reward.question_baseline` over the round's Q
    questions; a yes earns it, a no its negative (`claim_reward`).
    """
    objects = torch.tensor(category_rewards(torch.tensor(scores), categories, calibration, reward))
    centred = QUESTION_BASELINES[reward.question_baseline](objects).tolist()
    return [claim_reward(yes, value) for yes, value in zip(says_yes, centred)]


def sentence_rewards(mask: Tensor, answer_rewards: Tensor, captions: Sequence[int], scores: Tensor,
                     calibration: Calibration, reward: RewardConfig) -> tuple[Tensor, Tensor]:
    """The sentence-level ablation: one reward per description, from its whole answer's score, on its last token.

    mask (N, T) bool; answer_rewards (N,): the rewards of the rows that are no descriptions (the
    yes/no answers'; anything at `captions`); captions (C,): the descriptions' rows; scores (C,):
    their whole-answer verifier scores. Returns the answer rewards (N,), the descriptions' set to
    `reward.shape` of their scores against the sentence-level calibration's (b, w), and the token
    rewards (N, T): each row's answer reward on its last valid token.
    """
    answer_rewards = answer_rewards.clone()
    if len(captions):
        answer_rewards[list(captions)] = REWARD_SHAPES[reward.shape](scores, calibration.baseline, calibration.width).float()
    return answer_rewards, last_token_reward(mask, answer_rewards)


def reward_figures(mention_rewards: Sequence[float], token_rewards: Tensor, mask: Tensor) -> dict[str, float]:
    """Figures of a round's rewards: of the descriptions' M mention rewards, their mean and shares above
    and below 0; of the token rewards (N, T), the mean per answer of their sum over the mask (N, T)."""
    n = len(mention_rewards)
    return {"reward_mean": float(torch.tensor(mention_rewards).mean()) if n else 0.0,
            "answer_reward_mean": float((token_rewards * mask).sum(-1).mean()),
            "share_positive": sum(x > 0 for x in mention_rewards) / max(1, n),
            "share_negative": sum(x < 0 for x in mention_rewards) / max(1, n),
            "mentions": n}


def mention_audit(mentions: Sequence[tuple[float, bool | None]]) -> dict[str, float]:
    """Ground truth's figures of a round's description mentions, each (reward, hallucinated or None where
    the image has no ground truth): the hallucinated share of the known ones, the share whose reward
    sign agrees (negative when hallucinated) and how many were known."""
    known = [(rw, h) for rw, h in mentions if h is not None]
    return {"rollout_hallucination_share": sum(h for _, h in known) / max(1, len(known)),
            "verifier_agreement": sum((rw < 0) == h for rw, h in known) / max(1, len(known)),
            "audited_mentions": len(known)}


def claim_figures(claims: Sequence[tuple[float, bool, bool | None]]) -> dict[str, float]:
    """Figures of a round's yes/no answers, each (reward, says yes, object present or None where unknown):
    their number, mean reward, share of yes and agreement with ground truth; {} without questions."""
    if not claims:
        return {}
    known = [(yes, present) for _, yes, present in claims if present is not None]
    return {"questions": len(claims), "question_reward_mean": sum(c[0] for c in claims) / len(claims),
            "question_yes_share": sum(c[1] for c in claims) / len(claims),
            "question_accuracy": sum(y == p for y, p in known) / max(1, len(known))}
