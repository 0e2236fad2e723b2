"""The verifier on the tiny CLIP, and one FiSAO round's stages on the tiny models."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from transformers import AutoProcessor

from fisao.align.files import REWARDS, TOKEN_REWARDS
from fisao.align.sample import round_questions, rollout_stage
from fisao.align.score import calibration_stage, read_calibration, score_stage
from fisao.align.train import update_stage
from fisao.align.rewards import decision_spans, token_offsets
from fisao.align.rollout import load_rollouts
from fisao.align.verifier import Verifier, check_vision_tower
from fisao.benchmarks.vocab import Vocabulary
from fisao.coco import load_image
from fisao.config import load_config
from fisao.generate import load_policy
from fisao.world.data import load_split


@pytest.fixture(scope="module")
def verifier(tiny_models):
    return Verifier.from_pretrained(tiny_models["clip"], Vocabulary.from_file(tiny_models["world"] / "vocab.txt"))


def test_text_embeddings_are_computed_once(tiny_models, monkeypatch):
    vocab = Vocabulary.from_file(tiny_models["world"] / "vocab.txt")
    v = Verifier.from_pretrained(tiny_models["clip"], vocab)
    calls = []
    original = v.model.get_text_features
    monkeypatch.setattr(v.model, "get_text_features", lambda **kw: calls.append(1) or original(**kw))
    images = [load_image(e.image) for e in load_split(tiny_models["world"], "test", limit=3)]
    emb = v.image_embeddings(images)
    assert emb.shape == (3, v.text_embeddings.shape[1])
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    s = v.score(emb[0], ["circle", "moon", "circle"])
    assert s.shape == (3,) and s[0] == s[2]
    assert torch.allclose(v.category_scores(emb)[0, vocab.categories.index("moon")], s[1])
    assert calls == []  # scoring mentions never runs the text tower again
    with pytest.raises(ValueError, match="not in the verifier's vocabulary"):
        v.score(emb[0], ["zebra"])


def test_the_tiny_policy_sees_with_the_verifiers_eyes(tiny_models, verifier):
    policy, _ = load_policy(tiny_models["llava"])
    assert check_vision_tower(policy, verifier, require_equal=True, names=("llava", "clip"))
    with torch.no_grad():
        next(policy.model.vision_tower.parameters()).add_(1e-3)
    with pytest.warns(UserWarning, match="first differing tensor"):
        assert not check_vision_tower(policy, verifier, require_equal=False, names=("llava", "clip"))
    with pytest.raises(ValueError, match="llava is not the vision model of the verifier clip"):
        check_vision_tower(policy, verifier, require_equal=True, names=("llava", "clip"))


def test_one_round_of_stages_on_tiny_models(tiny_models, tmp_path):
    cfg = load_config(None, {"rollout.images_per_round": 6, "rollout.n_per_image": 2, "rollout.questions_per_image": 0,
                             "rollout.max_new_tokens": 16,
                             "reward.calibration_images": 16, "reward.calibration_answers": 4, "ppo.minibatch_size": 4})
    world, clip, llava = tiny_models["world"], tiny_models["clip"], tiny_models["llava"]
    cal = calibration_stage(llava, clip, world, cfg.reward, cfg.rollout, tmp_path / "cal", progress=False)
    assert (tmp_path / "cal" / "scores.png").read_bytes()[:4] == b"\x89PNG"
    assert 0 <= cal["auroc"] <= 1

    r = rollout_stage(llava, world, cfg.rollout, 1, tmp_path / "rollouts", progress=False)
    assert r["rollouts"] == 12 and r["split"] == "pretrain"
    s = score_stage(tmp_path / "rollouts", llava, clip, tmp_path / "cal", world, cfg.reward, tmp_path / "scores")
    rewards = load_file(str(tmp_path / "scores" / TOKEN_REWARDS))["token_rewards"]
    rows = [json.loads(line) for line in (tmp_path / "scores" / REWARDS).read_text().splitlines()]
    assert rewards.shape[0] == 12 and len(rows) == 12
    n_mentions = sum(len(row["mentions"]) for row in rows)
    assert s["mentions"] == n_mentions
    # The world's causes (fisao/world/causes.py) over the first mention of each category of a description.
    firsts = [next(m for m in row["mentions"] if m["category"] == c)
              for row in rows for c in dict.fromkeys(m["category"] for m in row["mentions"])]
    wrong = [m for m in firsts if m["hallucinated"]]
    assert sum(s[f"share_{c}"] for c in ("lookalike", "pair", "other")) == pytest.approx(len(wrong) / len(firsts))
    right = [m["reward"] for m in firsts if not m["hallucinated"]]
    if right:
        assert s["reward_correct"] == pytest.approx(sum(right) / len(right), abs=1e-4)
    for row, token_row in zip(rows, rewards):
        for m in row["mentions"]:
            assert row["text"][m["start"]:m["end"]] == m["text"] and -1 <= m["reward"] <= 1
            assert m["reward"] == 0 or ((token_row - m["reward"]).abs() < 1e-4).any()
        if not row["mentions"]:
            assert not token_row.any()

    # Yes/no questions about random objects: the claim's reward sits on the answer's first word.
    q_cfg = cfg.rollout.model_copy(update={"questions_per_image": 3})
    r2 = rollout_stage(llava, world, q_cfg, 1, tmp_path / "rollouts-q", progress=False)
    assert r2["rollouts"] == 12 + 18
    s2 = score_stage(tmp_path / "rollouts-q", llava, clip, tmp_path / "cal", world, cfg.reward,
                     tmp_path / "scores-q")
    rows2 = [json.loads(line) for line in (tmp_path / "scores-q" / REWARDS).read_text().splitlines()]
    rewards2 = load_file(str(tmp_path / "scores-q" / TOKEN_REWARDS))["token_rewards"]
    assert [r["text"] for r in rows2[:12]] == [r["text"] for r in rows]  # the captions are unchanged
    questions = [r for r in rows2 if r["kind"] == "question"]
    rollouts_q, _ = load_rollouts(tmp_path / "rollouts-q")
    tok = AutoProcessor.from_pretrained(str(llava)).tokenizer
    assert len(questions) == 18 and s2["questions"] == 18
    truth = {e.image_id: set(e.objects) for e in load_split(world, "pretrain")}
    cal_b, cal_w = read_calibration(tmp_path / "cal")[0].thresholds("circle")
    object_rewards = [max(-1.0, min(1.0, (q["score"] - cal_b) / cal_w)) for q in questions]
    # reward.question_baseline (the default, "mean"): each object reward minus their mean over the round's questions
    assert cfg.reward.question_baseline == "mean"
    baseline = sum(object_rewards) / len(object_rewards)
    for q, object_reward in zip(questions, object_rewards):
        rounding = 2e-5 / cal_w + 1e-5  # the rows hold scores and rewards rounded to 5 decimals
        claim = object_reward - baseline
        assert q["reward"] == pytest.approx(claim if q["says_yes"] else -claim, abs=rounding)
        assert q["present"] == (q["category"] in truth[q["image_id"]])
        ids = rollouts_q.response_ids[q["row"]][rollouts_q.mask[q["row"]]].tolist()
        text, offsets = token_offsets(tok, ids)
        first = decision_spans(text)
        on = [t for t, (a, b) in enumerate(offsets) if first and a < first[0][1] and b > first[0][0]]
        assert rewards2[q["row"]][on].tolist() == pytest.approx([q["reward"]] * len(on), abs=1e-4)
        assert not rewards2[q["row"]][[t for t in range(rewards2.shape[1]) if t not in on]].any()
    assert len({(q["image_id"], q["category"]) for q in questions}) == 18  # 3 distinct objects per image

    # reward.question_baseline "mean": each question's object reward less the round's mean of them.
    centred_cfg = cfg.reward.model_copy(update={"question_baseline": "mean"})
    score_stage(tmp_path / "rollouts-q", llava, clip, tmp_path / "cal", world, centred_cfg, tmp_path / "scores-c")
    rows3 = [json.loads(line) for line in (tmp_path / "scores-c" / REWARDS).read_text().splitlines()]
    q3 = [r for r in rows3 if r["kind"] == "question"]
    objects = [max(-1.0, min(1.0, (q["score"] - cal_b) / cal_w)) for q in questions]
    mean = sum(objects) / len(objects)
    assert abs(mean) > 0.05  # the test below would not tell the two apart at a zero mean
    for q, o, c in zip(questions, objects, q3):
        assert c["score"] == q["score"] and c["says_yes"] == q["says_yes"]
        assert c["reward"] == pytest.approx((o - mean) if c["says_yes"] else -(o - mean), abs=2 * rounding)
    assert [r["mentions"] for r in rows3[:12]] == [r["mentions"] for r in rows2[:12]]  # descriptions unchanged

    # reward.verifier "oracle": ground truth scores each mention 1 (present) or 0 (absent), so
    # every first mention earns +1 or -1; the questions' object rewards are ±1 less their mean.
    oracle_cfg = cfg.reward.model_copy(update={"verifier": "oracle"})
    s4 = score_stage(tmp_path / "rollouts-q", llava, clip, tmp_path / "cal", world, oracle_cfg,
                     tmp_path / "scores-o")
    rows4 = [json.loads(line) for line in (tmp_path / "scores-o" / REWARDS).read_text().splitlines()]
    mentions4 = [m for r in rows4 if r["kind"] == "caption" for m in r["mentions"]]
    assert mentions4 and s4["verifier_agreement"] == 1.0
    assert any(m["hallucinated"] for m in mentions4) and not all(m["hallucinated"] for m in mentions4)
    for row in rows4[:12]:
        seen = set()
        for m in row["mentions"]:
            assert m["score"] == (0.0 if m["hallucinated"] else 1.0)
            assert m["reward"] == (-1.0 if m["hallucinated"] else (0.0 if m["category"] in seen else 1.0))
            seen.add(m["category"])
    q4 = [r for r in rows4 if r["kind"] == "question"]
    objects = [1.0 if q["present"] else -1.0 for q in q4]
    mean = sum(objects) / len(objects)
    for q, o in zip(q4, objects):
        assert q["reward"] == pytest.approx((o - mean) if q["says_yes"] else -(o - mean), abs=1e-5)
    with pytest.raises(ValueError, match="use one or the other"):
        load_config(None, {"reward.verifier": "oracle", "reward.level": "sentence"})

    before = {k: v.clone() for k, v in load_policy(llava)[0].model.vision_tower.state_dict().items()}
    u = update_stage(llava, None, tmp_path / "rollouts-q", tmp_path / "scores-q", world, cfg.lora, cfg.ppo, 1,
                     tmp_path / "update")
    assert u["optimizer_steps"] > 0
    merged, _ = load_policy(tmp_path / "update" / "model")
    after = merged.model.vision_tower.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the verifier's eyes never move
    assert (tmp_path / "update" / "adapter" / "adapter_config.json").is_file()


def test_round_questions_are_seeded_per_image_and_distinct():
    cats = ["circle", "square", "moon", "star", "heart"]
    asked = round_questions([1, 2, 3], cats, 2, seed=0, round_index=1)
    assert all(len(set(q)) == 2 and set(q) <= set(cats) for q in asked)
    assert round_questions([2], cats, 2, seed=0, round_index=1) == asked[1:2]  # whichever shard holds image 2
    assert round_questions([1, 2, 3], cats, 2, seed=0, round_index=2) != asked
    assert sorted(round_questions([1], cats, 9, seed=0, round_index=1)[0]) == sorted(cats)

