"""PPO math: hand-computed values and parity with naive per-sequence references."""
from __future__ import annotations

import math
import typing

import pytest
import torch

from fisao.align.ppo import (
    ADVANTAGES, critic_free_advantages, full_kl_per_token, gae_advantages, kl_loss, kl_loss_full, kl_per_token, masked_mean, masked_whiten, name_slot_loss,
    ppo_loss, selective_log_softmax, shaped_rewards, value_loss,
)
from fisao.config import PPOConfig

MASK = torch.tensor([[True, True, True, False], [True, False, False, False]])


def test_selective_log_softmax_matches_naive_gather():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g) * 4
    index = torch.randint(11, (3, 5), generator=g)
    naive = logits.log_softmax(-1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(selective_log_softmax(logits, index), naive, atol=1e-6)
    half = selective_log_softmax(logits.bfloat16(), index)
    assert half.dtype == torch.bfloat16
    assert torch.allclose(half.float(), naive, atol=0.1)


def test_masked_mean_and_whiten_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [6.0, -50.0, 0.0, 0.0]])
    assert masked_mean(x, MASK).item() == pytest.approx(3.0)  # (1 + 2 + 3 + 6) / 4
    assert masked_mean(x, MASK, num_tokens=2).item() == pytest.approx(6.0)
    w = masked_whiten(x, MASK)
    std = math.sqrt((4 + 1 + 0 + 9) / 4)  # population variance around 3
    expected = torch.tensor([[-2 / std, -1 / std, 0.0, 0.0], [3 / std, 0.0, 0.0, 0.0]])
    assert torch.allclose(w, expected, atol=1e-6)
    assert torch.allclose(masked_whiten(x, MASK, shift_mean=False), (expected + 3.0) * MASK, atol=1e-6)
    assert masked_whiten(torch.tensor([[5.0, 1.0]]), torch.tensor([[True, False]])).tolist() == [[0.0, 0.0]]


def test_kl_estimators_and_shaped_rewards_by_hand():
    logp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]])
    assert kl_per_token(logp, ref)[0].tolist() == pytest.approx([0.5, -1.0])
    k3 = kl_per_token(logp, ref, "k3")[0]
    assert k3.tolist() == pytest.approx([math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0])
    assert (k3 >= 0).all()
    with pytest.raises(ValueError, match="k2"):
        kl_per_token(logp, ref, "k2")
    r = shaped_rewards(torch.tensor([[1.0, 0.0]]), logp, ref, beta=0.1, mask=torch.tensor([[True, False]]))
    assert r[0].tolist() == pytest.approx([1.0 - 0.05, 0.0])


def test_kl_loss_is_the_masked_mean_of_k3_by_hand():
    logp = torch.tensor([[0.0, math.log(2.0), -3.0]])
    ref = torch.tensor([[math.log(2.0), 0.0, 5.0]])
    # k3 = (π_ref/π − 1) − log(π_ref/π): 2 − 1 − log 2, then 1/2 − 1 + log 2; the third token is padding
    first, second = 1 - math.log(2.0), -0.5 + math.log(2.0)
    mask = torch.tensor([[True, True, False]])
    assert float(kl_loss(logp, ref, mask)) == pytest.approx((first + second) / 2)
    assert float(kl_loss(logp, ref, mask, num_tokens=4)) == pytest.approx((first + second) / 4)
    assert float(kl_loss(ref, ref, mask)) == 0.0


def test_full_kl_by_hand_and_against_a_naive_loop():
    # One position, two tokens: π = (1/2, 1/2), π_ref = (1/4, 3/4):
    # KL = ½·log(½ / ¼) + ½·log(½ / ¾) = ½·log 2 + ½·log(2/3).
    logits = torch.log(torch.tensor([[[0.5, 0.5]]])) + 7.0  # a shift of the logits changes nothing
    ref = torch.log(torch.tensor([[[0.25, 0.75]]]))
    assert float(full_kl_per_token(logits, ref)[0, 0]) == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3))
    g = torch.Generator().manual_seed(0)
    logits, ref = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    naive = torch.zeros(2, 3)
    for b in range(2):
        for t in range(3):
            p, q = logits[b, t].softmax(-1), ref[b, t].softmax(-1)
            naive[b, t] = sum(float(p[v] * math.log(p[v] / q[v])) for v in range(5))
    assert torch.allclose(full_kl_per_token(logits, ref), naive, atol=1e-6)
    assert float(full_kl_per_token(ref, ref).abs().max()) < 1e-6
    # Mass moving onto a token the reference almost never writes: the sampled token's k3 barely
    # moves, the full KL does.
    ref = torch.log(torch.tensor([[[0.98, 0.01, 0.01]]]))
    moved = torch.log(torch.tensor([[[0.90, 0.09, 0.01]]]))
    k3 = float(kl_per_token(moved[..., 0], ref[..., 0], "k3")[0, 0])
    assert float(full_kl_per_token(moved, ref)[0, 0]) > 20 * k3
    mask = torch.tensor([[True, False]])
    two = torch.cat([moved, ref], dim=1)
    ref_two = torch.cat([ref, ref], dim=1)
    assert float(kl_loss_full(two, ref_two, mask)) == pytest.approx(float(full_kl_per_token(moved, ref)[0, 0]))


def naive_gae(rewards, values, mask, gamma, lam):
    adv, ret = torch.zeros_like(rewards), torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        n = int(mask[b].sum())
        r, v = rewards[b, :n].tolist(), values[b, :n].tolist() + [0.0]
        a = 0.0
        for t in reversed(range(n)):
            a = r[t] + gamma * v[t + 1] - v[t] + gamma * lam * a
            adv[b, t], ret[b, t] = a, a + v[t]
    return adv, ret


def test_gae_matches_a_per_sequence_loop_and_ignores_padding_values():
    g = torch.Generator().manual_seed(1)
    lengths = [7, 1, 4, 7, 3]
    mask = torch.arange(7)[None, :] < torch.tensor(lengths)[:, None]
    rewards, values = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    adv, ret = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.8)
    ref_adv, ref_ret = naive_gae(rewards, values, mask, 0.9, 0.8)
    assert torch.allclose(adv, ref_adv, atol=1e-6) and torch.allclose(ret, ref_ret, atol=1e-6)
    garbage = torch.where(mask, values, torch.full_like(values, 1e3))  # padding values must not leak in
    adv2, _ = gae_advantages(torch.where(mask, rewards, 7.0), garbage, mask, 0.9, 0.8)
    assert torch.equal(adv, adv2)


def test_gae_by_hand_and_gamma_zero_equals_critic_free():
    mask = torch.tensor([[True, True]])
    adv, ret = gae_advantages(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.25]]), mask, gamma=1.0, lam=1.0)
    # δ1 = 1 − .25 = .75; δ0 = 0 + .25 − .5 = −.25; A0 = δ0 + A1 = .5
    assert adv.tolist() == [[0.5, 0.75]] and ret.tolist() == [[1.0, 1.0]]
    rewards = torch.tensor([[0.3, -1.0, 2.0, 9.0], [1.0, 5.0, 5.0, 5.0]])
    zero, _ = gae_advantages(rewards, torch.zeros(2, 4), MASK, gamma=0.0, lam=0.95)
    free, free_ret = ADVANTAGES["critic_free"](rewards=rewards, values=None, mask=MASK, gamma=0.9, lam=0.95)
    assert torch.equal(zero, free) and torch.equal(free, rewards * MASK) and torch.equal(free_ret, free)
    assert critic_free_advantages(rewards, MASK)[0].tolist() == free.tolist()


def test_every_advantage_the_config_offers_by_hand():
    """Each `ppo.advantage` value, called the way update.py calls it, on one answer of two tokens
    with a reward on the last one only: GAE carries it back to the first token, critic-free does not."""
    offered = typing.get_args(PPOConfig.model_fields["advantage"].annotation)
    rewards, values, mask = torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.25]]), torch.tensor([[True, True]])
    expected = {"gae": [[0.5, 0.75]],  # as in the test above (γ = λ = 1)
                "critic_free": [[0.0, 1.0]]}  # each token its own reward; the values are ignored
    assert sorted(offered) == sorted(ADVANTAGES) == sorted(expected)
    for name in offered:
        adv, _ = ADVANTAGES[name](rewards=rewards, values=values, mask=mask, gamma=1.0, lam=1.0)
        assert adv.tolist() == expected[name], name


def test_left_padded_mask_is_rejected():
    with pytest.raises(ValueError, match="right-padded"):
        gae_advantages(torch.zeros(1, 3), torch.zeros(1, 3), torch.tensor([[False, True, True]]), 1.0, 1.0)


def test_ppo_loss_by_hand():
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # ratios 1.5, 0.5, 1.1
    adv = torch.tensor([[1.0, 1.0, -2.0]])
    mask = torch.tensor([[True, True, True]])
    loss, stats = ppo_loss(logp, old, adv, mask, clip=0.2)
    # token 0: max(−1.5, −1.2) = −1.2 (clipped); token 1: max(−0.5, −0.8) = −0.5; token 2: max(2.2, 2.2) = 2.2
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 2.2) / 3, abs=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(1 / 3)
    assert stats["ratio"].item() == pytest.approx(3.1 / 3, abs=1e-6)
    k3 = [r - 1 - math.log(r) for r in (1.5, 0.5, 1.1)]
    assert stats["approx_kl"].item() == pytest.approx(sum(k3) / 3, abs=1e-6)
    # at ratio 1 the gradient is −A/n on each valid token, 0 on padding
    logp = torch.zeros(2, 4, requires_grad=True)
    adv = torch.tensor([[1.0, 2.0, 3.0, 4.0], [-1.0, 8.0, 8.0, 8.0]])
    ppo_loss(logp, torch.zeros(2, 4), adv, MASK, clip=0.2)[0].backward()
    assert torch.allclose(logp.grad, torch.tensor([[-0.25, -0.5, -0.75, 0.0], [0.25, 0.0, 0.0, 0.0]]))


def test_value_loss_by_hand():
    old = torch.tensor([[0.0, 0.0]])
    values = torch.tensor([[1.0, 0.1]])
    returns = torch.tensor([[2.0, 1.0]])
    loss, stats = value_loss(values, old, returns, torch.tensor([[True, True]]), clip=0.2)
    # token 0: V_clip = .2, max((1−2)², (.2−2)²) = 3.24; token 1: max(.81, .81) = .81
    assert loss.item() == pytest.approx(0.5 * (3.24 + 0.81) / 2)
    assert stats["vf_clipfrac"].item() == pytest.approx(0.5)


def test_token_normalisation_makes_micro_batches_add_up():
    g = torch.Generator().manual_seed(2)
    mask = torch.arange(6)[None, :] < torch.tensor([6, 1, 3, 5])[:, None]
    logp, old, adv = (torch.randn(4, 6, generator=g) * 0.1 for _ in range(3))
    full, _ = ppo_loss(logp, old, adv, mask, clip=0.2)
    per_micro = mask.sum() / 2  # two micro-batches, averaged as accelerate does
    halves = [ppo_loss(logp[s], old[s], adv[s], mask[s], 0.2, num_tokens=per_micro)[0] for s in (slice(0, 2), slice(2, 4))]
    assert (sum(halves) / 2).item() == pytest.approx(full.item(), abs=1e-7)


def test_name_slot_loss_by_hand_and_its_gradient_moves_mass_between_names():
    # one slot, vocabulary of 4; candidates tokens 0 and 2 (−1: none); logits 0 and ln 3 give q = (1/4, 3/4)
    logits = torch.tensor([[0.0, 5.0, math.log(3.0), -2.0]], requires_grad=True)
    tokens, rewards = torch.tensor([[0, 2, -1]]), torch.tensor([[1.0, -1.0, 5.0]])
    loss, expected = name_slot_loss(logits, tokens, rewards)
    assert float(expected) == pytest.approx(0.25 - 0.75) and float(loss.detach()) == pytest.approx(0.5)
    loss.backward()
    # d loss / d logit_k = −q_k (r_k − E): −0.25 · 1.5 and −0.75 · (−0.5); tokens 1 and 3 are no names
    assert logits.grad.tolist()[0] == pytest.approx([-0.375, 0.0, 0.375, 0.0])
    # token-normalised like the PPO terms, and against a naive loop over slots
    s_logits, s_tokens = torch.randn(5, 7), torch.randint(0, 7, (5, 3))
    s_tokens[1, 2] = -1
    s_rewards = torch.rand(5, 3) * 2 - 1
    naive = 0.0
    for row, toks, rws in zip(s_logits, s_tokens.tolist(), s_rewards.tolist()):
        keep = [k for k, t in enumerate(toks) if t >= 0]
        q = torch.softmax(torch.stack([row[toks[k]] for k in keep]), -1)
        naive -= sum(float(q[i]) * rws[k] for i, k in enumerate(keep))
    assert float(name_slot_loss(s_logits, s_tokens, s_rewards, num_tokens=20)[0]) == pytest.approx(naive / 20, rel=1e-5)
    assert float(name_slot_loss(torch.zeros(0, 7), torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 3))[0]) == 0.0


def test_name_slot_distill_by_hand():
    """"distill": KL(softmax(r / T) ‖ π) over the candidates, π over the whole vocabulary; its gradient on
    the logits is π − p (p 0 outside the candidates), so it also takes back what went to other tokens."""
    logits = torch.tensor([[0.0, 5.0, math.log(3.0)]], requires_grad=True)
    tokens, rewards = torch.tensor([[0, 2, -1]]), torch.tensor([[1.0, -1.0, 7.0]])
    loss, expected = name_slot_loss(logits, tokens, rewards, target="distill", temperature=1.0)
    p = torch.softmax(torch.tensor([1.0, -1.0]), -1)
    pi = torch.softmax(logits.detach()[0], -1)
    assert float(loss.detach()) == pytest.approx(float((p * (p.log() - pi[[0, 2]].log())).sum()), rel=1e-6)
    assert float(expected) == pytest.approx(0.25 - 0.75)  # the names' expected reward, renormalised over them
    loss.backward()
    assert logits.grad.tolist()[0] == pytest.approx([float(pi[0] - p[0]), float(pi[1]), float(pi[2] - p[1])], rel=1e-5)
    with pytest.raises(ValueError, match="distill"):
        name_slot_loss(logits, tokens, rewards, target="argmax")
