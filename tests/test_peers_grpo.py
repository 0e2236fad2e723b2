"""TRL's GRPO as a peer (fisao/peers/grpo.py): the whole-answer reward, and one round on the tiny models."""
from __future__ import annotations

import functools
import json
import random

import pytest
import torch
from safetensors.torch import load_file

from fisao.align.sample import round_examples
from fisao.align.score import calibration_stage, load_verifier, read_calibration
from fisao.align.calibration import Calibration
from fisao.align.verifier import check_vision_tower
from fisao.benchmarks.vocab import Vocabulary
from fisao.coco import load_image
from fisao.config import RewardConfig, load_config
from fisao.examples import load_examples
from fisao.generate import load_policy

from tests.conftest import needs_peers  # noqa: E402

needs_peers()
from fisao.peers.grpo import ANSWERS, FIGURES, answer_reward, grpo_round  # noqa: E402

VOCAB = Vocabulary.from_lines(["circle, disk", "square", "star"])
# b = 0.25, w = 0.5: circle 0.5 -> +0.5, square -0.5 -> clamp(-1.5) = -1, star 0.25 -> 0.
CAL = Calibration(mean_correct=0.75, mean_hallucinated=-0.25, baseline=0.25, width=0.5, auroc=1.0,
                  n_correct=1, n_hallucinated=1)
SCORES = {"circle": 0.5, "square": -0.5, "star": 0.25}


def fake_score(asked: list[list[str]], categories: list[str]) -> torch.Tensor:
    asked.append(list(categories))
    return torch.tensor([SCORES[c] for c in categories])


@pytest.mark.parametrize("text, reward_cfg, expected", [
    ("A circle.", {}, 0.5),
    ("A circle and a square.", {}, (0.5 - 1.0) / 2),
    # reward.repeats "first": the repeated circle keeps only min(0.5, 0) = 0, and counts in the mean.
    ("A circle, a circle and a square.", {}, (0.5 + 0.0 - 1.0) / 3),
    ("A circle, a circle and a square.", {"repeats": "each"}, (0.5 + 0.5 - 1.0) / 3),
    ("Two squares and a square.", {}, (-1.0 - 1.0) / 2),  # a repeated hallucination stays a penalty
    ("A disk and a star.", {}, (0.5 + 0.0) / 2),  # "disk" is scored as its category, circle
    ("A circle and a square.", {"shape": "binary"}, (1.0 - 1.0) / 2),
    ("A star and a circle.", {"shape": "binary"}, (0.0 + 1.0) / 2),  # sign(0) = 0 at the baseline
    ("Nothing to see here.", {}, 0.0),  # no mention: 0
    ("", {}, 0.0),
])
def test_answer_reward_is_the_mean_of_the_mention_rewards(text, reward_cfg, expected):
    asked: list[list[str]] = []
    got = answer_reward(text, functools.partial(fake_score, asked), VOCAB, CAL, RewardConfig(**reward_cfg))
    assert got == pytest.approx(expected, abs=1e-7)
    assert all(c in VOCAB.categories for call in asked for c in call)


def test_answer_reward_ignores_the_token_level_options():
    text = "A circle and a square."
    base = answer_reward(text, functools.partial(fake_score, []), VOCAB, CAL, RewardConfig())
    for options in ({"level": "sentence"}, {"span": "phrase"}):
        assert answer_reward(text, functools.partial(fake_score, []), VOCAB, CAL, RewardConfig(**options)) == base


@pytest.fixture(scope="module")
def grpo(tiny_models, tmp_path_factory):
    """Calibration on the tiny models, then GRPO round 1 twice with the same seed, and round 2 from round 1."""
    cfg = load_config(None, {"rollout.images_per_round": 6, "rollout.n_per_image": 2, "rollout.max_new_tokens": 16,
                             "reward.calibration_images": 16, "reward.calibration_answers": 4,
                             "ppo.minibatch_size": 4})
    world, clip, llava = tiny_models["world"], tiny_models["clip"], tiny_models["llava"]
    root = tmp_path_factory.mktemp("grpo")
    calibration_stage(llava, clip, world, cfg.reward, cfg.rollout, root / "cal", progress=False)
    calibration = read_calibration(root / "cal")[0]
    verifier = load_verifier(clip, world, cfg.reward)
    sections = {"rollout": cfg.rollout, "reward": cfg.reward, "lora": cfg.lora, "ppo": cfg.ppo}
    examples = round_examples(world, cfg.rollout, 1)
    random.seed(123)
    torch.manual_seed(123)
    figures = grpo_round(llava, None, examples, verifier, calibration, **sections, round_index=1, out=root / "r1")
    caller_rng = (random.random(), torch.rand(3))
    again = grpo_round(llava, None, examples, verifier, calibration, **sections, round_index=1, out=root / "r1-again")
    second = grpo_round(llava, root / "r1" / "adapter", round_examples(world, cfg.rollout, 2), verifier,
                        calibration, **sections, round_index=2, out=root / "r2")
    return {"cfg": cfg, "root": root, "examples": examples, "verifier": verifier, "calibration": calibration,
            "figures": figures, "again": again, "second": second, "caller_rng": caller_rng, "llava": llava}


def _rows(path):
    return [json.loads(line) for line in (path / ANSWERS).read_text().splitlines()]


def test_the_rewards_grpo_trained_on_are_answer_reward_of_its_answers(grpo):
    cfg, verifier = grpo["cfg"], grpo["verifier"]
    rows = _rows(grpo["root"] / "r1")
    examples = sorted(grpo["examples"], key=lambda e: e.image_id)
    assert len(rows) == 6 * 2 and grpo["figures"]["answers"] == 12
    assert sorted(r["image_id"] for r in rows) == sorted([e.image_id for e in examples] * 2)  # n_per_image each
    embeddings = dict(zip((e.image_id for e in examples), verifier.image_embeddings([load_image(e.image) for e in examples])))
    for row in rows:
        score = functools.partial(verifier.score, embeddings[row["image_id"]])
        assert row["reward"] == answer_reward(row["text"], score, verifier.vocab, grpo["calibration"], cfg.reward)
    rewards = [r["reward"] for r in rows]
    assert len(set(rewards)) > 1  # the tiny policy's answers differ in reward: the test could tell a wrong one
    assert grpo["figures"]["reward_mean"] == pytest.approx(sum(rewards) / len(rewards))
    assert json.loads((grpo["root"] / "r1" / FIGURES).read_text()) == grpo["figures"]
    # ppo.epochs passes over 12 answers in minibatches of 4: TRL's num_iterations = 2, 3 steps each.
    assert grpo["figures"]["optimizer_steps"] == 2 * 3


def test_the_adapter_moved_the_language_model_and_never_the_vision_tower(grpo, tiny_models):
    base, _ = load_policy(grpo["llava"])
    merged, _ = load_policy(grpo["root"] / "r1" / "model")
    base_sd, merged_sd = base.state_dict(), merged.state_dict()
    assert base_sd.keys() == merged_sd.keys()
    changed = {k for k in base_sd if not torch.equal(base_sd[k], merged_sd[k])}
    targets = grpo["cfg"].lora.target_modules
    assert changed and all("language_model" in k and k.split(".")[-2] in targets for k in changed)
    assert check_vision_tower(merged, grpo["verifier"], require_equal=True)
    adapter = load_file(str(grpo["root"] / "r1" / "adapter" / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())
    assert not any("vision_tower" in k for k in adapter)


def test_same_seed_same_answers_and_the_callers_random_state_is_kept(grpo):
    assert _rows(grpo["root"] / "r1") == _rows(grpo["root"] / "r1-again")
    random.seed(123)
    torch.manual_seed(123)
    py, t = grpo["caller_rng"]
    assert random.random() == py and torch.equal(torch.rand(3), t)


def test_round_two_continues_the_adapter_against_the_base_reference(grpo):
    r1 = load_file(str(grpo["root"] / "r1" / "adapter" / "adapter_model.safetensors"))
    r2 = load_file(str(grpo["root"] / "r2" / "adapter" / "adapter_model.safetensors"))
    assert r1.keys() == r2.keys() and any(not torch.equal(r1[k], r2[k]) for k in r1)
    # TRL's copy of the starting adapter (its KL reference) was dropped: the reference is the base model.
    assert not (grpo["root"] / "r2" / "adapter" / "ref").exists()
    assert grpo["second"]["answers"] == 12


@pytest.mark.parametrize("update, match", [
    ({"rollout.n_per_image": 1}, "set it to 2 or more"),
    ({"ppo.minibatch_size": 5}, "ppo.minibatch_size x ppo.grad_accum = 5"),
    ({"reward.verifier": "oracle"}, "set reward.verifier: clip"),
])
def test_settings_grpo_cannot_run_with_name_the_key(grpo, tmp_path, update, match):
    cfg = load_config(None, {"rollout.n_per_image": 2, "ppo.minibatch_size": 4, **update})
    with pytest.raises(ValueError, match=match):
        grpo_round(grpo["llava"], None, grpo["examples"], grpo["verifier"], grpo["calibration"], rollout=cfg.rollout,
                   reward=cfg.reward, lora=cfg.lora, ppo=cfg.ppo, round_index=1, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_grpo_args_pin_what_trl_sets_differently_from_fisao(tmp_path):
    from fisao.peers.grpo import grpo_args

    cfg = load_config(None, {"rollout.n_per_image": 4, "rollout.temperature": 0.7, "rollout.max_new_tokens": 33,
                             "ppo.beta_kl": 0.07, "ppo.epochs": 3, "ppo.clip": 0.15, "ppo.minibatch_size": 8,
                             "ppo.grad_accum": 2, "ppo.lr": 5e-4})
    args = grpo_args(cfg.rollout, cfg.ppo, 64, 7, [0, 1, 2], tmp_path)
    assert (args.num_generations, args.generation_batch_size, args.steps_per_generation) == (4, 64, 8)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (8, 2)
    assert (args.temperature, args.top_p, args.top_k, args.max_completion_length) == (0.7, 1.0, 0, 33)
    assert args.generation_kwargs == {"suppress_tokens": [0, 1, 2]}
    assert (args.beta, args.num_iterations, args.epsilon, args.learning_rate) == (0.07, 3, 0.15, 5e-4)
    assert (args.loss_type, args.scale_rewards) == ("dapo", "batch")  # TRL's defaults: "dapo", "group"
    assert args.lr_scheduler_type == "constant" and args.optim == "adamw_torch" and args.weight_decay == 0.0
    assert not args.gradient_checkpointing and not args.bf16
    assert args.report_to in ("none", [], ["none"]) and not args.push_to_hub and args.seed == args.data_seed == 7


def test_trl_prompts_with_fisaos_prompt_ids_or_the_round_stops(tiny_models, monkeypatch):
    from fisao.align import rollout
    from fisao.peers.grpo import _check_prompt_ids

    _, processor = load_policy(tiny_models["llava"])
    image = load_image(load_examples(tiny_models["world"], "pretrain", limit=1)[0].image)
    _check_prompt_ids(processor, "Describe this image in detail.", image)  # the tiny LLaVA's template: the same ids
    # A sampler that prompts otherwise than the chat template (here: another reply marker) is caught.
    monkeypatch.setattr(rollout, "chat_prompt", lambda processor, q: f"USER: <image>\n{q} BOT:")
    with pytest.raises(ValueError, match="GRPO would train on another prompt"):
        _check_prompt_ids(processor, "Describe this image in detail.", image)
