"""TRL's GRPO as a peer of FiSAO: one round of `trl.GRPOTrainer` on our LLaVA, one reward per answer.

What a user would run instead of FiSAO (issue 14): GRPO with LoRA and a reward function that
scores each whole answer. Here the reward comes from the SAME verifier and calibration as FiSAO's
(`answer_reward`: the mean of the answer's mention rewards as `fisao.align.score.description_rewards`
gives them, 0 for an answer without a mention), the LoRA is FiSAO's own (`add_lora`, the same r,
alpha and target modules; round k continues round k−1's adapters), and the round writes what a
FiSAO round writes (`adapter/`, the merged `model/`), so the project's evaluation loads it as is.

What it took to drive our class, all on our side (TRL is not patched):
- the dataset: a conversational `prompt` whose content is the plain question (TRL puts the image
  placeholder before it; the processor's chat template then gives exactly the prompt ids FiSAO
  samples with, checked at the start), an `image` column of PIL images and `image_id` for the reward;
- `processing_class` = our LlavaProcessor; the model is passed as a PeftModel we built;
- `generation_kwargs={"suppress_tokens": banned_token_ids(processor)}`: TRL suppresses only the
  image token, our sampler also pad and <s>;
- the KL reference: given a PeftModel with an adapter and β > 0, TRL copies the adapter as "ref"
  (the round's starting policy). With `ppo.reference` "base" (FiSAO's default) that copy is
  deleted after the trainer is built, so TRL falls back to disabling the adapters: the base model,
  as in FiSAO. With "previous" it stays;
- TRL's `set_seed` moves the global random state: the round runs inside a saved and restored one.

TRL's defaults that differ from ours, pinned here: `beta` (0.0 in TRL, no KL) = `ppo.beta_kl`;
`num_iterations` (1) = `ppo.epochs`; `epsilon` = `ppo.clip`; gradient checkpointing and bf16 off
(CPU); a constant learning rate with AdamW, no weight decay (TRL's default decays it linearly);
`loss_type="dapo"`: each step's token losses summed and divided by the step's valid tokens, the
token-normalised mean of `fisao.align.ppo` (where "grpo" would weigh short answers' tokens more);
`scale_rewards="batch"`: advantage = (reward − its group's mean) / std of the round's rewards, the
nearest to FiSAO's whitening over the batch; "group" would divide by each image's own std and
blow up near-ties between an image's answers (the difficulty bias of Dr. GRPO).

Where it still departs from a FiSAO round, by design of the method compared: the reward is one
number per answer and the advantage the same on every token; TRL's KL is a k3 term in the loss
(FiSAO's is k1 in the reward); no yes/no questions are asked (`rollout.questions_per_image`); the
round's answers are shuffled once and the same minibatches repeat over the iterations; TRL
re-encodes an image once per completion per pass; log-probs are of the temperature-scaled policy.
"""
from __future__ import annotations

import functools
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from fisao import io
from fisao.peers import kept_random_state
from fisao.align.calibration import Calibration
from fisao.align.lora import add_lora, load_adapter, merge_and_save, save_adapter
from fisao.align.rollout import encode_prompts
from fisao.align.score import description_rewards
from fisao.align.verifier import Verifier
from fisao.benchmarks.mentions import parse_mentions
from fisao.benchmarks.vocab import Vocabulary
from fisao.coco import load_image
from fisao.config import LoraConfig, PPOConfig, RewardConfig, RolloutConfig
from fisao.generate import banned_token_ids, load_policy
from fisao.world.data import Example

ANSWERS = "answers.jsonl"
FIGURES = "figures.json"


def answer_reward(text: str, score: Callable[[list[str]], torch.Tensor], vocab: Vocabulary,
                  calibration: Calibration, reward: RewardConfig) -> float:
    """The whole answer's reward: the mean of its mention rewards, 0 for an answer with no mention.

    Each mention reward is FiSAO's (`description_rewards`): the CHAIR parser's mentions over
    `vocab`, `score(categories)` their verifier scores (M,), `reward.shape` against the
    calibration's (b, w), then `reward.repeats` (by default a repeated category keeps only a
    penalty, and counts in the mean). `reward.level` and `reward.span` do not matter here.
    """
    _, _, rewards = description_rewards(text, vocab, score, calibration, reward)
    return sum(rewards) / len(rewards) if rewards else 0.0


def grpo_round(policy_dir: str | Path, adapter_in: str | Path | None, examples: Sequence[Example], verifier: Verifier,
               calibration: Calibration, *, rollout: RolloutConfig, reward: RewardConfig, lora: LoraConfig,
               ppo: PPOConfig, round_index: int, out: str | Path, progress: bool = False) -> dict:
    """One GRPO round on `examples` (the round's images); writes `out` and returns its figures.

    policy_dir: the base model; adapter_in: the previous round's `adapter/` (None: fresh LoRA,
    seeded as FiSAO's update seeds it). Per image `rollout.n_per_image` answers to `rollout.prompt`
    (TRL's `num_generations`), at `rollout.temperature`, `top_p`, `max_new_tokens`; `ppo.lr`,
    `minibatch_size` (rows per forward), `grad_accum`, `max_grad_norm`, `clip`, `epochs`,
    `beta_kl`, `reference` and `seed` as the module docstring says. `calibration` is the
    mention-level one (`fisao.align.score.read_calibration(...)[0]`).

    Writes `adapter/` (peft safetensors), `model/` (merged, for `fisao.generate.load_policy`),
    `answers.jsonl` (each sampled answer: image id, text, tokens, mentions, reward — exactly what
    TRL trained on) and `figures.json` (answers, images, seconds, reward_mean, optimizer_steps, …).
    """
    t0 = time.time()
    trl, datasets = _trl()
    n_rows = len(examples) * rollout.n_per_image
    _check(examples, rollout, reward, ppo, n_rows)
    seed = ppo.seed * 1000 + round_index
    model, processor = load_policy(policy_dir)
    ordered = sorted(examples, key=lambda e: e.image_id)
    images = [load_image(e.image) for e in ordered]
    _check_prompt_ids(processor, rollout.prompt, images[0])
    embeddings = dict(zip((e.image_id for e in ordered), verifier.image_embeddings(images)))
    tok = processor.tokenizer
    rows: list[dict] = []

    def whole_answer_reward(prompts, completions, completion_ids, image_id, **_) -> list[float]:
        """TRL's reward function: `answer_reward` of each completion, recorded as it is given."""
        out_rewards = []
        for ids, i in zip(completion_ids, image_id):
            text = tok.decode(ids, skip_special_tokens=True).strip()  # as fisao's rollouts decode
            value = answer_reward(text, functools.partial(verifier.score, embeddings[i]), verifier.vocab,
                                  calibration, reward)
            rows.append({"image_id": int(i), "text": text, "tokens": len(ids),
                         "mentions": len(parse_mentions(text, verifier.vocab)), "reward": value})
            out_rewards.append(value)
        return out_rewards

    dataset = datasets.Dataset.from_dict({
        "prompt": [[{"role": "user", "content": rollout.prompt}] for _ in ordered],
        "image": images, "image_id": [e.image_id for e in ordered]})
    out = Path(out)
    with kept_random_state(), io.atomic_dir(out) as tmp:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # LoRA's random A matrices, as update_stage seeds them
            model = add_lora(model, lora) if adapter_in is None else load_adapter(model, adapter_in, is_trainable=True)
        args = grpo_args(rollout, ppo, n_rows, seed, banned_token_ids(processor), tmp / "trl", progress)
        trainer = trl.GRPOTrainer(model=model, reward_funcs=whole_answer_reward, args=args, train_dataset=dataset,
                                  processing_class=processor)
        if ppo.reference == "base" and "ref" in model.peft_config:
            model.delete_adapter("ref")  # TRL then disables the adapters for the reference: the base model
        if not progress:
            trainer.remove_callback(_printer_callback())
        t_train = time.time()
        trainer.train()
        train_seconds = time.time() - t_train
        assert len(rows) == n_rows, f"TRL rewarded {len(rows)} answers, {n_rows} were sampled"
        shutil.rmtree(tmp / "trl", ignore_errors=True)
        save_adapter(model, tmp / "adapter")
        merge_and_save(model, processor, tmp / "model")
        io.write_jsonl(tmp / ANSWERS, rows)
        figures = _figures(rows, trainer.state.log_history, len(ordered))
        figures.update(train_seconds=round(train_seconds, 2), seconds=round(time.time() - t0, 2))
        io.write_json(tmp / FIGURES, figures)
    return figures


def grpo_args(rollout: RolloutConfig, ppo: PPOConfig, n_rows: int, seed: int, suppress: Sequence[int],
              output_dir: str | Path, progress: bool = False):
    """TRL's GRPOConfig for one round of `n_rows` answers, every setting that differs from ours pinned.

    One generation covers the whole round (`generation_batch_size` = `n_rows`), cut into
    minibatches of `ppo.minibatch_size` rows, `ppo.grad_accum` of them per optimizer step, for
    `ppo.epochs` passes (`num_iterations`); `suppress`: the token ids sampling never emits.
    """
    trl, _ = _trl()
    return trl.GRPOConfig(
        output_dir=str(output_dir), report_to="none", push_to_hub=False, save_strategy="no", use_cpu=True,
        seed=seed, data_seed=seed, logging_steps=1, disable_tqdm=not progress,
        num_generations=rollout.n_per_image, generation_batch_size=n_rows, num_train_epochs=1,
        per_device_train_batch_size=ppo.minibatch_size, gradient_accumulation_steps=ppo.grad_accum,
        temperature=rollout.temperature, top_p=rollout.top_p, top_k=0, max_completion_length=rollout.max_new_tokens,
        generation_kwargs={"suppress_tokens": list(suppress)},
        learning_rate=ppo.lr, lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch", weight_decay=0.0,
        max_grad_norm=ppo.max_grad_norm, beta=ppo.beta_kl, num_iterations=ppo.epochs, epsilon=ppo.clip,
        loss_type="dapo", scale_rewards="batch", gradient_checkpointing=False, bf16=False,
    )


def _trl():
    """(trl, datasets), or an ImportError that says how to install them."""
    try:
        import datasets
        import trl
    except ImportError as e:
        raise ImportError("the GRPO peer needs the peers extra: pip install -e '.[peers]' "
                          "(or make peers, which installs requirements-peers.lock)") from e
    return trl, datasets


def _check(examples: Sequence[Example], rollout: RolloutConfig, reward: RewardConfig, ppo: PPOConfig, n_rows: int) -> None:
    """ValueErrors for settings GRPO cannot run with, each naming the key to change."""
    if not examples:
        raise ValueError("grpo_round got no images: pass the round's examples (fisao.align.sample.round_examples)")
    if len({e.image_id for e in examples}) != len(examples):
        raise ValueError("grpo_round got the same image twice: pass each of the round's examples once")
    if rollout.n_per_image < 2:
        raise ValueError(f"rollout.n_per_image is {rollout.n_per_image}: GRPO's advantage compares an image's answers "
                         "with each other, set it to 2 or more")
    if reward.verifier != "clip":
        raise ValueError(f"reward.verifier is {reward.verifier!r}: the GRPO peer scores with the policy's own CLIP, "
                         "set reward.verifier: clip")
    step_rows = ppo.minibatch_size * ppo.grad_accum
    if n_rows % step_rows:
        raise ValueError(f"{len(examples)} images x rollout.n_per_image {rollout.n_per_image} = {n_rows} answers do not "
                         f"split into optimizer steps of ppo.minibatch_size x ppo.grad_accum = {step_rows} rows: "
                         "choose values that divide it")


def _check_prompt_ids(processor, prompt: str, image) -> None:
    """TRL's prompt ids (its message preparation, the processor's chat template) must be the ones
    FiSAO samples with (`fisao.align.rollout.encode_prompts`), image tokens included."""
    from trl.data_utils import prepare_multimodal_messages

    messages = prepare_multimodal_messages([{"role": "user", "content": prompt}], images=[image])
    theirs = processor.apply_chat_template(conversation=[messages], add_generation_prompt=True, tokenize=True,
                                           return_dict=True)["input_ids"][0]
    ours = encode_prompts(processor, [image], prompt)["input_ids"][0]
    if list(theirs) != ours.tolist():
        tok = processor.tokenizer
        raise ValueError(f"TRL would prompt with {tok.decode(list(theirs))!r} where FiSAO prompts with "
                         f"{tok.decode(ours.tolist())!r}: GRPO would train on another prompt; use a policy whose "
                         "processor carries the model's chat template")


def _figures(rows: list[dict], log_history: list[dict], n_images: int) -> dict:
    """The round's figures from the answers and TRL's per-step logs."""
    steps = [h for h in log_history if "loss" in h]

    def mean_of(key: str) -> float | None:
        values = [h[key] for h in steps if key in h]
        return float(np.mean(values)) if values else None

    rewards = [r["reward"] for r in rows]
    return {"answers": len(rows), "images": n_images, "reward_mean": float(np.mean(rewards)),
            "share_without_mention": sum(r["mentions"] == 0 for r in rows) / len(rows),
            "optimizer_steps": len(steps), "kl_mean": mean_of("kl"), "loss_mean": mean_of("loss"),
            "clip_ratio_mean": mean_of("clip_ratio/region_mean"), "tokens_mean": float(np.mean([r["tokens"] for r in rows]))}


def _printer_callback():
    from transformers.trainer_callback import PrinterCallback

    return PrinterCallback

