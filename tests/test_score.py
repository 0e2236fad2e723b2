"""The scoring stage's pure functions, by hand: mention, question and sentence-level rewards from
verifier scores, ground truth as scores, the stage's figures; and the round's images read back
from what the rollouts record."""
from __future__ import annotations

import pytest
import torch

from fisao import io
from fisao.align.calibration import Calibration
from fisao.align.files import FIGURES
from fisao.align.sample import rollout_images
from fisao.align.score import (
    description_rewards,
    caption_rewards, caption_token_rewards, claim_figures, mention_audit, mention_records, oracle_scores, question_rewards,
    reward_figures, sentence_rewards,
)
from fisao.align.rewards import NameSlots, name_slots, name_token_ids
from fisao.benchmarks.mentions import parse_mentions
from fisao.benchmarks.vocab import Vocabulary
from fisao.config import RewardConfig

VOCAB = Vocabulary.from_lines(["circle, disk", "square", "cross, plus sign", "moon, crescent"])
# b = 0.5, w = 0.25: a score of 1.0 earns +1 (clamped from 2), 0.625 +0.5, 0.4375 −0.25, 0.25 −1.
CAL = Calibration(mean_correct=0.75, mean_hallucinated=0.25, baseline=0.5, width=0.25, auroc=0.9, n_correct=3,
                  n_hallucinated=3)


def test_caption_rewards_by_hand():
    mentions = parse_mentions("a circle, a square and a disk and a moon", VOCAB)
    assert [m.category for m in mentions] == ["circle", "square", "circle", "moon"]
    scores = torch.tensor([0.625, 0.25, 1.0, 0.4375])
    # continuous: 0.5, -1, 1, -0.25; "first": the repeated circle keeps only a penalty, min(1, 0) = 0
    assert caption_rewards(mentions, scores, CAL, RewardConfig()) == [0.5, -1.0, 0.0, -0.25]
    assert caption_rewards(mentions, scores, CAL, RewardConfig(repeats="each")) == [0.5, -1.0, 1.0, -0.25]
    assert caption_rewards(mentions, scores, CAL, RewardConfig(shape="binary")) == [1.0, -1.0, 0.0, -1.0]
    # per class: the square's own (b, w) = (0, 0.5) make its 0.25 a +0.5
    per_class = Calibration(**{**CAL.to_json(), "per_class": {"square": (0.0, 0.5)}})
    assert caption_rewards(mentions, scores, per_class, RewardConfig()) == [0.5, 0.5, 0.0, -0.25]
    assert caption_rewards([], torch.zeros(0), CAL, RewardConfig()) == []


def test_description_rewards_parse_score_and_reward_one_description():
    asked = []

    def score(categories):
        asked.append(list(categories))
        return torch.tensor([{"circle": 0.625, "square": 0.25, "moon": 0.4375}[c] for c in categories])

    mentions, scores, rewards = description_rewards("a circle, a square and a disk and a moon", VOCAB, score, CAL,
                                                    RewardConfig())
    assert asked == [["circle", "square", "circle", "moon"]]  # one call, every mention in order
    assert [m.category for m in mentions] == ["circle", "square", "circle", "moon"]
    assert scores.tolist() == [0.625, 0.25, 0.625, 0.4375]
    assert rewards == [0.5, -1.0, 0.0, -0.25]  # as caption_rewards by hand above: the repeat keeps min(0.5, 0)
    asked.clear()
    assert description_rewards("nothing here", VOCAB, score, CAL, RewardConfig())[2] == [] and asked == []
    # A glued answer word does not hide a mention from the reward (reward.split_glued, the default);
    # CHAIR's reading (split_glued False) misses the square.
    assert description_rewards("a circle and a squareNo", VOCAB, score, CAL, RewardConfig())[2] == [0.5, -1.0]
    assert description_rewards("a circle and a squareNo", VOCAB, score, CAL, RewardConfig(split_glued=False))[2] == [0.5]


def test_caption_token_rewards_by_hand():
    text = "a red circle and a moon"
    # tokens: "a"(0,1) " red"(1,5) " circle"(5,12) " and"(12,16) " a"(16,18) " moon"(18,23)
    offsets = [(0, 1), (1, 5), (5, 12), (12, 16), (16, 18), (18, 23)]
    mentions = parse_mentions(text, VOCAB)
    on_names = caption_token_rewards(text, offsets, mentions, [0.5, -1.0], RewardConfig(span="mention"), 8)
    assert on_names.tolist() == [0, 0, 0.5, 0, 0, -1.0, 0, 0]
    # "phrase": the words that led to each name since the previous mention ("a red circle", "and a moon")
    on_phrases = caption_token_rewards(text, offsets, mentions, [0.5, -1.0], RewardConfig(span="phrase"), 8)
    assert on_phrases.tolist() == [0.5, 0.5, 0.5, -1.0, -1.0, -1.0, 0, 0]


def test_question_rewards_by_hand():
    scores, categories = [1.0, 0.25, 0.625, 0.4375], ["circle", "square", "moon", "circle"]
    says_yes = [True, True, False, False]
    # object rewards 1, -1, 0.5, -0.25; a yes earns them, a no their negative
    assert question_rewards(scores, categories, says_yes, CAL, RewardConfig(question_baseline="none")) == [
        1.0, -1.0, -0.5, 0.25]
    # "mean": less their mean 0.0625 first: 0.9375, -1.0625, 0.4375, -0.3125
    assert question_rewards(scores, categories, says_yes, CAL, RewardConfig(question_baseline="mean")) == [
        0.9375, -1.0625, -0.4375, 0.3125]
    assert question_rewards([], [], [], CAL, RewardConfig()) == []


def test_sentence_rewards_put_each_answers_reward_on_its_last_token():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    claims = torch.tensor([0.0, 0.75, 0.0])  # row 1 is a yes/no answer, rows 0 and 2 descriptions
    answer, tokens = sentence_rewards(mask, claims, [0, 2], torch.tensor([0.625, 0.25]), CAL, RewardConfig())
    assert answer.tolist() == [0.5, 0.75, -1.0]
    assert tokens.tolist() == [[0, 0, 0.5, 0], [0, 0.75, 0, 0], [0, 0, 0, -1.0]]
    assert claims.tolist() == [0.0, 0.75, 0.0]  # the input is left alone
    answer, tokens = sentence_rewards(mask, claims, [0, 2], torch.tensor([0.625, 0.25]), CAL,
                                      RewardConfig(shape="binary"))
    assert answer.tolist() == [1.0, 0.75, -1.0]
    answer, tokens = sentence_rewards(mask[1:2], claims[1:2], [], torch.zeros(0), CAL, RewardConfig())
    assert tokens.tolist() == [[0, 0.75, 0, 0]]


def test_oracle_scores_are_ground_truth_and_need_it():
    assert oracle_scores({"circle", "moon"}, ["circle", "square", "moon"], 7).tolist() == [1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="image 7 of the rollout split has none"):
        oracle_scores(None, ["circle"], 7)


def test_mention_records_label_each_mention_with_ground_truth_for_the_audit():
    text = "a circle and a crescent"
    mentions = parse_mentions(text, VOCAB)
    records = mention_records(mentions, torch.tensor([0.625, 0.1234567]), [0.5, -1.0], {"circle", "square"})
    assert records == [
        {"text": "circle", "category": "circle", "start": 2, "end": 8, "score": 0.625, "reward": 0.5,
         "hallucinated": False},
        {"text": "crescent", "category": "moon", "start": 15, "end": 23, "score": 0.12346, "reward": -1.0,
         "hallucinated": True}]
    assert [r["hallucinated"] for r in mention_records(mentions, torch.zeros(2), [0.0, 0.0], None)] == [None, None]


def test_figures_by_hand():
    tokens = torch.tensor([[0.5, 2.0, 9.0], [-1.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    # answers' sums over the mask: 2.5 and -1 (the 9 is padding)
    assert reward_figures([0.5, -1.0, 0.0, 1.0], tokens, mask) == {
        "reward_mean": 0.125, "answer_reward_mean": 0.75, "share_positive": 0.5, "share_negative": 0.25, "mentions": 4}
    assert reward_figures([], torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool)) == {
        "reward_mean": 0.0, "answer_reward_mean": 0.0, "share_positive": 0.0, "share_negative": 0.0, "mentions": 0}
    # known: 2 of 4 hallucinated; the reward's sign agrees on the first two only; the None is not counted
    audit = mention_audit([(0.5, False), (-1.0, True), (-0.25, False), (1.0, True), (0.3, None)])
    assert audit == {"rollout_hallucination_share": 0.5, "verifier_agreement": 0.5, "audited_mentions": 4}
    assert mention_audit([(0.3, None)]) == {"rollout_hallucination_share": 0.0, "verifier_agreement": 0.0,
                                            "audited_mentions": 0}
    claims = claim_figures([(0.5, True, True), (-0.25, True, False), (0.75, False, None)])
    assert claims == {"questions": 3, "question_reward_mean": pytest.approx(1.0 / 3),
                      "question_yes_share": pytest.approx(2 / 3), "question_accuracy": 0.5}
    assert claim_figures([]) == {}


def test_rollout_images_come_from_the_split_and_ids_the_rollouts_record(tmp_path):
    coco = tmp_path / "coco"
    (coco / "train2014").mkdir(parents=True)
    for image_id in (9, 25, 30):
        (coco / "train2014" / f"COCO_train2014_{image_id:012d}.jpg").write_bytes(b"")
    rollouts = tmp_path / "rollouts"
    rollouts.mkdir()
    io.write_json(rollouts / FIGURES, {"split": "train", "rollouts": 5})
    examples, index = rollout_images(rollouts, coco, [25, 9, 9, 25, 9])
    assert [e.image_id for e in examples] == [9, 25]  # distinct, sorted; 30 was not sampled
    assert [e.image.name for e in examples] == ["COCO_train2014_000000000009.jpg", "COCO_train2014_000000000025.jpg"]
    assert index == [1, 0, 0, 1, 0]
    with pytest.raises(ValueError, match=r"image ids \[7\] that the train split of .* does not have"):
        rollout_images(rollouts, coco, [9, 7])
    io.write_json(rollouts / FIGURES, {"split": "val", "rollouts": 5})  # the split is read, not assumed
    with pytest.raises(FileNotFoundError, match="val2014 does not exist"):
        rollout_images(rollouts, coco, [9])


def test_name_slots_by_hand():
    """A slot at the first token of each category's first mention, with every name's reward."""
    text = "a red circle, a disk and a moon. the circle"
    # tokens: "a"(0,1) " red"(1,5) " circle"(5,12) ","(12,13) " a"(13,15) " disk"(15,20) " and"(20,24)
    #         " a"(24,26) " moon"(26,31) "."(31,32) " the"(32,36) " circle"(36,43)
    offsets = [(0, 1), (1, 5), (5, 12), (12, 13), (13, 15), (15, 20), (20, 24), (24, 26), (26, 31), (31, 32),
               (32, 36), (36, 43)]
    ids = [1, 2, 10, 3, 4, 14, 5, 4, 13, 6, 7, 10]
    categories = ["circle", "square", "cross", "moon"]
    tokens = {" ": [10, 11, 12, 13], "": [20, 21, -1, 23]}
    mentions = parse_mentions(text, VOCAB)
    assert [m.category for m in mentions] == ["circle", "circle", "moon", "circle"]
    rewards = [0.5, -1.0, -0.25, 0.8]
    slots = name_slots(text, offsets, ids, [(m.start, m.end) for m in mentions], [m.category for m in mentions],
                       categories, rewards, tokens.__getitem__)
    # "circle" at token 2: every name's reward; "disk" is a repeat (no slot); "moon" at token 8: the circle was
    # named before it, so it is no candidate there; the final "circle" is a repeat too.
    assert slots == [(2, [10, 11, 12, 13], [0.5, -1.0, -0.25, 0.8]), (8, [-1, 11, 12, 13], [0.0, -1.0, -0.25, 0.8])]
    # A first mention written as a synonym with its own token ("disk" as the circle's first) gives no slot,
    # nor does one whose token is not its category's candidate; a candidate -1 earns 0.
    assert name_slots("a disk", [(0, 1), (1, 6)], [1, 14], [(2, 6)], ["circle"], categories, rewards,
                      tokens.__getitem__) == []
    # a slot where no candidate earns a positive reward (every object there already named) is left out
    assert name_slots("a moon and a cross", [(0, 1), (1, 6), (6, 10), (10, 12), (12, 18)], [1, 13, 5, 4, 12],
                      [(2, 6), (13, 18)], ["moon", "cross"], categories, [-0.5, -1.0, -0.25, 0.8],
                      tokens.__getitem__) == [(1, [10, 11, 12, 13], [-0.5, -1.0, -0.25, 0.8])]
    glued = name_slots("a redcircle", [(0, 1), (1, 5), (5, 11)], [1, 2, 20], [(5, 11)], ["circle"], categories,
                       rewards, tokens.__getitem__)
    assert glued == [(2, [20, 21, -1, 23], [0.5, -1.0, 0.0, 0.8])]


def test_name_token_ids_on_a_real_tokenizer(tiny_models):
    from transformers import AutoProcessor

    from fisao.examples import data_vocabulary

    tok = AutoProcessor.from_pretrained(str(tiny_models["llava"])).tokenizer
    categories = list(data_vocabulary(tiny_models["world"]).categories)
    ids = name_token_ids(tok, categories, " ")
    firsts = [tok.encode(" " + c, add_special_tokens=False)[0] for c in categories]
    # each candidate is the name's own first token, or -1 where that token is the space alone
    assert all(i == f if i >= 0 else tok.decode([f]).strip() == "" for i, f in zip(ids, firsts)), (ids, firsts)
    assert sum(i >= 0 for i in ids) >= len(categories) // 2 and len({i for i in ids if i >= 0}) == sum(i >= 0 for i in ids)
    # two names that share their first token cannot be told apart there: both are left out
    named = categories[ids.index(next(i for i in ids if i >= 0))]
    assert name_token_ids(tok, [named, named], " ") == [-1, -1]


def test_name_slots_pack_and_pick_by_rows():
    slots = NameSlots.build([(0, 2, [10, 11], [0.5, -1.0]), (3, 1, [10, -1], [1.0, 0.0]), (3, 4, [10, 11], [0.0, 0.25])], 2)
    assert slots.index.tolist() == [[0, 2], [3, 1], [3, 4]] and slots.tokens.dtype == torch.long
    picked = slots.of_rows(torch.tensor([5, 3]))  # row 3 is position 1 of the micro-batch
    assert picked.index.tolist() == [[1, 1], [1, 4]] and picked.rewards.tolist() == [[1.0, 0.0], [0.0, 0.25]]
    empty = NameSlots.build([], 4)
    assert empty.index.shape == (0, 2) and empty.tokens.shape == (0, 4) and empty.of_rows(torch.tensor([0])).index.shape == (0, 2)
