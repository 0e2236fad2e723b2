"""PPO over tokens, as pure tensor functions: KL-shaped rewards, advantages, clipped losses.

Every function takes right-padded (B, T) tensors and a bool `mask` that is True on the generated
tokens (EOS included) and False on the padding after them; nothing here logs, moves devices or
knows about models. The caller (`fisao.align.update`) logs the returned stats.

Losses are token-normalised: a mean over the valid tokens. When one optimizer step spans several
micro-batches, pass `num_tokens` (the step's valid tokens divided by the number of micro-batches)
so that the accumulated gradient equals that of one big batch, whatever the split.

Advantage estimators are picked by name from `ADVANTAGES` (config `ppo.advantage`):
- "gae": generalised advantage estimation with a value head (Schulman et al., 2016);
- "critic_free": γ = 0, so each token's advantage is its own shaped reward — the paper's
  "preference modeling as next-token prediction" reading of FiSAO. No value head.
Whitening (`masked_whiten`) is applied by the caller to either, as `ppo.whiten` says.
"""
from __future__ import annotations

import torch
from torch import Tensor


def selective_log_softmax(logits: Tensor, index: Tensor) -> Tensor:
    """log softmax(logits)[index] without materialising the (…, V) log-probabilities.

    logits (…, V) and index (…) long -> (…). Equal to `logits.log_softmax(-1).gather(-1, index)`;
    in float32/64 it takes a row-wise logsumexp (peak memory one row of V), in half precision it
    runs log_softmax row by row in the logits' dtype, as upcasting the whole tensor would not fit.
    """
    if logits.dtype in (torch.float32, torch.float64):
        picked = logits.gather(-1, index.unsqueeze(-1)).squeeze(-1)
        lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
        return picked - lse
    rows = [row.log_softmax(-1).gather(-1, idx.unsqueeze(-1)).squeeze(-1) for row, idx in zip(logits, index)]
    return torch.stack(rows)


def masked_mean(x: Tensor, mask: Tensor, num_tokens: float | Tensor | None = None) -> Tensor:
    """Mean of `x` over True entries of `mask` (same shape) -> scalar.

    `num_tokens` replaces the count of True entries as the denominator (see the module docstring).
    """
    total = (x * mask).sum()
    return total / (mask.sum() if num_tokens is None else num_tokens)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x − mean) / std over the valid entries; padding comes back as 0. (B, T) -> (B, T).

    Population variance (no Bessel correction), so one valid token is whitened to 0, not NaN.
    With `shift_mean=False` the mean is added back (scale only), as for rewards in some PPO codes.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def kl_per_token(logp: Tensor, ref_logp: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of KL(π ‖ π_ref) at the sampled tokens. (B, T), (B, T) -> (B, T).

    "k1" = log π − log π_ref (unbiased, can be negative: the one in the shaped reward);
    "k3" = (r − 1) − log r with r = π_ref / π (unbiased, never negative; Schulman's estimator).
    """
    log_ratio = logp - ref_logp
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"kl estimator {estimator!r}: use 'k1' or 'k3'")


def shaped_rewards(rewards: Tensor, logp: Tensor, ref_logp: Tensor, beta: float, mask: Tensor) -> Tensor:
    """r_t − β·(log π − log π_ref)_t on valid tokens, 0 on padding. All (B, T) -> (B, T)."""
    return (rewards - beta * kl_per_token(logp, ref_logp)) * mask


def _check_right_padded(mask: Tensor) -> None:
    if (mask[:, 1:] & ~mask[:, :-1]).any():
        raise ValueError("mask must be right-padded (True then False in every row); got a False before a True")


def gae_advantages(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """GAE over right-padded sequences -> (advantages, returns), both (B, T), 0 on padding.

    δ_t = r_t + γ V_{t+1} − V_t with V = 0 past a sequence's last token; A_t = δ_t + γλ A_{t+1};
    returns R_t = A_t + V_t (the value head's regression target).
    """
    _check_right_padded(mask)
    mask_f = mask.to(rewards.dtype)
    rewards, values = rewards * mask_f, values * mask_f
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask_f
    return advantages, (advantages + values) * mask_f


def critic_free_advantages(rewards: Tensor, mask: Tensor, values: Tensor | None = None,
                           gamma: float | None = None, lam: float | None = None) -> tuple[Tensor, Tensor]:
    """γ = 0: each token's advantage is its own (shaped) reward -> (advantages, returns), (B, T).

    There is no critic: `values`, `gamma` and `lam` are accepted only so that every entry of
    `ADVANTAGES` is called the same way, and are ignored. Returns equal the rewards.
    """
    _check_right_padded(mask)
    advantages = rewards * mask
    return advantages, advantages.clone()


ADVANTAGES = {"gae": gae_advantages, "critic_free": critic_free_advantages}


def ppo_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip: float,
             num_tokens: float | Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO-clip policy loss, token-normalised -> (loss scalar, stats).

    logp (B, T) under the policy being trained, old_logp (B, T) under the policy that sampled,
    advantages (B, T). Per token: max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε)) with ρ = exp(logp − old_logp).
    Stats (detached scalars): clipfrac (share of tokens where the clipped term is taken),
    approx_kl (k3 estimate of KL(π_old ‖ π)), ratio (mean ρ).
    """
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask, num_tokens)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def kl_loss(logp: Tensor, ref_logp: Tensor, mask: Tensor, num_tokens: float | Tensor | None = None) -> Tensor:
    """Token-normalised k3 estimate of KL(π ‖ π_ref) as a loss term -> scalar. All inputs (B, T).

    Unlike the KL in the shaped reward (computed once from the sampling policy, so it steers only
    through the advantages of the tokens it was computed on), this term is recomputed as π moves
    and pulls every token back towards the reference, tokens without a reward included (as GRPO
    puts it in the loss).
    """
    return masked_mean(kl_per_token(logp, ref_logp, "k3"), mask, num_tokens)


def full_kl_per_token(logits: Tensor, ref_logits: Tensor) -> Tensor:
    """Exact KL(π(·|s_t) ‖ π_ref(·|s_t)) over the whole vocabulary at each position. (B, T, V) x2 -> (B, T).

    Σ_v π(v) (log π(v) − log π_ref(v)), in float32. Unlike the k1/k3 estimates at the sampled
    token, it sees probability moving onto tokens the rollouts never sampled (measured: after one
    round, "No" glued onto object names in most descriptions, a token the reference almost never
    writes there).
    """
    logp = logits.float().log_softmax(-1)
    ref_logp = ref_logits.float().log_softmax(-1)
    return (logp.exp() * (logp - ref_logp)).sum(-1)


def kl_loss_full(logits: Tensor, ref_logits: Tensor, mask: Tensor, num_tokens: float | Tensor | None = None) -> Tensor:
    """Token-normalised exact KL(π ‖ π_ref) (`full_kl_per_token`) as a loss term -> scalar.

    logits, ref_logits (B, T, V) at the response positions; mask (B, T).
    """
    return masked_mean(full_kl_per_token(logits, ref_logits), mask, num_tokens)


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float,
               num_tokens: float | Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss, token-normalised -> (loss scalar, stats). All inputs (B, T).

    ½·max((V − R)², (V_clip − R)²) with V_clip = old_V + clip(V − old_V, −c, c), as in PPO2.
    Stats: vf_clipfrac (share of tokens where the clipped term is taken).
    """
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped_sq = (values - returns) ** 2
    clipped_sq = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_sq, clipped_sq), mask, num_tokens)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((clipped_sq > unclipped_sq).float(), mask)}
    return loss, stats


def name_slot_loss(slot_logits: Tensor, tokens: Tensor, rewards: Tensor, num_tokens: float | Tensor | None = None,
                   target: str = "expected", temperature: float = 0.25) -> tuple[Tensor, Tensor]:
    """The name-slot loss -> (loss, mean expected reward of the names under the policy).

    slot_logits (S, V): the policy's logits at S name slots; tokens (S, K) long: the candidate names'
    first tokens (−1: not a candidate); rewards (S, K): each candidate's reward. q is the policy's
    probabilities renormalised over a slot's candidates; the loss is summed over slots and divided by
    `num_tokens` (default S), as the PPO terms are. `target`:
    - "expected": −Σ_k q_k r_k, the verifier's expected reward of the names. Its gradient on a
      candidate's logit is q_k (r_k − Σ_j q_j r_j): probability moves between names, towards those the
      verifier finds in the image, but slowly where the policy is sure of a wrong name (q_k near 1);
    - "distill": KL(p ‖ π) with p = softmax(r / temperature) over the candidates and π the policy's
      probabilities over the whole vocabulary (not renormalised): its gradient π − p does not fade
      where the policy is sure of a wrong name, and it also draws back the probability that left the
      names for other tokens (on val, "expected" let "No"/"Yes" creep into the name slot: "The purpleNo.").
    With "expected" the probability of naming anything at all is left to the sampled-token terms.
    """
    valid = tokens >= 0
    picked = slot_logits.gather(-1, tokens.clamp(min=0)).float().masked_fill(~valid, float("-inf"))
    log_q = picked.log_softmax(-1)
    q = log_q.exp()
    rewards = rewards.float().masked_fill(~valid, 0.0)
    expected = (q * rewards).sum(-1)
    if target == "expected":
        per_slot = -expected
    elif target == "distill":
        log_p = (rewards / temperature).masked_fill(~valid, float("-inf")).log_softmax(-1)
        log_pi = slot_logits.float().log_softmax(-1).gather(-1, tokens.clamp(min=0))
        per_slot = (log_p.exp() * (log_p - log_pi)).masked_fill(~valid, 0.0).sum(-1)
    else:
        raise ValueError(f"name-slot target {target!r}: use 'expected' or 'distill'")
    denominator = len(expected) if num_tokens is None else num_tokens
    return per_slot.sum() / max(denominator, 1), expected.detach().mean() if len(expected) else expected.sum()
