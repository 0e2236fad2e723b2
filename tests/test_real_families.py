"""One FiSAO round per model family on tiny random models of the real classes, through the real
config path (only the ids point to tiny directories): rollouts -> scores -> update -> evaluation
on a COCO-layout fixture. Plus the per-family contracts: the teacher-forced log-probs are
generate's own, the vision tower is the verifier's, LoRA stays on the language model."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from fisao import io
from fisao.align.files import CALIBRATION, REWARDS
from fisao.align.sample import rollout_stage
from fisao.align.score import score_stage
from fisao.align.train import update_stage
from fisao.align.calibration import Calibration
from fisao.align.rollout import response_mask, sequence_logprobs
from fisao.align.lora import add_lora
from fisao.align.verifier import Verifier, check_vision_tower
from fisao.benchmarks.vocab import Vocabulary
from fisao.coco import load_image
from fisao.config import LoraConfig, load_config
from fisao.evaluate import evaluate_model
from fisao.generate import banned_token_ids, load_policy
from fisao.models.families import chat_prompt, family_of, vision_tower
from tests.realmodels import VAL, file_name

FAMILIES = ("llava", "llava_next", "instructblip")


def campaign_config(real_models, family):
    d = real_models["models"][family]
    return load_config(None, {
        "model": {"policy": str(d["policy"]), "verifier": str(d["verifier"]), "dtype": "float32", "device": "cpu"},
        "data": {"root": str(real_models["coco"])}, "rollout.split": "train", "rollout.images_per_round": 4,
        "rollout.n_per_image": 2, "rollout.questions_per_image": 0, "rollout.max_new_tokens": 8, "ppo.minibatch_size": 4,
        "ppo.epochs": 1,
        "eval.limit": 4, "eval.max_new_tokens": 8, "eval.pope_max_new_tokens": 3})


@pytest.mark.parametrize("family", FAMILIES)
def test_logprobs_are_generates_own_with_left_padding(real_models, family):
    model, processor = load_policy(real_models["models"][family]["policy"])
    assert family_of(model).name == family
    images = [load_image(real_models["coco"] / "val2014" / file_name("val", i)) for i in list(VAL)[:2]]
    prompts = [chat_prompt(processor, q) for q in ("Describe this image in detail.", "Is there a dog?")]
    inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    assert (inputs["attention_mask"] == 0).any(), "the prompts should need padding"
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=True, top_k=0, max_new_tokens=6, suppress_tokens=banned_token_ids(processor),
                             pad_token_id=processor.tokenizer.pad_token_id, output_logits=True, return_dict_in_generate=True)
        response = out.sequences[:, inputs["input_ids"].shape[1]:]
        mask = response_mask(response, processor.tokenizer.eos_token_id)
        ours = sequence_logprobs(model, inputs, response, mask)
    theirs = torch.stack(out.logits, 1).log_softmax(-1).gather(-1, response.unsqueeze(-1)).squeeze(-1) * mask
    assert torch.allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_tower_is_the_verifiers_and_lora_stays_on_the_language_model(real_models, family):
    d = real_models["models"][family]
    model, _ = load_policy(d["policy"])
    verifier = Verifier.from_pretrained(d["verifier"], Vocabulary.coco())
    assert check_vision_tower(model, verifier, require_equal=True)
    wrapped = add_lora(model, LoraConfig(r=2, train_projector=True))
    names = [n for n, _ in wrapped.named_parameters() if "lora_A" in n]
    assert names and all("language_model" in n or "projector" in n or "language_projection" in n for n in names)
    assert not any(p.requires_grad for p in vision_tower(wrapped).parameters())
    with torch.no_grad():
        next(vision_tower(model).parameters()).add_(1e-3)
    with pytest.raises(ValueError, match="is not the vision model of the verifier"):
        check_vision_tower(model, verifier, require_equal=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_update_encodes_prompts_once_where_the_image_features_stay_fixed(real_models, family):
    """LLaVA: the cached prompts (ids padded as the processor pads them, image features in place of
    pixel_values) give the processor's log-probs; LLaVA-NeXT (any-res tiles), InstructBLIP (its
    Q-Former reads the question) and a projector under LoRA keep the processor's path."""
    from fisao.align.rollout import Rollouts
    from fisao.align.update import _micro_batch, cache_prompts

    model, processor = load_policy(real_models["models"][family]["policy"])
    images = [load_image(real_models["coco"] / "val2014" / file_name("val", i)) for i in list(VAL)[:2]]
    prompts = ["Describe this image in detail.", "Is there a dog in the image?", "Is there a cat?", "Describe it."]
    response = torch.tensor([[5, 6, 7], [8, 9, 0], [10, 0, 0], [11, 12, 13]])
    rollouts = Rollouts(prompts=prompts, image_index=torch.tensor([0, 1, 1, 0]), response_ids=response,
                        mask=response > 0, logprobs=torch.zeros(4, 3), texts=[""] * 4)
    policy = add_lora(model, LoraConfig(r=2))
    cache = cache_prompts(policy, processor, images, rollouts, 3, "cpu")
    assert cache_prompts(add_lora(load_policy(real_models["models"][family]["policy"])[0],
                                  LoraConfig(r=2, train_projector=True)), processor, images, rollouts, 3, "cpu") is None
    if family != "llava":
        assert cache is None
        return
    rows = torch.tensor([2, 0, 3, 1])
    direct, ids, mask = _micro_batch(processor, images, rollouts, rows, "cpu")
    cached, _, _ = _micro_batch(processor, images, rollouts, rows, "cpu", cache)
    assert (direct["attention_mask"] == 0).any(), "the prompts should need padding"
    assert torch.equal(cached["input_ids"], direct["input_ids"])
    assert torch.equal(cached["attention_mask"], direct["attention_mask"])
    with torch.no_grad():
        assert torch.allclose(sequence_logprobs(policy, cached, ids, mask), sequence_logprobs(policy, direct, ids, mask),
                              atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_one_round_on_coco_through_the_config(real_models, family, tmp_path):
    cfg = campaign_config(real_models, family)
    rt, coco = cfg.model, real_models["coco"]
    policy, verifier = cfg.model.policy, cfg.model.verifier
    # A random verifier cannot be calibrated (it does not separate correct from hallucinated
    # mentions, and calibration says so); the round's stages take a written calibration. Calibration
    # on COCO runs in tests/test_campaign_coco.py, on models trained to see their images.
    cal = Calibration(0.1, -0.1, 0.0, 0.1, 0.5, 1, 1)
    io.write_json(tmp_path / "cal" / CALIBRATION, {"mention": cal.to_json(), "sentence": cal.to_json()})

    r = rollout_stage(policy, coco, cfg.rollout, 1, tmp_path / "r", progress=False, runtime=rt)
    assert r["rollouts"] == 8 and r["split"] == "train"
    s = score_stage(tmp_path / "r", policy, verifier, tmp_path / "cal", coco, cfg.reward, tmp_path / "s", runtime=rt)
    rows = io.read_jsonl(tmp_path / "s" / REWARDS)
    assert s["mentions"] == sum(len(row["mentions"]) for row in rows) > 0
    assert s["audited_mentions"] == 0  # train2014 has no instances file here: no audit, rewards all the same
    assert all(m["hallucinated"] is None and -1 <= m["reward"] <= 1 for row in rows for m in row["mentions"])

    before = {k: v.clone() for k, v in vision_tower(load_policy(policy)[0]).state_dict().items()}
    u = update_stage(policy, None, tmp_path / "r", tmp_path / "s", coco, cfg.lora, cfg.ppo, 1, tmp_path / "u",
                     runtime=rt)
    assert u["optimizer_steps"] == 2 and u["processes"] == 1
    merged, _ = load_policy(tmp_path / "u" / "model")
    assert type(merged).__name__ == type(load_policy(policy)[0]).__name__
    after = vision_tower(merged).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)

    metrics = evaluate_model(tmp_path / "u" / "model", coco, ("chair", "pope"), cfg.eval, tmp_path / "eval",
                             progress=False, runtime=rt)
    assert metrics["chair_n_captions"] == 4 and 0 <= metrics["chair_i"] <= 1
    assert not any(k.startswith("halluc_") for k in metrics)  # only the world knows hallucinations' causes
    for strategy in ("random", "popular", "adversarial"):
        answers = (tmp_path / "eval" / f"pope_{strategy}_answers.jsonl").read_text().splitlines()
        assert len(answers) == 8  # every question of the fixture's file, as the POPE protocol
        assert 0 <= metrics[f"pope_{strategy}_f1"] <= 1
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["data"] == "coco"


def test_later_rounds_keep_the_runtime_dtype(real_models, tmp_path):
    """bf16 (the real configs' dtype) through two rounds: round 2 reloads the base in bf16 with round
    1's adapters (float32, trainable) and continues them; `load_policy_with_adapter` with the runtime
    rebuilds each round's merged checkpoint from base + adapters, in bf16."""
    from safetensors import safe_open

    from fisao.align.lora import load_policy_with_adapter
    from fisao.runtime import load_runtime_policy

    cfg = campaign_config(real_models, "llava")
    rt = cfg.model.model_copy(update={"dtype": "bfloat16"})
    coco, base = real_models["coco"], cfg.model.policy
    cal = Calibration(0.1, -0.1, 0.0, 0.1, 0.5, 1, 1)
    io.write_json(tmp_path / "cal" / CALIBRATION, {"mention": cal.to_json(), "sentence": cal.to_json()})
    policy, adapter = base, None
    for k in (1, 2):
        rollout_stage(policy, coco, cfg.rollout, k, tmp_path / f"r{k}", progress=False, runtime=rt)
        score_stage(tmp_path / f"r{k}", policy, cfg.model.verifier, tmp_path / "cal", coco, cfg.reward,
                    tmp_path / f"s{k}", runtime=rt)
        update_stage(base, adapter, tmp_path / f"r{k}", tmp_path / f"s{k}", coco, cfg.lora, cfg.ppo, k,
                     tmp_path / f"u{k}", runtime=rt)
        policy, adapter = tmp_path / f"u{k}" / "model", tmp_path / f"u{k}" / "adapter"
        with safe_open(str(policy / "model.safetensors"), "pt") as f:
            assert {f.get_slice(key).get_dtype() for key in f.keys()} == {"BF16"}  # the checkpoint is the runtime's
        with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
            assert {f.get_slice(key).get_dtype() for key in f.keys()} == {"F32"}

    reloaded, _ = load_policy_with_adapter(base, adapter, runtime=rt, is_trainable=True)
    dtypes = {n: p.dtype for n, p in reloaded.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora_" not in n} == {torch.bfloat16}
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}
    assert all(p.requires_grad == ("lora_" in n) for n, p in reloaded.named_parameters())
    b1 = load_file(str(tmp_path / "u1" / "adapter" / "adapter_model.safetensors"))
    b2 = load_file(str(adapter / "adapter_model.safetensors"))
    assert any(not torch.equal(b1[key], b2[key]) for key in b1)  # round 2 trained on from round 1
    merged, _ = load_policy_with_adapter(base, adapter, merge=True, runtime=rt)
    saved, _ = load_runtime_policy(policy, rt)
    ours, theirs = merged.state_dict(), saved.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(ours[key].dtype == torch.bfloat16 for key in ours)
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)  # one rounding to bf16, as peft's merge
