"""The policy update: LoRA adapters (fisao/align/lora.py) trained by token-level PPO.

`ppo_update` runs one round's update, top to bottom:
1. reference log-probs (config `ppo.reference`: "base" = adapters disabled; "previous" = the
   policy that sampled the rollouts, whose log-probs the rollouts already hold) and, for GAE,
   the value head's values at sampling time;
2. shaped rewards r_t − β·KL_t, advantages (`ppo.ADVANTAGES[cfg.advantage]`), optional whitening
   over the whole batch of rollouts;
3. `epochs` passes over a seeded permutation of the rollouts; each optimizer step takes
   `minibatch_size × grad_accum` answers in `grad_accum` forward/backward passes (accelerate's
   gradient accumulation), with losses normalised by the step's valid tokens so the split does not
   change the gradient; grad-norm clipping; AdamW, whose state starts afresh each call (round).
   Answers left over after an epoch's last full step sit that epoch out; every epoch draws a new
   permutation from `generator`. With `ppo.target_kl`, the update stops after the first optimizer
   step whose forward measured an approx_kl (KL of the sampling policy to the current one, over
   that step's tokens) past 1.5 × target_kl: a round moves the policy about that far at most,
   however many rollouts (one step past it: a step measures the policy before its own update).
With `ppo.name_slot_coef`, the name-slot loss joins it (fisao/align/ppo.py `name_slot_loss`: at
each slot where a description first names an object, every name's verifier reward weighted by the
policy's probability of it among the names). With `ppo.kl_loss_coef`, a KL term joins the loss: the k3 estimate at the sampled tokens, or with
`ppo.kl_loss_estimator: full` the exact KL over the vocabulary at every response position, the
reference's logits from one more forward with the adapters disabled.
The value head (GAE only) is owned by the caller, so it survives across rounds.
"""
from __future__ import annotations

from typing import Iterator, NamedTuple, Sequence

import peft
import torch
from accelerate import Accelerator
from PIL import Image
from torch import Tensor, nn

from fisao.align.lora import ValueHead
from fisao.align.ppo import (ADVANTAGES, kl_loss, kl_loss_full, kl_per_token, masked_mean, masked_whiten, name_slot_loss,
                             ppo_loss, selective_log_softmax, shaped_rewards, value_loss)
from fisao.align.rewards import NameSlots
from fisao.align.rollout import Rollouts, encode_prompts, pad_right, response_hidden, response_logits, token_logprobs
from fisao.config import PPOConfig
from fisao.models.families import family_of, hf_model


class ActorCritic(nn.Module):
    """Policy and optional value head behind one forward, so accelerate can wrap them together."""

    def __init__(self, policy: peft.PeftModel, value_head: ValueHead | None):
        super().__init__()
        self.policy, self.value_head = policy, value_head

    def forward(self, inputs: dict[str, Tensor], response_ids: Tensor, mask: Tensor,
                with_logits: bool = False) -> tuple[Tensor, Tensor | None] | tuple[Tensor, Tensor | None, Tensor]:
        """(log π of each response token, values or None), both (N, T), 0 on padding; with
        `with_logits` also the (N, T, V) logits at the response positions."""
        hidden = response_hidden(self.policy, inputs, response_ids, mask)
        values = None if self.value_head is None else self.value_head(hidden) * mask
        if not with_logits:
            return token_logprobs(self.policy, hidden, response_ids, mask), values
        logits = response_logits(self.policy, hidden)
        return selective_log_softmax(logits, response_ids) * mask, values, logits

    @torch.no_grad()
    def reference_logits(self, inputs: dict[str, Tensor], response_ids: Tensor, mask: Tensor) -> Tensor:
        """(N, T, V) logits of the reference (adapters disabled) at the response positions."""
        with self.policy.disable_adapter():
            return response_logits(self.policy, response_hidden(self.policy, inputs, response_ids, mask))


class PromptCache(NamedTuple):
    """Every rollout's prompt encoded once per update, instead of once per pass (the reference's and
    each epoch's): its token ids, and each image's features (the frozen vision tower and the
    projector, the family's `image_features`), which the language model reads in place of
    the image tokens. On the demo's tiny LLaVA, under cProfile, the tower was about 40% of the
    update's forward time and the image processing 8% of its micro-batches'; the same figures, to
    float rounding (tests/test_update.py).
    The features wait on the host, a micro-batch's moved to the device when it runs."""

    ids: list[Tensor]  # per rollout, its prompt's token ids without padding (1-D)
    features: dict[int, Tensor]  # image index -> (I, H) image features
    pad_id: int
    left: bool  # the processor pads on the left

    def inputs(self, rows: Tensor, image_index: Tensor, device) -> dict[str, Tensor]:
        """The processor's padded input_ids and attention_mask of `rows`, with their image features."""
        ids = [self.ids[r] for r in rows.tolist()]
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), self.pad_id, dtype=ids[0].dtype)
        attention = torch.zeros(len(ids), width, dtype=torch.long)
        for j, x in enumerate(ids):
            cols = slice(width - len(x), width) if self.left else slice(0, len(x))
            input_ids[j, cols], attention[j, cols] = x, 1
        features = torch.stack([self.features[i] for i in image_index[rows].tolist()])
        return {"input_ids": input_ids.to(device), "attention_mask": attention.to(device),
                "image_features": features.to(device)}


@torch.no_grad()
def cache_prompts(model: peft.PeftModel, processor, images, rollouts: Rollouts, batch_size: int,
                  device) -> PromptCache | None:
    """The update's `PromptCache`, or None where the image features would not stay fixed over the
    update or the family reads images another way: a projector under LoRA (`lora.train_projector`),
    a vision tower with dropout, LLaVA-NeXT's tiles and InstructBLIP's question-dependent Q-Former."""
    hf = hf_model(model)
    features_of = family_of(hf).image_features
    vision = getattr(hf.config, "vision_config", None)
    dropout = max(float(getattr(vision, key, 0.0) or 0.0) for key in ("attention_dropout", "dropout", "hidden_dropout"))
    if (features_of is None or dropout > 0
            or any(".multi_modal_projector." in name and "lora_" in name for name, _ in model.named_parameters())):
        return None
    # A fixed-size family's prompt ids do not depend on the image: each distinct prompt is encoded once,
    # each distinct image's features computed once.
    index = rollouts.image_index.tolist()
    by_prompt: dict[str, Tensor] = {}
    for row, prompt in enumerate(rollouts.prompts):
        if prompt not in by_prompt:
            inputs = encode_prompts(processor, [images[index[row]]], prompt)
            by_prompt[prompt] = inputs["input_ids"][0][inputs["attention_mask"][0].bool()]
    ids = [by_prompt[prompt] for prompt in rollouts.prompts]
    distinct = list(dict.fromkeys(index))
    features: dict[int, Tensor] = {}
    for start in range(0, len(distinct), batch_size):
        chunk = distinct[start : start + batch_size]
        pixels = processor.image_processor(images=[images[i] for i in chunk], return_tensors="pt")["pixel_values"]
        features.update(zip(chunk, features_of(hf, pixels.to(device)).cpu()))  # on the host: moved per micro-batch
    tokenizer = getattr(processor, "tokenizer", processor)
    return PromptCache(ids, features, tokenizer.pad_token_id, tokenizer.padding_side == "left")


def _micro_batch(processor, images, rollouts: Rollouts, rows: Tensor, device,
                 cache: PromptCache | None = None) -> tuple[dict, Tensor, Tensor]:
    """Prompt inputs and the responses of `rows`, cut to their longest answer (from `cache` when given)."""
    width = int(rollouts.mask[rows].sum(1).max())
    if cache is None:
        inputs = encode_prompts(processor, [images[i] for i in rollouts.image_index[rows].tolist()],
                                [rollouts.prompts[i] for i in rows.tolist()], device)
    else:
        inputs = cache.inputs(rows, rollouts.image_index, device)
    return inputs, rollouts.response_ids[rows, :width].to(device), rollouts.mask[rows, :width].to(device)


@torch.no_grad()
def _score_rollouts(actor: ActorCritic, processor, images, rollouts: Rollouts, batch_size: int, device,
                    use_adapters: bool, accelerator: Accelerator | None = None,
                    cache: PromptCache | None = None) -> tuple[Tensor, Tensor | None]:
    """(log-probs, values) of every rollout under the current model, adapters on or off -> (N, T).

    With several processes each scores rows rank, rank + P, … and the results are gathered.
    """
    n, width = len(rollouts), rollouts.mask.shape[1]
    ranks = 1 if accelerator is None else accelerator.num_processes
    mine = torch.arange(n) if ranks == 1 else torch.arange(accelerator.process_index, n, ranks)
    logps, values = [], []
    for rows in mine.split(batch_size):
        inputs, ids, mask = _micro_batch(processor, images, rollouts, rows, device, cache)
        if use_adapters:
            lp, v = actor(inputs, ids, mask)
        else:
            with actor.policy.disable_adapter():
                lp, v = actor(inputs, ids, mask)
        logps.append(pad_right(lp.float().cpu(), width))
        values.append(None if v is None else pad_right(v.float().cpu(), width))
    logp = torch.cat(logps) if logps else torch.zeros(0, width)
    value = None if not values or values[0] is None else torch.cat(values)
    if ranks == 1:
        return logp, value
    return _gather_rows(accelerator, logp, n), (None if actor.value_head is None else _gather_rows(accelerator, value, n))


def _gather_rows(accelerator: Accelerator, part: Tensor, n: int) -> Tensor:
    """Undo the rank-strided split: process p holds rows p, p + P, … of an (n, T) tensor."""
    ranks, per = accelerator.num_processes, -(-n // accelerator.num_processes)
    padded = torch.zeros(per, part.shape[1], dtype=part.dtype)
    padded[: len(part)] = part
    gathered = accelerator.gather(padded.to(accelerator.device)).cpu().view(ranks, per, -1)
    out = torch.empty(n, part.shape[1], dtype=part.dtype)
    for p in range(ranks):
        rows = torch.arange(p, n, ranks)
        out[rows] = gathered[p, : len(rows)]
    return out


def _reference_logprobs(actor, processor, images, rollouts, cfg: PPOConfig, device, accelerator=None,
                        cache: PromptCache | None = None) -> Tensor:
    """(N, T) log-probs of the reference. "previous" is the policy that sampled the rollouts (the
    previous round's final policy), so the KL term of the reward is 0 by construction and only the
    clip bounds how far a round moves; "base" is the model with adapters disabled."""
    if cfg.reference == "previous":
        return rollouts.logprobs.clone()
    return _score_rollouts(actor, processor, images, rollouts, cfg.minibatch_size, device, use_adapters=False,
                           accelerator=accelerator, cache=cache)[0]


def ppo_update(
    model: peft.PeftModel,
    processor,
    images: Sequence[Image.Image],
    rollouts: Rollouts,
    token_rewards: Tensor,
    cfg: PPOConfig,
    accelerator: Accelerator,
    generator: torch.Generator,
    value_head: ValueHead | None = None,
    slots: NameSlots | None = None,
) -> dict[str, float]:
    """Train `model`'s adapters (and `value_head`) in place on one round's rollouts; return stats.

    images: the list `rollouts.image_index` points into; token_rewards (N, T) aligned with
    `rollouts.response_ids` (0 on tokens without a reward). `generator` drives the shuffling and
    seeds dropout (inside a forked RNG). Stats are plain floats: reward_mean (per answer, summed
    over its tokens), kl (per answer, k1, against the reference), policy_loss, value_loss, loss,
    clipfrac, approx_kl, ratio, grad_norm, … averaged over the update. `slots`: the round's name
    slots, for the name-slot loss (`cfg.name_slot_coef`; needed when it is not 0).
    """
    _check_inputs(model, rollouts, token_rewards, cfg, accelerator, value_head, slots)
    device = accelerator.device
    actor = ActorCritic(model, value_head)
    mask = rollouts.mask
    model.eval()
    cache = cache_prompts(model, processor, images, rollouts, cfg.minibatch_size, device)
    ref_logp = _reference_logprobs(actor, processor, images, rollouts, cfg, device, accelerator, cache)
    old_values = None
    if value_head is not None:
        old_values = _score_rollouts(actor, processor, images, rollouts, cfg.minibatch_size, device, use_adapters=True,
                                     accelerator=accelerator, cache=cache)[1]
    rewards = shaped_rewards(token_rewards.float(), rollouts.logprobs, ref_logp, cfg.beta_kl, mask)
    advantages, returns = ADVANTAGES[cfg.advantage](rewards=rewards, values=old_values, mask=mask, gamma=cfg.gamma, lam=cfg.lam)
    stats = _rollout_stats(token_rewards, rollouts.logprobs, ref_logp, rewards, advantages, mask)
    if cfg.whiten:
        # Critic-free: scale only, so a token without a reward keeps advantage 0; shifting the mean
        # would push down every neutral token (measured: the policy collapsed into "a The The The").
        advantages = masked_whiten(advantages, mask, shift_mean=cfg.advantage == "gae")

    targets = Targets(advantages, returns, old_values, ref_logp, slots)
    params = [p for p in actor.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    actor, optimizer = accelerator.prepare(actor, optimizer)
    ranks, rank = accelerator.num_processes, accelerator.process_index
    history: dict[str, list[float]] = {}
    model.train()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
        steps, stopped = 0, False
        for step in step_order(len(rollouts), cfg, generator):
            step_kl = []
            # Every process takes its share of the step; the token count is the whole step's, so
            # the gradient (averaged over processes by DDP) is the one-process gradient.
            tokens_per_micro = float(mask[step].sum()) / (cfg.grad_accum * ranks)
            for rows in step.chunk(ranks)[rank].split(cfg.minibatch_size // ranks):
                with accelerator.accumulate(actor):
                    micro = _train_micro_batch(actor, processor, images, rollouts, rows, targets, cfg,
                                               tokens_per_micro, device, accelerator, cache)
                    if accelerator.sync_gradients:
                        micro["grad_norm"] = float(accelerator.clip_grad_norm_(params, cfg.max_grad_norm))
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                for k, v in micro.items():
                    history.setdefault(k, []).append(v)
                step_kl.append(micro["approx_kl"])
            steps += 1
            stopped = cfg.target_kl is not None and _passed_target(step_kl, cfg.target_kl, accelerator)
            if stopped:
                break
    model.eval()
    means = {k: sum(v) / len(v) for k, v in history.items()}
    if ranks > 1:  # the mean over processes (each saw its share of every step)
        keys = sorted(means)
        reduced = accelerator.reduce(torch.tensor([means[k] for k in keys], device=device), reduction="mean")
        means = dict(zip(keys, reduced.cpu().tolist()))
    stats.update(means)
    stats["optimizer_steps"] = float(steps)
    stats["stopped_early"] = float(stopped)
    return stats


def step_order(n: int, cfg: PPOConfig, generator: torch.Generator) -> Iterator[Tensor]:
    """The rows (minibatch_size × grad_accum,) of each optimizer step of an update over `n`
    rollouts, in order: every epoch a new permutation drawn from `generator`, cut into full steps
    (the rows left over sit that epoch out)."""
    step_rows = cfg.minibatch_size * cfg.grad_accum
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - step_rows + 1, step_rows):
            yield order[start : start + step_rows]


def _passed_target(step_kl: list[float], target_kl: float, accelerator: Accelerator) -> bool:
    """Whether the mean approx_kl of one optimizer step's micro-batches (averaged over processes, so
    every process stops at the same step) passes 1.5 × target_kl."""
    kl = sum(step_kl) / len(step_kl)
    if accelerator.num_processes > 1:
        kl = float(accelerator.reduce(torch.tensor([kl], device=accelerator.device), reduction="mean")[0])
    return kl > 1.5 * target_kl


class Targets(NamedTuple):
    """What the update fits, per rollout token (N, T): advantages, value targets (returns) and the
    values at sampling time (GAE only, else None), and the reference's log-probs; and the name slots
    (None without the name-slot loss)."""

    advantages: Tensor
    returns: Tensor
    old_values: Tensor | None
    ref_logp: Tensor
    slots: NameSlots | None = None


def _train_micro_batch(actor, processor, images, rollouts, rows, targets: Targets, cfg: PPOConfig, num_tokens,
                       device, accelerator, cache: PromptCache | None = None) -> dict[str, float]:
    """One forward/backward on `rows`; returns its stats."""
    inputs, ids, mask = _micro_batch(processor, images, rollouts, rows, device, cache)
    width = ids.shape[1]

    def cut(x: Tensor) -> Tensor:
        return x[rows, :width].to(device)

    full_kl = bool(cfg.kl_loss_coef) and cfg.kl_loss_estimator == "full"
    if full_kl or cfg.name_slot_coef:
        logp, values, logits = actor(inputs, ids, mask, with_logits=True)
    else:
        logp, values = actor(inputs, ids, mask)
    pg_loss, out = ppo_loss(logp, cut(rollouts.logprobs), cut(targets.advantages), mask, cfg.clip, num_tokens)
    loss = pg_loss
    out = {k: float(v) for k, v in out.items()}
    out["policy_loss"] = float(pg_loss.detach())
    if full_kl:
        ref_logits = accelerator.unwrap_model(actor).reference_logits(inputs, ids, mask)
        k_loss = kl_loss_full(logits, ref_logits, mask, num_tokens)
        loss = loss + cfg.kl_loss_coef * k_loss
        out["kl_loss"] = float(k_loss.detach())
    elif cfg.kl_loss_coef:
        k_loss = kl_loss(logp, cut(targets.ref_logp), mask, num_tokens)
        loss = loss + cfg.kl_loss_coef * k_loss
        out["kl_loss"] = float(k_loss.detach())
    if cfg.name_slot_coef:
        slots = targets.slots.of_rows(rows)
        s_loss, expected = name_slot_loss(logits[slots.index[:, 0], slots.index[:, 1]], slots.tokens.to(device),
                                          slots.rewards.to(device), num_tokens, cfg.name_slot_target,
                                          cfg.name_slot_temperature)
        loss = loss + cfg.name_slot_coef * s_loss
        out.update(slot_loss=float(s_loss.detach()), slot_expected_reward=float(expected))
    if values is not None:
        v_loss, v_stats = value_loss(values, cut(targets.old_values), cut(targets.returns), mask, cfg.value_clip, num_tokens)
        loss = loss + cfg.value_coef * v_loss
        out.update(value_loss=float(v_loss.detach()), vf_clipfrac=float(v_stats["vf_clipfrac"]))
    accelerator.backward(loss)
    out["loss"] = float(loss.detach())
    return out


def _rollout_stats(token_rewards, logp, ref_logp, shaped, advantages, mask) -> dict[str, float]:
    """Figures of the batch before any update (per-answer sums, token means)."""
    per_answer = lambda x: float((x * mask).sum(1).mean())  # noqa: E731
    return {
        "reward_mean": per_answer(token_rewards),
        "kl": per_answer(kl_per_token(logp, ref_logp)),
        "kl_token": float(masked_mean(kl_per_token(logp, ref_logp), mask)),
        "shaped_reward_mean": per_answer(shaped),
        "advantage_mean": float(masked_mean(advantages, mask)),
        "advantage_std": float(masked_mean((advantages - masked_mean(advantages, mask)) ** 2, mask).sqrt()),
        "response_length": float(mask.sum(1).float().mean()),
    }


def _check_inputs(model, rollouts, token_rewards, cfg: PPOConfig, accelerator, value_head, slots) -> None:
    if not isinstance(model, peft.PeftModel):
        raise ValueError("ppo_update trains LoRA adapters: wrap the model with add_lora(model, cfg.lora) first")
    if token_rewards.shape != rollouts.mask.shape:
        raise ValueError(f"token_rewards has shape {tuple(token_rewards.shape)}, rollouts {tuple(rollouts.mask.shape)}: "
                         "give one reward per response token")
    if (cfg.advantage == "gae") != (value_head is not None):
        raise ValueError(f"ppo.advantage {cfg.advantage!r} {'needs' if cfg.advantage == 'gae' else 'takes no'} value head: "
                         "pass value_head=ValueHead.for_model(model) for 'gae', None for 'critic_free'")
    if accelerator.gradient_accumulation_steps != cfg.grad_accum:
        raise ValueError(f"the accelerator accumulates {accelerator.gradient_accumulation_steps} steps but ppo.grad_accum "
                         f"is {cfg.grad_accum}: build it with make_accelerator(cfg)")
    if cfg.minibatch_size % accelerator.num_processes:
        raise ValueError(f"ppo.minibatch_size {cfg.minibatch_size} is the global micro-batch: it must divide by the "
                         f"{accelerator.num_processes} processes")
    if cfg.name_slot_coef and slots is None:
        raise ValueError("ppo.name_slot_coef needs the round's name slots (the scoring stage writes them at "
                         "reward.level 'token'): pass slots=load_scores(scores file)[1]")
    if len(rollouts) < cfg.minibatch_size * cfg.grad_accum:
        raise ValueError(f"{len(rollouts)} rollouts are fewer than one optimizer step "
                         f"(ppo.minibatch_size × ppo.grad_accum = {cfg.minibatch_size * cfg.grad_accum})")


def make_accelerator(cfg: PPOConfig, cpu: bool = False, mixed_precision: str = "no") -> Accelerator:
    """An Accelerator that accumulates `cfg.grad_accum` micro-batches per optimizer step."""
    return Accelerator(cpu=cpu, gradient_accumulation_steps=cfg.grad_accum, mixed_precision=mixed_precision)
