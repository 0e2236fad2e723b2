"""The policy update on the tiny LLaVA: LoRA placement, frozen vision tower, exact reference,
accumulation invariance, and checkpoints that load through the ordinary path."""
from __future__ import annotations

import pytest
import torch

from fisao.align.rollout import encode_prompts, sample_rollouts, sequence_logprobs
from fisao.align.lora import (
    ValueHead, add_lora, load_policy_with_adapter, load_value_head, merge_and_save, save_adapter,
)
from fisao.align.train import policy_to_train
from fisao.align.ppo import kl_loss_full
from fisao.align.rewards import NameSlots
from fisao.align.update import ActorCritic, make_accelerator, ppo_update
from fisao.coco import load_image
from fisao.config import LoraConfig, PPOConfig
from fisao.generate import answer, load_policy

PROMPT = "Describe this image in detail."
LORA = LoraConfig(r=4, alpha=8)


@pytest.fixture(scope="module")
def setup(tiny_models):
    """Base directory, processor, two images and 8 rollouts sampled from the base model."""
    model, processor = load_policy(tiny_models["llava"])
    images = [load_image(tiny_models["world"] / "train" / "images" / f"{i:06d}.png") for i in (1, 2)]
    rollouts = sample_rollouts(model, processor, images, PROMPT, n_per_image=4, max_new_tokens=8, batch_size=8,
                               seed=0, progress=False)
    # +1 on every token of image 0's answers, −1 on image 1's
    rewards = torch.where(rollouts.image_index[:, None] == 0, 1.0, -1.0) * rollouts.mask
    return {"base": tiny_models["llava"], "processor": processor, "images": images, "rollouts": rollouts, "rewards": rewards}


def fresh_policy(base, lora: LoraConfig = LORA):
    model, _ = load_policy(base)
    torch.manual_seed(0)  # LoRA A matrices are drawn at random
    return add_lora(model, lora)


def logprobs(model, setup):
    r = setup["rollouts"]
    inputs = encode_prompts(setup["processor"], [setup["images"][i] for i in r.image_index.tolist()], PROMPT)
    with torch.no_grad():
        return sequence_logprobs(model, inputs, r.response_ids, r.mask)


def update(model, setup, cfg: PPOConfig, value_head=None, rollouts=None):
    return ppo_update(model, setup["processor"], setup["images"], rollouts or setup["rollouts"], setup["rewards"], cfg,
                      make_accelerator(cfg, cpu=True), torch.Generator().manual_seed(0), value_head=value_head)


@pytest.fixture(scope="module")
def trained(setup):
    model = fresh_policy(setup["base"])
    vision_before = {k: v.clone() for k, v in model.get_base_model().model.vision_tower.state_dict().items()}
    before = logprobs(model, setup)
    stats = update(model, setup, PPOConfig(lr=1e-2, minibatch_size=4, epochs=2, target_kl=None))
    return {"model": model, "vision_before": vision_before, "before": before, "stats": stats}


def lora_modules(model) -> set[str]:
    return {n.split(".lora_A")[0].removeprefix("base_model.model.") for n, _ in model.named_parameters() if ".lora_A." in n}


def test_lora_sits_on_the_language_model_projections_only(setup):
    model = fresh_policy(setup["base"])
    names = lora_modules(model)
    assert len(names) == 2 * 4  # 2 layers × q, k, v, o
    assert all(n.startswith("model.language_model.layers.") and n.split(".")[-1] in LORA.target_modules for n in names)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert not any(p.requires_grad for p in model.get_base_model().model.vision_tower.parameters())
    with_projector = lora_modules(fresh_policy(setup["base"], LoraConfig(r=4, train_projector=True)))
    assert with_projector - names == {"model.multi_modal_projector.linear_1", "model.multi_modal_projector.linear_2"}
    with pytest.raises(ValueError, match="q_proj"):
        fresh_policy(setup["base"], LoraConfig(target_modules=("no_such_proj",)))


def test_update_follows_the_rewards_and_leaves_the_vision_tower_bit_for_bit(setup, trained):
    model, stats = trained["model"], trained["stats"]
    after = model.get_base_model().model.vision_tower.state_dict()
    assert after.keys() == trained["vision_before"].keys()
    assert all(torch.equal(after[k], v) for k, v in trained["vision_before"].items())
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if ".lora_B." in n)  # B starts at 0
    mask, image = setup["rollouts"].mask, setup["rollouts"].image_index
    change = (logprobs(model, setup) - trained["before"]) * mask
    gain = [float(change[image == i].sum() / mask[image == i].sum()) for i in (0, 1)]  # mean per token
    assert gain[0] > 0.02 and gain[1] < -0.02, gain  # rewarded answers became likelier, penalised ones less
    # Sampled by the base model, which is the reference: the KL is exactly the rollouts' log-probs (generate's
    # own logits, float32) less the teacher-forced reference's, which is float rounding.
    r = setup["rollouts"]
    assert stats["kl"] == pytest.approx(float(((r.logprobs - trained["before"]) * r.mask).sum(1).mean()), abs=1e-7)
    assert abs(stats["kl"]) < 1e-5
    assert stats["reward_mean"] == pytest.approx(float(setup["rewards"].sum(1).mean()))
    assert 0 <= stats["clipfrac"] <= 1 and stats["approx_kl"] > 0 and stats["ratio"] != 1.0
    assert stats["optimizer_steps"] == 4 and stats["grad_norm"] > 0 and "value_loss" not in stats


def test_target_kl_stops_the_update_once_the_policy_has_moved_that_far(setup, trained):
    # The trained fixture (lr 1e-2, 2 epochs of 2 steps, no target) ran all 4 steps; its mean approx_kl was > 0.
    assert trained["stats"]["optimizer_steps"] == 4 and trained["stats"]["stopped_early"] == 0.0
    kl = trained["stats"]["approx_kl"]
    # A target far below what one step moves: the first step's forward sees the sampling policy itself
    # (approx_kl 0), the second sees the first step's move, and the update stops after it.
    tight = update(fresh_policy(setup["base"]), setup, PPOConfig(lr=1e-2, minibatch_size=4, epochs=2, target_kl=kl / 1e3))
    assert tight["optimizer_steps"] == 2 and tight["stopped_early"] == 1.0
    # A target far above: every step runs and the figures are those of the run without a target.
    loose = update(fresh_policy(setup["base"]), setup, PPOConfig(lr=1e-2, minibatch_size=4, epochs=2, target_kl=1e3))
    assert loose["optimizer_steps"] == 4 and loose["stopped_early"] == 0.0
    assert loose["approx_kl"] == pytest.approx(kl) and loose["policy_loss"] == pytest.approx(trained["stats"]["policy_loss"])
    with pytest.raises(ValueError):
        PPOConfig(target_kl=0)


def test_reference_is_the_base_model_exactly(setup, trained):
    base, processor = load_policy(setup["base"])
    inputs = encode_prompts(processor, setup["images"], PROMPT)
    with torch.no_grad():
        expected = base(**inputs).logits
        with trained["model"].disable_adapter():
            disabled = trained["model"](**inputs).logits
        enabled = trained["model"](**inputs).logits
    assert torch.equal(disabled, expected)
    assert not torch.allclose(enabled, expected, atol=1e-4)
    with trained["model"].disable_adapter():  # the path ppo_update takes for the reference log-probs
        assert torch.equal(logprobs(trained["model"], setup), logprobs(base, setup))


def test_reference_previous_is_the_sampling_policy(setup, trained):
    model = trained["model"]
    r = sample_rollouts(model, setup["processor"], setup["images"], PROMPT, n_per_image=4, max_new_tokens=8,
                        batch_size=8, seed=1, progress=False)
    copy = fresh_policy(setup["base"])
    copy.load_state_dict(model.state_dict())
    rewards = torch.zeros_like(r.logprobs)
    cfg = PPOConfig(lr=1e-3, minibatch_size=8, epochs=1)
    kw = dict(accelerator=make_accelerator(cfg, cpu=True), generator=torch.Generator().manual_seed(0))
    to_base = ppo_update(copy, setup["processor"], setup["images"], r, rewards, cfg, **kw)
    to_previous = ppo_update(copy, setup["processor"], setup["images"], r, rewards, cfg.model_copy(update={"reference": "previous"}), **kw)
    assert to_base["kl"] > 0 and to_previous["kl"] == 0.0


def test_kl_loss_holds_the_policy_near_the_reference(setup):
    cfg = PPOConfig(lr=1e-2, minibatch_size=4, epochs=2)
    free, held = fresh_policy(setup["base"]), fresh_policy(setup["base"])
    update(free, setup, cfg)
    stats = update(held, setup, cfg.model_copy(update={"kl_loss_coef": 20.0}))
    before = logprobs(load_policy(setup["base"])[0], setup)
    mask = setup["rollouts"].mask
    drift = [float(((logprobs(m, setup) - before).abs() * mask).sum() / mask.sum()) for m in (free, held)]
    assert drift[1] < 0.8 * drift[0], drift
    assert stats["kl_loss"] >= 0 and "kl_loss" not in update(fresh_policy(setup["base"]), setup, cfg.model_copy(update={"epochs": 1}))


def test_full_kl_loss_holds_the_whole_distribution_near_the_reference(setup):
    """ppo.kl_loss_estimator "full": the exact KL over the vocabulary at each response position,
    measured here on the same positions, is smaller than without the term."""
    cfg = PPOConfig(lr=1e-2, minibatch_size=4, epochs=2)
    free, held = fresh_policy(setup["base"]), fresh_policy(setup["base"])
    update(free, setup, cfg)
    stats = update(held, setup, cfg.model_copy(update={"kl_loss_coef": 20.0, "kl_loss_estimator": "full"}))
    r = setup["rollouts"]
    inputs = encode_prompts(setup["processor"], [setup["images"][i] for i in r.image_index.tolist()], PROMPT)
    with torch.no_grad():
        kl = []
        for m in (free, held):
            actor = ActorCritic(m, None)
            logits = actor(inputs, r.response_ids, r.mask, with_logits=True)[2]
            kl.append(float(kl_loss_full(logits, actor.reference_logits(inputs, r.response_ids, r.mask), r.mask)))
    assert kl[1] < 0.5 * kl[0], kl
    assert stats["kl_loss"] >= 0


def test_gae_trains_the_value_head_and_bad_inputs_are_named(setup):
    model = fresh_policy(setup["base"])
    cfg = PPOConfig(lr=1e-2, minibatch_size=4, epochs=1, advantage="gae")
    head = ValueHead.for_model(model)
    stats = update(model, setup, cfg, value_head=head)
    assert head.linear.weight.abs().sum() > 0 and stats["value_loss"] > 0
    with pytest.raises(ValueError, match="value head"):
        update(model, setup, cfg)
    with pytest.raises(ValueError, match="one reward per response token"):
        ppo_update(model, setup["processor"], setup["images"], setup["rollouts"], setup["rewards"][:, :3], cfg,
                   make_accelerator(cfg, cpu=True), torch.Generator(), value_head=head)
    with pytest.raises(ValueError, match="grad_accum"):
        ppo_update(model, setup["processor"], setup["images"], setup["rollouts"], setup["rewards"], cfg,
                   make_accelerator(cfg.model_copy(update={"grad_accum": 2}), cpu=True), torch.Generator(), value_head=head)
    with pytest.raises(ValueError, match="add_lora"):
        update(model.get_base_model(), setup, cfg, value_head=head)


def trainable_state(model, head) -> dict[str, torch.Tensor]:
    state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return state | {f"value.{n}": p.detach().clone() for n, p in head.named_parameters()}


def test_minibatch_4_equals_minibatch_2_with_2_accumulation_steps(setup):
    """One optimizer step over 4 answers gives the same weights however it is split (trl-style)."""
    results = {}
    for mb, accum in ((4, 1), (2, 2), (2, 1)):
        # In float64: in float32 the two splits' sums differ in their last bits, and two epochs of
        # Adam (which divides by the gradient's size) grow that to 8e-7 on one CPU, 1.6e-5 on another.
        model = fresh_policy(setup["base"]).double()
        head = ValueHead.for_model(model).double()
        start = trainable_state(model, head)
        cfg = PPOConfig(lr=1e-2, minibatch_size=mb, grad_accum=accum, epochs=2, advantage="gae", max_grad_norm=0.5)
        update(model, setup, cfg, value_head=head)
        results[(mb, accum)] = trainable_state(model, head)
    one, split, smaller = results[(4, 1)], results[(2, 2)], results[(2, 1)]
    assert any(not torch.equal(one[k], start[k]) for k in one)
    assert all(torch.allclose(one[k], split[k], atol=1e-9, rtol=0) for k in one)
    assert not all(torch.allclose(one[k], smaller[k], atol=1e-4) for k in one)  # a different step size does differ


def test_prompts_encoded_once_give_the_processors_inputs_and_the_same_update(setup, trained, monkeypatch):
    """The update encodes each rollout's prompt and image once (`cache_prompts`): the same padded ids
    and log-probs as the processor's inputs each pass, and the same trained adapters."""
    from fisao.align import update as update_module

    r, processor, images = setup["rollouts"], setup["processor"], setup["images"]
    model = fresh_policy(setup["base"])
    cache = update_module.cache_prompts(model, processor, images, r, 3, "cpu")  # batches that split an image's rows
    assert cache is not None and sorted(cache.features) == [0, 1]
    rows = torch.tensor([5, 0, 6, 2])
    direct, ids, mask = update_module._micro_batch(processor, images, r, rows, "cpu")
    cached, _, _ = update_module._micro_batch(processor, images, r, rows, "cpu", cache)
    assert torch.equal(cached["input_ids"], direct["input_ids"])
    assert torch.equal(cached["attention_mask"], direct["attention_mask"])
    assert "pixel_values" not in cached and cached["image_features"].shape[:2] == (4, 16)
    with torch.no_grad():
        lp_direct = sequence_logprobs(model, direct, ids, mask)
        lp_cached = sequence_logprobs(model, cached, ids, mask)
    assert torch.allclose(lp_cached, lp_direct, atol=1e-6) and lp_direct.abs().sum() > 0
    # The whole update without the cache: the trained fixture's weights and figures.
    monkeypatch.setattr(update_module, "cache_prompts", lambda *a, **k: None)
    model = fresh_policy(setup["base"])
    stats = update(model, setup, PPOConfig(lr=1e-2, minibatch_size=4, epochs=2, target_kl=None))
    assert stats["policy_loss"] == pytest.approx(trained["stats"]["policy_loss"], abs=1e-6)
    assert stats["kl"] == pytest.approx(trained["stats"]["kl"], abs=1e-7)
    assert torch.allclose(logprobs(model, setup), logprobs(trained["model"], setup), atol=1e-5)
    # A projector under LoRA changes the image features at every step: no cache.
    with_projector = fresh_policy(setup["base"], LoraConfig(r=4, train_projector=True))
    monkeypatch.undo()
    assert update_module.cache_prompts(with_projector, processor, images, r, 4, "cpu") is None


def test_saved_adapter_and_merged_checkpoint_reproduce_the_trained_policy(setup, trained, tmp_path):
    model, processor, images = trained["model"], setup["processor"], setup["images"]
    head = ValueHead.for_model(model)
    torch.nn.init.normal_(head.linear.weight)
    save_adapter(model, tmp_path / "adapter", value_head=head)
    merge_and_save(model, processor, tmp_path / "merged")
    inputs = encode_prompts(processor, images, PROMPT)
    with torch.no_grad():
        expected = model(**inputs).logits
        reloaded, _ = load_policy_with_adapter(setup["base"], tmp_path / "adapter")
        assert torch.allclose(reloaded(**inputs).logits, expected, atol=1e-6)
        folded, _ = load_policy_with_adapter(setup["base"], tmp_path / "adapter", merge=True)
        assert torch.allclose(folded(**inputs).logits, expected, atol=1e-5)
        merged, merged_processor = load_policy(tmp_path / "merged")
        assert torch.allclose(merged(**inputs).logits, expected, atol=1e-5)
        assert torch.equal(model(**inputs).logits, expected)  # merging left the trained model alone
    assert torch.equal(load_value_head(tmp_path / "adapter", model).linear.weight, head.linear.weight)
    assert load_value_head(tmp_path / "merged", model) is None
    questions = [PROMPT, "Is there a circle in the image?"]
    greedy = answer(model, processor, images, questions, max_new_tokens=10, progress=False)
    assert answer(merged, merged_processor, images, questions, max_new_tokens=10, progress=False) == greedy
    base, _ = load_policy(setup["base"])
    assert answer(base, processor, images, questions, max_new_tokens=10, progress=False) != greedy  # training mattered
    with pytest.raises(FileNotFoundError, match="save_adapter"):
        load_policy_with_adapter(setup["base"], tmp_path / "merged")


def lora_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_policy_to_train_seeds_fresh_adapters_and_continues_saved_ones(setup, tmp_path):
    critic_free, gae = PPOConfig(seed=3), PPOConfig(seed=3, advantage="gae")
    rng = torch.get_rng_state()
    first, head = policy_to_train(load_policy(setup["base"])[0], None, LORA, critic_free, 1)
    assert torch.equal(torch.get_rng_state(), rng) and head is None  # the draw of A is seeded apart
    again, _ = policy_to_train(load_policy(setup["base"])[0], None, LORA, critic_free, 1)
    other, head = policy_to_train(load_policy(setup["base"])[0], None, LORA, gae, 2)
    a, b, c = lora_state(first), lora_state(again), lora_state(other)
    assert a and all(torch.equal(a[k], b[k]) for k in a) and any(not torch.equal(a[k], c[k]) for k in a)
    assert isinstance(head, ValueHead)
    # round 2 continues round 1's adapters, trainable; a critic-free round 1 left no value head: gae gets a fresh one
    save_adapter(first, tmp_path / "adapter")
    continued, head = policy_to_train(load_policy(setup["base"])[0], tmp_path / "adapter", LORA, gae, 2)
    d = lora_state(continued)
    assert all(torch.equal(a[k], d[k]) for k in a) and isinstance(head, ValueHead)
    assert all(p.requires_grad for n, p in continued.named_parameters() if "lora_" in n)
    trained = ValueHead.for_model(continued)
    torch.nn.init.normal_(trained.linear.weight)
    save_adapter(continued, tmp_path / "with-head", value_head=trained)
    _, head = policy_to_train(load_policy(setup["base"])[0], tmp_path / "with-head", LORA, gae, 3)
    assert torch.equal(head.linear.weight, trained.linear.weight)
    _, head = policy_to_train(load_policy(setup["base"])[0], tmp_path / "with-head", LORA, critic_free, 3)
    assert head is None


def test_config_sections_validate():
    with pytest.raises(ValueError, match="target_modules"):
        LoraConfig(target_modules=("q_proj", "a.b"))
    with pytest.raises(ValueError):
        PPOConfig(advantage="reinforce")


def test_name_slot_loss_moves_probability_between_the_candidates(setup):
    """ppo.name_slot_coef: with no token reward at all, the slots' rewards alone move the policy towards
    the better-rewarded candidate at each slot; the coefficient needs the slots."""
    r = setup["rollouts"]
    first, other = r.response_ids[:, 0], (r.response_ids[:, 0] + 1) % 100 + 3
    slots = NameSlots.build([(i, 0, [int(first[i]), int(other[i])], [-1.0, 1.0]) for i in range(len(r))], 2)
    cfg = PPOConfig(lr=3e-2, minibatch_size=4, epochs=4, name_slot_coef=1.0)
    inputs = encode_prompts(setup["processor"], [setup["images"][i] for i in r.image_index.tolist()], PROMPT)

    def margin(model):  # mean log π(other) − log π(first) at the slots
        with torch.no_grad():
            logits = ActorCritic(model, None)(inputs, r.response_ids, r.mask, with_logits=True)[2][:, 0]
        return float((logits.gather(1, other[:, None]) - logits.gather(1, first[:, None])).mean())

    model = fresh_policy(setup["base"])
    before = margin(model)
    stats = ppo_update(model, setup["processor"], setup["images"], r, torch.zeros_like(setup["rewards"]), cfg,
                       make_accelerator(cfg, cpu=True), torch.Generator().manual_seed(0), slots=slots)
    assert margin(model) > before + 1.0, (before, margin(model))
    assert stats["slot_expected_reward"] > -1.0 and "slot_loss" in stats
    with pytest.raises(ValueError, match="name slots"):
        update(fresh_policy(setup["base"]), setup, cfg)
