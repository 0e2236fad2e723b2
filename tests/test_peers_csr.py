"""CSR-style iterative DPO (fisao/peers/csr.py): the score and the pairs by hand, the collator
against our own prompt encoding, and two rounds on the tiny models."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import needs_peers  # noqa: E402

needs_peers()

from fisao.align.rollout import encode_prompts  # noqa: E402
from fisao.align.sample import round_examples  # noqa: E402
from fisao.align.verifier import Verifier  # noqa: E402
from fisao.benchmarks.vocab import Vocabulary  # noqa: E402
from fisao.coco import load_image  # noqa: E402
from fisao.generate import load_policy  # noqa: E402
from fisao.peers import csr  # noqa: E402
from fisao.peers.csr import CSR_LAMBDA, CSRConfig, PairCollator, csr_round, csr_score, mean_token_logprob, preference_pairs  # noqa: E402


def test_csr_score_by_hand():
    logp, clip = torch.tensor([-2.0, -0.5, -1.0]), torch.tensor([0.3, 0.1, 0.25])
    # 0.1·(−2) + 0.9·0.3 = 0.07; 0.1·(−0.5) + 0.9·0.1 = 0.04; 0.1·(−1) + 0.9·0.25 = 0.125
    assert csr_score(logp, clip, 0.1).tolist() == pytest.approx([0.07, 0.04, 0.125], abs=1e-6)
    assert CSR_LAMBDA == 0.1 and torch.equal(csr_score(logp, clip), csr_score(logp, clip, 0.1))
    assert torch.equal(csr_score(logp, clip, 0.0), clip) and torch.equal(csr_score(logp, clip, 1.0), logp)
    # 0.5·(−2) + 0.5·0.3 = −0.85
    assert float(csr_score(logp, clip, 0.5)[0]) == pytest.approx(-0.85)
    with pytest.raises(ValueError, match=r"lam is 1.5"):
        csr_score(logp, clip, 1.5)
    with pytest.raises(ValueError, match="log-probs for"):
        csr_score(logp, clip[:2])


def test_mean_token_logprob_counts_only_the_answer():
    logprobs = torch.tensor([[-1.0, -3.0, -9.0], [-2.0, -7.0, -7.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False], [False, False, False]])
    assert mean_token_logprob(logprobs, mask).tolist() == [-2.0, -2.0, 0.0]


def test_preference_pairs_best_and_worst_per_image():
    scores = [0.2, 0.5, 0.5, 0.1, 0.3, 0.3, 0.7, 0.4, 0.4 + 1e-7, 0.0, 0.9]
    groups = [7, 7, 7, 7, 1, 1, 2, 3, 3, 4, 4]
    texts = ["a", "b", "c", "d", "e", "f", "g", "same", "same", "h", "i"]
    # image 7: best row 1 (tied with row 2: the earliest), worst row 3; image 1: all tied, no pair;
    # image 2: one answer, no pair; image 3: one text twice, no pair; image 4: 10 over 9.
    assert preference_pairs(scores, groups, texts) == [(1, 3), (10, 9)]
    # ties at the bottom also go to the earliest row
    assert preference_pairs([0.1, 0.1, 0.5], [0, 0, 0], ["x", "y", "z"]) == [(2, 0)]
    with pytest.raises(ValueError, match="one of each per answer"):
        preference_pairs([0.1], [0, 0], ["x", "y"])


@pytest.mark.parametrize("field, value, message", [("lam", -0.1, "lam is -0.1"), ("beta", 0.0, "beta is 0.0"),
                                                   ("lr", -1.0, "lr is -1.0"), ("batch_size", 0, "batch_size is 0")])
def test_config_names_the_bad_value(field, value, message):
    with pytest.raises(ValueError, match=message):
        CSRConfig(**{field: value})


def test_collator_feeds_dpo_the_sampled_tokens_after_our_prompt(tiny_models):
    """Each row: the prompt exactly as sampling encoded it (<s> first), then the answer's ids (EOS
    kept); chosen rows first, then rejected; flushed left, so positions count from the first token."""
    _, processor = load_policy(tiny_models["llava"])
    image = load_image(round_examples(tiny_models["world"], tiny_models["config"].rollout, 1)[0].image)
    eos = processor.tokenizer.eos_token_id
    examples = [{"image": 0, "prompt": "Describe this image in detail.", "chosen_ids": [5, 6, eos], "rejected_ids": [7, eos]},
                {"image": 0, "prompt": "What is here?", "chosen_ids": [8, eos], "rejected_ids": [9, 10, 11, eos]}]
    batch = PairCollator(processor, [image])([dict(e) for e in examples])
    expected = encode_prompts(processor, [image], ["What is here?"])["pixel_values"][0]
    assert torch.equal(batch["pixel_values"][1], expected) and torch.equal(batch["pixel_values"][3], expected)
    assert batch["input_ids"].shape[0] == 4 and batch["pixel_values"].shape[0] == 4
    answers = [examples[0]["chosen_ids"], examples[1]["chosen_ids"], examples[0]["rejected_ids"], examples[1]["rejected_ids"]]
    for k, answer in enumerate(answers):
        prompt = encode_prompts(processor, [image], [examples[k % 2]["prompt"]])["input_ids"][0].tolist()
        attended, completion = batch["attention_mask"][k].bool(), batch["completion_mask"][k].bool()
        assert batch["input_ids"][k][completion].tolist() == answer
        assert batch["input_ids"][k][attended & ~completion].tolist() == prompt
        assert prompt[0] == processor.tokenizer.bos_token_id
        n = int(attended.sum())
        assert attended[:n].all() and not attended[n:].any()  # no padding before or inside the sequence


@pytest.fixture(scope="module")
def verifier(tiny_models):
    return Verifier.from_pretrained(tiny_models["clip"], Vocabulary.from_file(tiny_models["world"] / "vocab.txt"))


def _pairs_by_hand(rows: list[dict]) -> list[tuple[int, int]]:
    """Best and worst answer of each image from answers.jsonl, written out without preference_pairs."""
    out = []
    for image_id in dict.fromkeys(r["image_id"] for r in rows):
        mine = [r for r in rows if r["image_id"] == image_id]
        top = max(r["score"] for r in mine)
        bottom = min(r["score"] for r in mine)
        best = next(r for r in mine if r["score"] == top)
        worst = next(r for r in mine if r["score"] == bottom)
        if best["text"] != worst["text"]:
            out.append((best["row"], worst["row"]))
    return out


def test_two_csr_rounds_on_tiny_models(tiny_models, verifier, tmp_path, monkeypatch):
    cfg = tiny_models["config"]
    llava, world = tiny_models["llava"], tiny_models["world"]
    csr_cfg = CSRConfig(lr=5e-3, batch_size=2)
    seen: list[tuple[str, str]] = []
    collate = PairCollator.__call__
    monkeypatch.setattr(PairCollator, "__call__",
                        lambda self, ex: seen.extend((e["chosen"], e["rejected"]) for e in ex) or collate(self, ex))
    states = random.getstate(), np.random.get_state()[1].copy(), torch.random.get_rng_state()
    examples = round_examples(world, cfg.rollout, 1)
    figures = csr_round(llava, None, examples, verifier, cfg.rollout, cfg.lora, csr_cfg, 1, tmp_path / "r1")
    # TRL's trainer seeds the global generators; the round gives them back
    assert random.getstate() == states[0] and np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.random.get_rng_state(), states[2])

    out = tmp_path / "r1"
    rows = [json.loads(x) for x in (out / csr.ANSWERS).read_text().splitlines()]
    pairs = [json.loads(x) for x in (out / csr.PAIRS).read_text().splitlines()]
    n = cfg.rollout.images_per_round * cfg.rollout.n_per_image
    assert len(rows) == n == figures["answers"]
    assert [r["image_id"] for r in rows] == [e.image_id for e in examples for _ in range(cfg.rollout.n_per_image)]
    for r in rows:  # each score is CSR's, from the row's own two terms
        assert r["score"] == pytest.approx(0.1 * r["mean_logprob"] + 0.9 * r["clip"], abs=1e-6)
        assert r["mean_logprob"] < 0
    # the CLIP term is the verifier's whole-answer cosine of the row's own image and text
    emb = verifier.image_embeddings([load_image(e.image) for e in examples])
    index = {e.image_id: k for k, e in enumerate(examples)}
    clip = verifier.text_scores(emb[[index[r["image_id"]] for r in rows]], [r["text"] for r in rows])
    assert clip.tolist() == pytest.approx([r["clip"] for r in rows], abs=1e-5)

    # the pairs are the best and worst of exactly the answers scored, and the ones DPO trained on
    by_hand = _pairs_by_hand(rows)
    assert by_hand, "no image had two different answers: the round trained on nothing"
    assert [(p["chosen_row"], p["rejected_row"]) for p in pairs] == by_hand
    assert [(p["chosen"], p["rejected"], p["image_id"]) for p in pairs] == [
        (rows[c]["text"], rows[j]["text"], rows[c]["image_id"]) for c, j in by_hand]
    assert sorted(seen) == sorted((p["chosen"], p["rejected"]) for p in pairs)
    assert figures["pairs"] == len(pairs) and figures["optimizer_steps"] == -(-len(pairs) // 2)

    # the adapters moved the language model and nothing of the vision tower; the merged model loads
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and not (out / "adapter" / "ref").exists()
    base, _ = load_policy(llava)
    merged, _ = load_policy(out / "model")
    before, after = base.state_dict(), merged.state_dict()
    assert before.keys() == after.keys()
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert moved and all("language_model" in k and k.split(".")[-2] in cfg.lora.target_modules for k in moved)
    assert not any("vision_tower" in k for k in moved)
    assert getattr(merged.config, "use_cache", None) is not False  # the trainer's use_cache=False stays out of the checkpoint
    lora = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in lora.items())

    # Round 2 continues the adapters and measures DPO against them (not against the base model):
    # the first step's reward margin, taken before any update, is 0 exactly.
    seen.clear()
    second = csr_round(llava, out / "adapter", round_examples(world, cfg.rollout, 2), verifier, cfg.rollout, cfg.lora,
                       csr_cfg, 2, tmp_path / "r2")
    assert second["pairs"] > 0 and second["reward_margins"][0] == 0.0
    assert figures["reward_margins"][0] == 0.0 and len(seen) == second["pairs"]


def test_answers_and_pairs_are_seeded(tiny_models, verifier):
    cfg = tiny_models["config"]
    model, processor = load_policy(tiny_models["llava"])
    images = [load_image(e.image) for e in round_examples(tiny_models["world"], cfg.rollout, 1)]
    a, b, c = (csr.score_answers(model, processor, images, verifier, cfg.rollout, CSR_LAMBDA, seed) for seed in (3, 3, 4))
    assert a.rollouts.texts == b.rollouts.texts and torch.equal(a.score, b.score)
    pairs = preference_pairs(a.score.tolist(), a.rollouts.image_index.tolist(), a.rollouts.texts)
    assert pairs == preference_pairs(b.score.tolist(), b.rollouts.image_index.tolist(), b.rollouts.texts)
    assert a.rollouts.texts != c.rollouts.texts  # the seed, not chance, fixes them
