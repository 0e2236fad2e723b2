"""CSR-style iterative DPO: the peer a user would run instead of FiSAO's token-level PPO.

Calibrated Self-Rewarding (Zhou et al. 2024, "Calibrated Self-Rewarding Vision Language Models",
arXiv 2405.14622, code github.com/YiyangZhou/CSR) scores each sampled answer with the model's own
likelihood calibrated by a CLIP image–answer similarity, and trains DPO on the best vs the worst
answer of each image; the next iteration samples from the new model. One round here, top to bottom:
1. sample the answers FiSAO samples in a round (`sample_rollouts`: same prompt, answers per image,
   temperature, max_new_tokens, seed) from the round's starting policy;
2. score each whole answer: `csr_score` = λ·(mean token log-prob under that policy) + (1 − λ)·(CLIP
   cosine of image and answer from FiSAO's own verifier, `Verifier.text_scores`);
3. `preference_pairs`: per image, the best vs the worst answer;
4. one DPO pass with `trl.DPOTrainer` (the same LoRA as FiSAO, `fisao.align.lora.add_lora`; the
   reference is the round's starting policy), then the adapters and a merged checkpoint.

Where this departs from CSR's code (inference_csr/ of YiyangZhou/CSR):
- λ: construct.py weighs the CLIP term by `clip_alpha` and the model's own score by 1 − clip_alpha,
  with clip_alpha = 0.9 (step3.sh, CLIP_ALPHA=0.9; also the argparse default). Here λ weighs the
  log-prob, so λ = 1 − 0.9 = 0.1 (`CSR_LAMBDA`).
- Whole answers, not sentences: CSR grows each answer sentence by sentence in a beam search
  (sample.py: 5 diverse beams per step, the sentence ended at '.'), scores every sentence, ranks it
  among its siblings on each term (utils.Rank_Node.calculate_ranks), adds (1 − α)·rank + α·clip_rank
  along the path and divides by the number of sentences; chosen and rejected are the best and worst
  finished paths. Here the answers are FiSAO's sampled ones (so both methods see the same answers),
  each scored once as a whole, and the two terms enter by value, not by rank: the log-prob is the
  mean over the answer's tokens (EOS included), not beam search's length-normalised sentence score,
  and the CLIP term is the cosine, not CLIP's logit (100·cosine).
- Captions only: FiSAO's round also asks yes/no questions (`rollout.questions_per_image`); a whole
  answer "Yes" has no CLIP similarity worth the name, and CSR's prompts are open-ended, so only the
  `rollout.prompt` answers are sampled here.
- β: CSR's training script (scripts/run_train.sh) sets no β, and its trainer is TRL's DPOTrainer
  (README, installation step 5), so it runs at TRL's default 0.1, as here (`DPO_BETA`).
- LoRA: FiSAO's (r, alpha, target modules), not CSR's r = 128, alpha = 256 on every linear layer;
  the next round continues the adapters (CSR merges them and starts fresh ones each iteration).

What it took to drive our LLaVA with `trl.DPOTrainer` (trl 1.16.0, not patched): our own collator,
`PairCollator`. TRL's vision collator re-tokenizes the answers' text after its chat template, with
`add_special_tokens=False`: our LLaVA prompt has no <s> in its chat template, so the prompt would
lose the <s> the answers were sampled after, and the answers would lose their EOS (TRL's
conversational format adds none). `PairCollator` builds the batch from the sampled token ids
themselves, the prompt encoded as sampling encoded it (`encode_prompts`), in the layout TRL's own
collator returns (prompt and completion flushed left, `completion_mask`). The reference is TRL's
"ref" copy of the starting adapters (what it does for a PeftModel given no `ref_model`); it is
deleted before the adapters are saved. TRL seeds the global random generators (`set_seed`):
`fisao.peers.kept_random_state` gives the caller's back.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from torch import Tensor

from fisao import io
from fisao.peers import kept_random_state
from fisao.align.lora import add_lora, load_adapter, merge_and_save, save_adapter
from fisao.align.rollout import Rollouts, encode_prompts, sample_rollouts
from fisao.align.verifier import Verifier
from fisao.coco import load_image
from fisao.config import LoraConfig, ModelConfig, PPOConfig, RolloutConfig
from fisao.runtime import load_runtime_policy, runtime_device
from fisao.world.data import Example

CSR_LAMBDA = 0.1  # weight of the mean token log-prob; 1 − clip_alpha (0.9) of CSR's construct.py
DPO_BETA = 0.1  # TRL's default, which CSR's run_train.sh leaves as it is
ANSWERS = "answers.jsonl"
PAIRS = "pairs.jsonl"
FIGURES = "figures.json"


@dataclass(frozen=True)
class CSRConfig:
    """The DPO side of a CSR round (sampling is `RolloutConfig`'s, the adapters `LoraConfig`'s).

    lr: to be picked on val from the same three values as every method (issue 14); the default is
    FiSAO's `ppo.lr`. batch_size: preference pairs (two answers each) per optimizer step; epochs:
    passes over a round's pairs.
    """

    lam: float = CSR_LAMBDA
    beta: float = DPO_BETA
    lr: float = PPOConfig.model_fields["lr"].default
    batch_size: int = 4
    epochs: int = 1
    seed: int = 0

    def __post_init__(self):
        if not 0 <= self.lam <= 1:
            raise ValueError(f"csr lam is {self.lam}: it weighs the log-prob against the CLIP similarity, set it in [0, 1]")
        for name in ("beta", "lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"csr {name} is {getattr(self, name)}: set a positive value")
        for name in ("batch_size", "epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"csr {name} is {getattr(self, name)}: set it to 1 or more")


def csr_score(mean_token_logprob: Tensor, clip_similarity: Tensor, lam: float = CSR_LAMBDA) -> Tensor:
    """CSR's calibrated reward of whole answers: λ·mean log-prob + (1 − λ)·CLIP similarity -> (N,).

    mean_token_logprob (N,): the answer's mean token log-prob under the policy that sampled it;
    clip_similarity (N,): cosine of the image and the answer (`Verifier.text_scores`).
    """
    if not 0 <= lam <= 1:
        raise ValueError(f"lam is {lam}: set it in [0, 1] (CSR's is {CSR_LAMBDA})")
    if mean_token_logprob.shape != clip_similarity.shape:
        raise ValueError(f"{tuple(mean_token_logprob.shape)} log-probs for {tuple(clip_similarity.shape)} CLIP similarities")
    return lam * mean_token_logprob + (1 - lam) * clip_similarity


def mean_token_logprob(logprobs: Tensor, mask: Tensor) -> Tensor:
    """(N, T) token log-probs and (N, T) bool mask -> (N,) mean over each answer's tokens (0 for none)."""
    return (logprobs * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def preference_pairs(scores: Sequence[float], groups: Sequence[int], texts: Sequence[str]) -> list[tuple[int, int]]:
    """(chosen row, rejected row) per group (image), in order of first appearance: its best- and worst-scored answers.

    Ties go to the earliest row, for the best as for the worst. A group gives no pair when its best
    and worst answers have the same text (all its answers score the same, a single answer, or one
    text sampled twice whose log-probs differ only by float rounding).
    """
    if not len(scores) == len(groups) == len(texts):
        raise ValueError(f"{len(scores)} scores, {len(groups)} groups and {len(texts)} texts: give one of each per answer")
    rows: dict[int, list[int]] = {}
    for row, group in enumerate(groups):
        rows.setdefault(group, []).append(row)
    pairs = []
    for members in rows.values():
        best = max(members, key=lambda r: (scores[r], -r))
        worst = min(members, key=lambda r: (scores[r], r))
        if texts[best] != texts[worst]:
            pairs.append((best, worst))
    return pairs


@dataclass
class ScoredAnswers:
    """A round's sampled answers with CSR's two terms and score, each (N,); rows as `rollouts`."""

    rollouts: Rollouts
    mean_logprob: Tensor
    clip: Tensor
    score: Tensor


def score_answers(model, processor, images: Sequence[Image.Image], verifier: Verifier, rollout: RolloutConfig,
                  lam: float, seed: int, progress: bool = False) -> ScoredAnswers:
    """Sample `rollout.n_per_image` answers to `rollout.prompt` per image from `model` and score them."""
    rollouts = sample_rollouts(model, processor, images, rollout.prompt, rollout.n_per_image,
                               temperature=rollout.temperature, top_p=rollout.top_p,
                               max_new_tokens=rollout.max_new_tokens, batch_size=rollout.batch_size, seed=seed,
                               progress=progress)
    logp = mean_token_logprob(rollouts.logprobs, rollouts.mask)
    clip = verifier.text_scores(verifier.image_embeddings(images)[rollouts.image_index], rollouts.texts).float()
    return ScoredAnswers(rollouts, logp, clip, csr_score(logp, clip, lam))


@dataclass
class PairCollator:
    """A batch of preference pairs for `trl.DPOTrainer` from the sampled token ids (see the module docstring).

    Each example holds `image` (an index into `images`: the column tells TRL the data is visual and
    must not be tokenized up front, and the image itself never goes through `datasets`), `prompt`
    (the question), `chosen_ids` and `rejected_ids` (the answers' tokens, EOS included). Returns the
    processor's inputs for the prompts (twice: chosen rows, then rejected rows) followed by the
    answers, flushed left, with `completion_mask`.
    """

    processor: object
    images: Sequence[Image.Image]

    def __call__(self, examples: list[dict]) -> dict[str, Tensor]:
        from trl.trainer.utils import flush_left

        images = [self.images[e["image"]] for e in examples] * 2
        prompts = [e["prompt"] for e in examples] * 2
        inputs = dict(encode_prompts(self.processor, images, prompts))
        answers = [torch.tensor(e["chosen_ids"]) for e in examples] + [torch.tensor(e["rejected_ids"]) for e in examples]
        pad = self.processor.tokenizer.pad_token_id
        completion = torch.nn.utils.rnn.pad_sequence(answers, batch_first=True, padding_value=pad)
        completion_mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(a) for a in answers], batch_first=True)
        prompt_mask = inputs["attention_mask"]
        attention_mask = torch.cat([prompt_mask, completion_mask.to(prompt_mask.dtype)], dim=1)
        input_ids = torch.cat([inputs["input_ids"], completion], dim=1)
        completion_mask = torch.cat([torch.zeros_like(prompt_mask), completion_mask.to(prompt_mask.dtype)], dim=1)
        inputs["attention_mask"], inputs["input_ids"], inputs["completion_mask"] = flush_left(
            attention_mask, input_ids, completion_mask)
        return inputs



def dpo_update(model, processor, images: Sequence[Image.Image], answers: ScoredAnswers, pairs: list[tuple[int, int]],
               cfg: CSRConfig, seed: int, gradient_checkpointing: bool = False, progress: bool = False) -> dict[str, float]:
    """One DPO pass of `trl.DPOTrainer` over `pairs` (rows of `answers`), training `model`'s LoRA in place.

    The reference is the model as it comes in (TRL's frozen "ref" copy of its adapters, removed here afterwards).
    """
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import DPOConfig, DPOTrainer

    r = answers.rollouts
    ids = [r.response_ids[i][r.mask[i]].tolist() for i in range(len(r))]
    rows = [{"image": int(r.image_index[c]), "prompt": r.prompts[c], "chosen": r.texts[c],
             "rejected": r.texts[j], "chosen_ids": ids[c], "rejected_ids": ids[j]} for c, j in pairs]
    device = next(model.parameters()).device
    with tempfile.TemporaryDirectory(prefix="csr-dpo-") as work, kept_random_state():
        args = DPOConfig(
            output_dir=work, beta=cfg.beta, learning_rate=cfg.lr, per_device_train_batch_size=cfg.batch_size,
            num_train_epochs=cfg.epochs, seed=seed, data_seed=seed, max_length=None, remove_unused_columns=False,
            bf16=False, gradient_checkpointing=gradient_checkpointing, use_cpu=device.type == "cpu",
            report_to="none", push_to_hub=False, save_strategy="no", logging_steps=1, disable_tqdm=not progress,
            # transformers' Trainer writes args.use_cache into the model's config, which the merged
            # checkpoint keeps: the default (False) would make every later `generate` run without its KV cache.
            use_cache=bool(getattr(model.config, "use_cache", True)),
        )
        trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=processor, data_collator=PairCollator(processor, images))
        trainer.remove_callback(PrinterCallback)  # the stats come back in the figures, not on stdout
        result = trainer.train()
    if "ref" in model.peft_config:
        model.delete_adapter("ref")
    # Each step's mean β·(log-ratio chosen − log-ratio rejected), measured before that step's update:
    # the first is 0 exactly when the policy starts equal to its reference.
    margins = [float(h["rewards/margins"]) for h in trainer.state.log_history if "rewards/margins" in h]
    return {"dpo_loss": float(result.training_loss), "optimizer_steps": int(trainer.state.global_step),
            "reward_margins": margins}


def csr_round(policy_dir: str | Path, adapter_in: str | Path | None, examples: Sequence[Example], verifier: Verifier,
              rollout: RolloutConfig, lora: LoraConfig, cfg: CSRConfig, round_index: int, out: str | Path,
              runtime: ModelConfig | None = None, progress: bool = False) -> dict:
    """One CSR round on `examples` (pick them with `fisao.align.sample.round_examples`, as FiSAO's round does).

    policy_dir: the base model the adapters sit on (the same every round); adapter_in: the previous
    round's `out/adapter` (None: fresh LoRA, round 1). Samples from base + adapter_in, scores,
    pairs, trains, and writes `out/adapter`, the merged `out/model` (loadable with
    `fisao.generate.load_policy`), `answers.jsonl` (every answer: log-prob, CLIP similarity, score),
    `pairs.jsonl` (chosen, rejected, image id) and `figures.json`. Seeded: sampling as FiSAO's
    rollouts (rollout.seed·1000 + round), LoRA's initialisation and DPO's order by cfg.seed·1000 + round.
    """
    if not examples:
        raise ValueError("csr_round got no examples: give it the round's images (round_examples)")
    t0 = time.time()
    seed = cfg.seed * 1000 + round_index
    base, processor = load_runtime_policy(policy_dir, runtime)
    if adapter_in is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = add_lora(base, lora)
    else:
        model = load_adapter(base, adapter_in, is_trainable=True)
    images = [load_image(e.image) for e in examples]
    t1 = time.time()
    answers = score_answers(model, processor, images, verifier, rollout, cfg.lam, rollout.seed * 1000 + round_index,
                            progress)
    r = answers.rollouts
    pairs = preference_pairs(answers.score.tolist(), r.image_index.tolist(), r.texts)
    t2 = time.time()
    stats = {"dpo_loss": 0.0, "optimizer_steps": 0, "reward_margins": []}
    if pairs:
        stats = dpo_update(model, processor, images, answers, pairs, cfg, seed,
                           gradient_checkpointing=bool(runtime and runtime.gradient_checkpointing
                                                       and runtime_device(runtime) != "cpu"), progress=progress)
    t3 = time.time()
    ids = [examples[i].image_id for i in r.image_index.tolist()]
    answer_rows = [{"row": i, "image_id": ids[i], "text": r.texts[i], "mean_logprob": float(answers.mean_logprob[i]),
                    "clip": float(answers.clip[i]), "score": float(answers.score[i])} for i in range(len(r))]
    pair_rows = [{"image_id": ids[c], "chosen": r.texts[c], "rejected": r.texts[j], "chosen_row": c, "rejected_row": j}
                 for c, j in pairs]
    out = Path(out)
    with io.atomic_dir(out) as tmp:
        save_adapter(model, tmp / "adapter")
        merge_and_save(model, processor, tmp / "model")
        io.write_jsonl(tmp / ANSWERS, answer_rows)
        io.write_jsonl(tmp / PAIRS, pair_rows)
        figures = {"answers": len(r), "pairs": len(pairs), "images": len(examples), **stats,
                   "score_mean": float(answers.score.mean()), "clip_mean": float(answers.clip.mean()),
                   "mean_logprob_mean": float(answers.mean_logprob.mean()),
                   "sample_score_seconds": round(t2 - t1, 2), "update_seconds": round(t3 - t2, 2),
                   "seconds": round(time.time() - t0, 2)}
        io.write_json(tmp / FIGURES, figures)
    return figures
