"""Rollouts on the tiny LLaVA: seeded, correctly masked, and with the policy's own log-probs."""
from __future__ import annotations

import pytest
import torch

from fisao.align.rollout import (
    Rollouts, concat_rollouts, encode_prompts, load_rollouts, response_mask, sample_rollouts, save_rollouts,
    sequence_logprobs,
)
from fisao.coco import load_image
from fisao.generate import banned_token_ids, load_policy
from fisao.models.families import chat_prompt

PROMPT = "Describe this image in detail."


@pytest.fixture(scope="module")
def policy(tiny_models):
    model, processor = load_policy(tiny_models["llava"])
    images = [load_image(tiny_models["world"] / "train" / "images" / f"{i:06d}.png") for i in (1, 2, 3)]
    return model, processor, images


@pytest.fixture(scope="module")
def rollouts(policy) -> Rollouts:
    model, processor, images = policy
    return sample_rollouts(model, processor, images, PROMPT, n_per_image=4, max_new_tokens=16, batch_size=5,
                           seed=3, progress=False)


def test_response_mask_by_hand():
    ids = torch.tensor([[5, 3, 0, 0], [5, 6, 7, 8], [3, 0, 0, 0], [5, 3, 3, 0]])
    assert response_mask(ids, eos_id=3).int().tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]]


def test_same_seed_same_rollouts_and_global_rng_untouched(policy, rollouts):
    model, processor, images = policy
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    again = sample_rollouts(model, processor, images, PROMPT, n_per_image=4, max_new_tokens=16, batch_size=5,
                            seed=3, progress=False)
    assert torch.equal(torch.rand(3), expected_next)  # sampling forked the RNG
    assert torch.equal(again.response_ids, rollouts.response_ids) and torch.equal(again.mask, rollouts.mask)
    assert torch.equal(again.logprobs, rollouts.logprobs) and again.texts == rollouts.texts
    other = sample_rollouts(model, processor, images, PROMPT, n_per_image=4, max_new_tokens=16, batch_size=5,
                            seed=4, progress=False)
    assert not torch.equal(other.response_ids[:, :4], rollouts.response_ids[:, :4])


def test_rows_are_image_major_and_masks_cover_generated_tokens_through_eos(policy, rollouts):
    _, processor, _ = policy
    tok = processor.tokenizer
    r = rollouts
    assert r.image_index.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    n, t = r.response_ids.shape
    assert n == 12 and t <= 16 and r.mask.dtype == torch.bool and r.logprobs.dtype == torch.float32
    lengths = r.mask.sum(1)
    ended = lengths < t
    assert ended.any() and (~ended).any(), "fixture should give both finished and truncated answers"
    for row in range(n):
        k = int(lengths[row])
        assert r.mask[row, :k].all() and not r.mask[row, k:].any()  # right-padded
        assert (r.response_ids[row, k:] == tok.pad_token_id).all()
        eos = (r.response_ids[row, :k] == tok.eos_token_id).nonzero().flatten().tolist()
        assert eos == [k - 1] if k < t else eos in ([], [t - 1])  # stops at the first EOS, or truncated
        assert not set(r.response_ids[row, :k].tolist()) & set(banned_token_ids(processor))
        assert (r.logprobs[row, :k] < 0).all() and (r.logprobs[row, k:] == 0).all()
        assert r.texts[row] == processor.decode(r.response_ids[row, :k], skip_special_tokens=True).strip()


def test_logprobs_equal_generate_logits_with_left_padding(policy):
    """The teacher-forced forward reproduces generate's own logits, for prompts of unequal length."""
    model, processor, images = policy
    prompts = [chat_prompt(processor, q) for q in (PROMPT, "What is in this image?")]
    inputs = processor(images=images[:2], text=prompts, return_tensors="pt", padding=True)
    assert (inputs["attention_mask"] == 0).any(), "the prompts should need left padding"
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=True, top_k=0, max_new_tokens=12, suppress_tokens=banned_token_ids(processor),
                             pad_token_id=processor.tokenizer.pad_token_id, output_logits=True, return_dict_in_generate=True)
        response = out.sequences[:, inputs["input_ids"].shape[1]:]
        mask = response_mask(response, processor.tokenizer.eos_token_id)
        ours = sequence_logprobs(model, inputs, response, mask)
    theirs = torch.stack(out.logits, 1).log_softmax(-1).gather(-1, response.unsqueeze(-1)).squeeze(-1) * mask
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_logprobs_do_not_depend_on_batching_or_padding(policy, rollouts):
    model, processor, images = policy
    for row in (0, 5, 11):
        k = int(rollouts.mask[row].sum())
        inputs = encode_prompts(processor, [images[int(rollouts.image_index[row])]], PROMPT)
        with torch.no_grad():
            alone = sequence_logprobs(model, inputs, rollouts.response_ids[row : row + 1, :k], rollouts.mask[row : row + 1, :k])
        assert torch.allclose(alone[0], rollouts.logprobs[row, :k], atol=1e-5)


def test_save_and_load_round_trip(tmp_path, rollouts):
    extra = {"image_id": [f"img{i}" for i in rollouts.image_index.tolist()], "reward": [[0.5, -1.0]] * len(rollouts)}
    save_rollouts(tmp_path / "r", rollouts, extra)
    back, back_extra = load_rollouts(tmp_path / "r")
    assert back.prompts == [PROMPT] * len(rollouts) and back.texts == rollouts.texts and back_extra == extra
    for name in ("image_index", "response_ids", "mask", "logprobs"):
        assert torch.equal(getattr(back, name), getattr(rollouts, name)) and getattr(back, name).dtype == getattr(rollouts, name).dtype
    with pytest.raises(ValueError, match="reward"):
        save_rollouts(tmp_path / "bad", rollouts, {"reward": [1.0]})
    with pytest.raises(FileNotFoundError, match="save_rollouts"):
        load_rollouts(tmp_path / "missing")


def test_one_prompt_per_image_and_its_log_probs(policy, rollouts):
    model, processor, images = policy
    same = sample_rollouts(model, processor, images, [PROMPT] * 3, n_per_image=4, max_new_tokens=16, batch_size=5,
                           seed=3, progress=False)
    assert torch.equal(same.response_ids, rollouts.response_ids) and same.prompts == rollouts.prompts
    questions = ["Is there a circle in the image?", "Is there a moon in the image?", PROMPT]
    mixed = sample_rollouts(model, processor, images, questions, n_per_image=2, max_new_tokens=16, batch_size=4,
                            seed=3, progress=False)
    assert mixed.prompts == [q for q in questions for _ in range(2)]
    # The logged log-probs are those of each row under its own prompt (what the update recomputes).
    inputs = encode_prompts(processor, [images[i] for i in mixed.image_index.tolist()], mixed.prompts)
    again = sequence_logprobs(model, inputs, mixed.response_ids, mixed.mask)
    assert torch.allclose(again, mixed.logprobs, atol=1e-5)
    with pytest.raises(ValueError, match="2 prompts for 3 images"):
        sample_rollouts(model, processor, images, questions[:2], n_per_image=1, progress=False)


def test_concat_rollouts_pads_to_the_widest(policy, rollouts):
    model, processor, images = policy
    short = sample_rollouts(model, processor, images[:1], "Is there a moon in the image?", n_per_image=2,
                            max_new_tokens=3, seed=0, progress=False)
    pad = processor.tokenizer.pad_token_id
    both = concat_rollouts([rollouts, short], torch.tensor(rollouts.image_index.tolist() + [0, 0]), pad)
    n, width = rollouts.response_ids.shape
    assert both.response_ids.shape == (n + 2, width) and both.texts == rollouts.texts + short.texts
    assert both.prompts == rollouts.prompts + short.prompts
    assert torch.equal(both.mask[n:, :3], short.mask) and not both.mask[n:, 3:].any()
    assert (both.response_ids[n:, 3:] == pad).all() and (both.logprobs[n:, 3:] == 0).all()
    with pytest.raises(ValueError, match="image_index has 1 entries for 14 rollouts"):
        concat_rollouts([rollouts, short], torch.tensor([0]), pad)


def test_float32_reads_generates_logits_and_half_precision_recomputes_them(tiny_models, monkeypatch):
    """In float32 no second forward (a plain generate loop's cost), and the log-probs are the
    teacher-forced ones to 1e-5; in bfloat16 one teacher-forced pass gives them."""
    import copy

    import fisao.align.rollout as rollout

    model, processor = load_policy(tiny_models["llava"])
    images = [load_image(tiny_models["world"] / "train" / "images" / f"{i:06d}.png") for i in (1, 2)]
    calls = []
    real = rollout.sequence_logprobs
    monkeypatch.setattr(rollout, "sequence_logprobs", lambda *a, **k: calls.append(1) or real(*a, **k))
    r = sample_rollouts(model, processor, images, PROMPT, n_per_image=2, max_new_tokens=12, seed=1, progress=False)
    assert calls == []
    inputs = encode_prompts(processor, [images[i] for i in r.image_index.tolist()], PROMPT)
    with torch.no_grad():
        forward = real(model, inputs, r.response_ids, r.mask)
    assert torch.allclose(forward, r.logprobs, atol=1e-5) and (r.logprobs[r.mask] < 0).all()
    half = copy.deepcopy(model).to(torch.bfloat16)
    sample_rollouts(half, processor, images, PROMPT, n_per_image=2, max_new_tokens=12, seed=1, progress=False)
    assert calls == [1]
