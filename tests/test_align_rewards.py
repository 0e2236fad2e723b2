"""Rewards and calibration: hand-computed values, naive references, and the shared parser."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fisao.align.calibration import Calibration, calibrate, histogram_png, label_mentions
from fisao.align.rewards import (
    QUESTION_BASELINES, REPEATS, REWARD_SHAPES, SPANS, binary, claim_reward, continuous, decision_spans, every_mention, first_mention, last_token_reward, mention_spans,
    phrase_spans, place_rewards, token_offsets,
)
from fisao.benchmarks.mentions import parse_mentions
from fisao.benchmarks.vocab import Vocabulary

VOCAB = Vocabulary.from_lines(["circle, disk", "square", "cross, plus sign", "moon, crescent"])


def test_continuous_and_binary_by_hand():
    s = torch.tensor([0.9, 0.5, 0.4, 0.3, -1.0])
    # b = 0.5, w = 0.2: (s - b) / w = 2, 0, -0.5, -1, -7.5 -> clamped
    assert continuous(s, 0.5, 0.2).tolist() == pytest.approx([1.0, 0.0, -0.5, -1.0, -1.0])
    assert binary(s, 0.5, 0.2).tolist() == [1.0, 0.0, -1.0, -1.0, -1.0]
    assert set(REWARD_SHAPES) == {"continuous", "binary"}


def test_place_rewards_by_hand():
    # tokens:  "a"(0,1) " red"(1,5) " plus"(5,10) " sign"(10,15) " and"(15,19) " disk"(19,24)
    offsets = [(0, 1), (1, 5), (5, 10), (10, 15), (15, 19), (19, 24)]
    out = place_rewards(offsets, [(6, 15), (20, 24)], [-0.5, 0.75], length=8)
    assert out.tolist() == [0, 0, -0.5, -0.5, 0, 0.75, 0, 0]


def _spans_of(text: str) -> list[tuple[int, int]]:
    return [(m.start, m.end) for m in parse_mentions(text, VOCAB)]


def test_phrase_spans_by_hand():
    text = "In this picture, there is a red circle, a blue square and two green plus signs. The red disk is big."
    got = [text[a:b] for a, b in phrase_spans(text, _spans_of(text), words=3)]
    # The first phrase stops 3 words back; a list's comma and "and" belong to the next mention;
    # a sentence end cuts the phrase ("The red disk", not ". The red disk").
    assert got == ["is a red circle", ", a blue square", "and two green plus signs", "The red disk"]
    assert [text[a:b] for a, b in phrase_spans(text, _spans_of(text), words=1)] == [
        "red circle", "blue square", "green plus signs", "red disk"]
    assert phrase_spans(text, _spans_of(text), words=0) == mention_spans(text, _spans_of(text))
    assert set(SPANS) == {"mention", "phrase"}


def test_phrase_spans_never_overlap_and_always_hold_their_mention():
    rng = np.random.default_rng(1)
    names = ["circle", "disk", "square", "plus sign", "moon", "crescent", "tree"]
    fillers = ["a", "and", "red", ",", ".", "the", "is", "two", "!", "big"]
    for _ in range(200):
        text = " ".join(rng.choice(names + fillers, size=int(rng.integers(0, 15))).tolist())
        spans = _spans_of(text)
        phrases = phrase_spans(text, spans, words=int(rng.integers(0, 5)))
        assert len(phrases) == len(spans)
        for (ps, pe), (ms, me) in zip(phrases, spans):
            assert ps <= ms and pe == me
            assert not _SENTENCE_END_IN(text[ps:ms])
        assert all(a[1] <= b[0] for a, b in zip(phrases, phrases[1:]))
    assert phrase_spans("", []) == []


def test_yes_no_claims_by_hand():
    assert decision_spans(" Yes, there is a moon in the image.") == [(1, 4)]
    assert decision_spans("No, there is no moon.") == [(0, 2)]
    assert decision_spans(" ... ") == []
    assert claim_reward(True, 0.7) == 0.7 and claim_reward(False, 0.7) == -0.7
    assert claim_reward(False, -0.4) == 0.4  # "no" about an object the verifier does not see is right


def test_mean_question_baseline_makes_a_constant_answer_earn_nothing():
    # 1 present object (+1) and 3 absent (-1): the verifier's mean is -0.5.
    r = torch.tensor([1.0, -1.0, -1.0, -1.0])
    assert QUESTION_BASELINES["none"](r).tolist() == r.tolist()
    centred = QUESTION_BASELINES["mean"](r)
    assert centred.tolist() == [1.5, -0.5, -0.5, -0.5]
    always_no = sum(claim_reward(False, float(x)) for x in r) / 4
    assert always_no == 0.5  # without a baseline, "no" to everything pays
    assert sum(claim_reward(False, float(x)) for x in centred) == 0.0
    assert sum(claim_reward(True, float(x)) for x in centred) == 0.0
    right = [claim_reward(x > 0, float(c)) for x, c in zip(r, centred)]  # answers that follow the verifier
    assert sum(right) / 4 == 0.75
    assert QUESTION_BASELINES["mean"](torch.zeros(0)).numel() == 0
    # On tokens: the reward sits on the first word only.
    offsets = [(0, 1), (1, 4), (4, 5), (5, 11)]  # " " "Yes" "," " there"
    assert place_rewards(offsets, decision_spans(" Yes, there"), [0.5]).tolist() == [0, 0.5, 0, 0]


def test_repeats_by_hand():
    cats = ["circle", "square", "circle", "square", "moon", "circle"]
    rewards = [0.8, -0.5, 0.8, -0.5, 0.2, 0.8]
    assert every_mention(cats, rewards) == rewards
    # Repeats of a rewarded object earn nothing; a repeated hallucination is penalised again.
    assert first_mention(cats, rewards) == [0.8, -0.5, 0.0, -0.5, 0.2, 0.0]
    assert first_mention([], []) == []
    assert set(REPEATS) == {"each", "first"}
    with pytest.raises(ValueError, match="2 categories but 1 rewards"):
        first_mention(["a", "b"], [1.0])


def _SENTENCE_END_IN(chunk: str) -> bool:
    return any(ch in chunk for ch in ".!?")


def test_a_token_on_two_mentions_takes_the_lower_reward():
    out = place_rewards([(0, 10)], [(0, 4), (5, 10)], [0.8, -0.3])
    assert out.tolist() == pytest.approx([-0.3])
    out = place_rewards([(0, 10)], [(0, 4), (5, 10)], [-0.9, 0.4])
    assert out.tolist() == pytest.approx([-0.9])


def test_place_rewards_matches_a_naive_character_loop():
    rng = np.random.default_rng(0)
    for _ in range(50):
        cuts = np.sort(rng.choice(np.arange(1, 60), size=12, replace=False))
        bounds = [0, *cuts.tolist()]
        offsets = list(zip(bounds[:-1], bounds[1:]))
        spans, rewards = [], []
        for _ in range(rng.integers(0, 4)):
            a = int(rng.integers(0, 55))
            spans.append((a, a + int(rng.integers(1, 6))))
            rewards.append(float(rng.uniform(-1, 1)))
        got = place_rewards(offsets, spans, rewards)
        for t, (s, e) in enumerate(offsets):
            chars = set(range(s, e))
            hits = [r for (ms, me), r in zip(spans, rewards) if chars & set(range(ms, me))]
            assert got[t].item() == pytest.approx(min(hits) if hits else 0.0)


def test_bad_reward_input():
    with pytest.raises(ValueError, match="2 mention spans but 1 rewards"):
        place_rewards([(0, 1)], [(0, 1), (1, 2)], [0.5])
    with pytest.raises(ValueError, match="shorter"):
        place_rewards([(0, 1), (1, 2)], [], [], length=1)


def test_last_token_reward_by_hand():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    out = last_token_reward(mask, torch.tensor([0.5, -1.0, 0.7]))
    assert out.tolist() == [[0, 0, 0.5, 0], [-1.0, 0, 0, 0], [0, 0, 0, 0]]


class ByteTokenizer:
    """A stand-in with the `decode` of a byte-level tokenizer: each id is one byte."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def test_token_offsets_follow_the_ids_and_survive_split_characters():
    text = "a crème disk"
    ids = list(text.encode()) + [300]  # 300: a special token (skipped when decoding)
    decoded, offsets = token_offsets(ByteTokenizer(), ids)
    assert decoded == text
    assert len(offsets) == len(ids)
    e_grave = text.encode().index(0xC3)
    assert offsets[e_grave] == (4, 4)  # first byte of "è": no character yet
    assert offsets[e_grave + 1] == (4, 5)  # the second byte completes it
    assert offsets[-1][0] == offsets[-1][1]  # the special token has no characters
    # Every mention's tokens decode to a string that holds the mention.
    for m in parse_mentions(decoded, VOCAB):
        rows = [t for t, (s, e) in enumerate(offsets) if s < m.end and e > m.start]
        assert m.text in ByteTokenizer().decode([ids[t] for t in rows])


def test_token_offsets_on_a_real_tokenizer(tiny_models):
    from transformers import AutoProcessor

    tok = AutoProcessor.from_pretrained(tiny_models["llava"]).tokenizer
    text = "There are two red circles and a plus sign in the image."
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    decoded, offsets = token_offsets(tok, ids)
    assert decoded == text
    mentions = parse_mentions(decoded, VOCAB)
    assert [m.category for m in mentions] == ["circle", "cross"]
    rewards = place_rewards(offsets, [(m.start, m.end) for m in mentions], [0.5, -1.0])
    for m, r in zip(mentions, (0.5, -1.0)):
        rows = [t for t in range(len(ids)) if rewards[t] == r]
        assert rows and m.text in tok.decode([ids[t] for t in rows])
    assert rewards[-1] == 0  # EOS


def test_calibrate_by_hand():
    scores = [0.6, 0.8, 0.2, 0.4]
    halluc = [False, False, True, True]
    cal = calibrate(scores, halluc)
    # s_c = 0.7, s_h = 0.3 -> b = 0.5, w = 0.2; perfect separation
    assert (cal.mean_correct, cal.mean_hallucinated) == pytest.approx((0.7, 0.3))
    assert (cal.baseline, cal.width) == pytest.approx((0.5, 0.2))
    assert cal.auroc == 1.0 and (cal.n_correct, cal.n_hallucinated) == (2, 2)
    assert cal.thresholds("circle") == pytest.approx((0.5, 0.2))
    assert Calibration.from_json(cal.to_json()) == cal


def test_per_class_calibration_falls_back_to_global():
    scores = [0.9, 0.7, 0.5, 0.3, 0.6]
    halluc = [False, True, False, True, False]
    cats = ["circle", "circle", "square", "square", "moon"]
    cal = calibrate(scores, halluc, cats, per_class=True)
    assert cal.thresholds("circle") == pytest.approx((0.8, 0.1))
    assert cal.thresholds("square") == pytest.approx((0.4, 0.1))
    assert cal.thresholds("moon") == pytest.approx((cal.baseline, cal.width))  # only correct mentions
    assert "moon" not in cal.per_class


def test_calibration_refuses_what_it_cannot_use():
    with pytest.raises(ValueError, match="correct and hallucinated mentions, got 2 and 0"):
        calibrate([0.1, 0.2], [False, False])
    with pytest.raises(ValueError, match="cannot tell them apart"):
        calibrate([0.1, 0.9], [False, True])
    with pytest.raises(ValueError, match="3 scores but 2 labels"):
        calibrate([0.1, 0.2, 0.3], [False, True])


def test_label_mentions_uses_the_shared_parser():
    labelled = label_mentions(["two disks and a plus sign", "a crescent"], [{"circle"}, {"square"}], VOCAB)
    assert [(i, m.category, h) for i, m, h in labelled] == [(0, "circle", False), (0, "cross", True), (1, "moon", True)]


def test_histogram_puts_hallucinated_scores_left_of_the_baseline_and_correct_ones_right(tmp_path):
    cal = calibrate([0.6, 0.8, 0.2, 0.4], [False, False, True, True])  # baseline b = 0.5
    path = histogram_png([0.6, 0.8, 0.2, 0.4], [False, False, True, True], cal, tmp_path / "h.png")
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    # Bars are drawn with alpha 0.6 over white: tab:red (214, 39, 40) -> (230, 125, 126), tab:green -> (128, 198, 128).
    bars = {name: np.nonzero(np.all(np.abs(pixels - rgb) <= 2, axis=-1).sum(0) > 20)[0]  # legend patches are smaller
            for name, rgb in (("red", (230, 125, 126)), ("green", (128, 198, 128)))}
    black = np.nonzero(np.all(pixels == 0, axis=-1).sum(0) > 100)[0]  # vertical black lines: spines and baseline
    assert len(bars["red"]) and len(bars["green"]) and bars["red"].max() < bars["green"].min()
    assert any(bars["red"].max() < x < bars["green"].min() for x in black)  # the baseline between them
