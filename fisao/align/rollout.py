"""Rollouts: sample answers from the policy for each training image and keep per-token log-probs.

Sampling is `model.generate(do_sample=True)` with the KV cache, batched, and with the tokens that
would break the next forward pass suppressed (`fisao.generate.banned_token_ids`). Each batch is
seeded from (seed, batch index) inside `torch.random.fork_rng`, so the same seed and batch size
give the same rollouts and the caller's global random state is left alone.

The log-probs are those of the *policy itself*: full softmax over the vocabulary at temperature 1,
no top-p, no suppression. That is the quantity PPO's ratio π_θ / π_θold and the KL to the reference
are defined on, and the update computes the same quantity for π_θ. In float32 they are read from
the raw logits `generate` computed at each step (`output_logits`), which a teacher-forced forward
reproduces to 1e-5 (tests/test_rollout.py), so sampling costs what a plain generate loop costs; in
half precision, where the cached and the full forward differ more, one teacher-forced forward over
prompt + answer recomputes them (`sequence_logprobs`), so the ratio is 1 before the first step. With
`temperature=1` and `top_p=1` (the defaults) the answers are also sampled from exactly this
distribution (up to the suppressed tokens, whose probability under a trained policy is ~0); with
other values they come from a warped policy and PPO treats them as on-policy anyway — the usual
approximation, not corrected here.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import Tensor

from fisao import io
from fisao.align.ppo import selective_log_softmax
from fisao.generate import banned_token_ids
from fisao.models.families import chat_prompt, decoder_hidden, hf_model
from fisao.progress import bar as progress_bar

TENSORS = "rollouts.safetensors"
ROWS = "rollouts.jsonl"
BUILT_IN = ("row", "image_index", "prompt", "text")  # JSONL columns of every row


@dataclass
class Rollouts:
    """N sampled answers. Rows are image-major: the n answers of image i are adjacent.

    image_index (N,) long: index into the image list the rollouts were sampled on;
    prompts: the question each answer replies to (N,);
    response_ids (N, T) long: the generated tokens, right-padded with the pad id after EOS;
    mask (N, T) bool: True on generated tokens (EOS included), False on padding;
    logprobs (N, T) float32: log π(token) of the sampling policy (temperature 1, full softmax), 0 on padding;
    texts: the decoded answers (special tokens skipped, stripped, as `fisao.generate.answer`).
    """

    image_index: Tensor
    prompts: list[str]
    response_ids: Tensor
    mask: Tensor
    logprobs: Tensor
    texts: list[str]

    def __len__(self) -> int:
        return len(self.texts)


def per_image(prompt: str | Sequence[str], n: int) -> list[str]:
    """`prompt` for each of `n` images: one string for all, or a sequence of exactly n."""
    if isinstance(prompt, str):
        return [prompt] * n
    if len(prompt) != n:
        raise ValueError(f"{len(prompt)} prompts for {n} images: give one prompt, or one per image")
    return list(prompt)


def encode_prompts(processor, images: Sequence[Image.Image], prompt: str | Sequence[str],
                   device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """The processor's inputs (input_ids, attention_mask, pixel_values, …): one prompt for every
    image, or one per image."""
    text = [chat_prompt(processor, p) for p in per_image(prompt, len(images))]
    return processor(images=list(images), text=text, return_tensors="pt", padding=True).to(device)


def response_hidden(model, inputs: dict[str, Tensor], response_ids: Tensor, mask: Tensor) -> Tensor:
    """Last hidden states at the positions that predict each response token -> (N, T, H).

    inputs: the prompts' processor inputs (P prompt tokens, left-padded); response_ids, mask (N, T).
    Positions are counted from the first attended token, as `generate` does with left padding.
    The forward itself is the model family's (fisao/models/families.py).
    """
    prompt_len = inputs["input_ids"].shape[1]
    input_ids = torch.cat([inputs["input_ids"], response_ids], dim=1)
    attention_mask = torch.cat([inputs["attention_mask"], mask.to(inputs["attention_mask"].dtype)], dim=1)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    hidden = decoder_hidden(model, input_ids, attention_mask, position_ids, extra)
    # The state at position p predicts token p + 1: response token t is predicted at prompt_len − 1 + t.
    return hidden[:, prompt_len - 1 : prompt_len - 1 + response_ids.shape[1]]


def response_logits(model, hidden: Tensor) -> Tensor:
    """The (N, T, V) float32 logits of `response_hidden`'s states (N, T, H)."""
    return hf_model(model).get_output_embeddings()(hidden).float()


def token_logprobs(model, hidden: Tensor, response_ids: Tensor, mask: Tensor) -> Tensor:
    """log π(response token) from `response_hidden`'s states -> (N, T) float32, 0 on padding."""
    return selective_log_softmax(response_logits(model, hidden), response_ids) * mask


def sequence_logprobs(model, inputs: dict[str, Tensor], response_ids: Tensor, mask: Tensor) -> Tensor:
    """Teacher-forced log π of each response token -> (N, T) float32, 0 on padding."""
    return token_logprobs(model, response_hidden(model, inputs, response_ids, mask), response_ids, mask)


def step_logprobs(logits: Sequence[Tensor], response_ids: Tensor, mask: Tensor) -> Tensor:
    """log π(response token) from `generate`'s raw per-step logits (T tensors (N, V)) -> (N, T)
    float32, 0 on padding; one step at a time, so no (N, T, V) tensor is held."""
    steps = [torch.log_softmax(step.float(), -1).gather(-1, response_ids[:, t : t + 1]) for t, step in enumerate(logits)]
    return torch.cat(steps, 1) * mask


def response_mask(response_ids: Tensor, eos_id: int) -> Tensor:
    """(N, T) bool: True up to and including each row's first EOS (all True when there is none)."""
    is_eos = (response_ids == eos_id).long()
    after_eos = (is_eos.cumsum(1) - is_eos) > 0  # strictly after the first EOS
    return ~after_eos


def batch_seed(seed: int, batch: int) -> int:
    """A well-mixed 63-bit seed for batch `batch` of a run seeded with `seed`."""
    return int(np.random.SeedSequence([seed, batch]).generate_state(2, np.uint64)[0] >> np.uint64(1))


@torch.no_grad()
def sample_rollouts(
    model,
    processor,
    images: Sequence[Image.Image],
    prompt: str | Sequence[str],
    n_per_image: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 64,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> Rollouts:
    """Sample `n_per_image` answers to `prompt` (one for all images, or one per image) for each
    image; seeded, batched, with log-probs."""
    if n_per_image < 1 or batch_size < 1:
        raise ValueError(f"n_per_image ({n_per_image}) and batch_size ({batch_size}) must be at least 1")
    prompts = per_image(prompt, len(images))
    device = next(model.parameters()).device
    tok = processor.tokenizer
    image_index = torch.arange(len(images)).repeat_interleave(n_per_image)
    was_training = model.training
    model.eval()
    exact = next(model.parameters()).dtype == torch.float32  # generate's own logits are the forward's (module doc)
    ids, masks, logps, texts = [], [], [], []
    starts = range(0, len(image_index), batch_size)
    for b, start in enumerate(progress_bar(starts, "rollouts", progress)):
        rows = image_index[start : start + batch_size]
        inputs = encode_prompts(processor, [images[i] for i in rows.tolist()], [prompts[i] for i in rows.tolist()], device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(batch_seed(seed, b))
            out = model.generate(
                **inputs, do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                max_new_tokens=max_new_tokens, suppress_tokens=banned_token_ids(processor),
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                output_logits=exact, return_dict_in_generate=True,
            )
        response = out.sequences[:, inputs["input_ids"].shape[1]:]
        mask = response_mask(response, tok.eos_token_id)
        response = response.masked_fill(~mask, tok.pad_token_id)
        ids.append(response.cpu())
        masks.append(mask.cpu())
        if exact:
            logps.append(step_logprobs(out.logits, response, mask).cpu())
        else:
            logps.append(sequence_logprobs(model, inputs, response, mask).cpu())
        texts += [t.strip() for t in processor.batch_decode(response, skip_special_tokens=True)]
    model.train(was_training)
    width = max(x.shape[1] for x in ids)
    return Rollouts(
        image_index=image_index, prompts=[prompts[i] for i in image_index.tolist()],
        response_ids=torch.cat([pad_right(x, width, tok.pad_token_id) for x in ids]),
        mask=torch.cat([pad_right(x, width, False) for x in masks]),
        logprobs=torch.cat([pad_right(x, width, 0.0) for x in logps]),
        texts=texts,
    )


def pad_right(x: Tensor, width: int, value: float = 0) -> Tensor:
    """(N, T) -> (N, width): `x` with `value` appended to every row (width >= T)."""
    return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)


def concat_rollouts(parts: Sequence[Rollouts], image_index: Tensor, pad_id: int) -> Rollouts:
    """The rows of `parts`, one part after another, right-padded to the widest; `image_index` (N,)
    is the caller's, as the parts' indices point into their own image lists."""
    width = max(r.mask.shape[1] for r in parts)
    n = sum(len(r) for r in parts)
    if len(image_index) != n:
        raise ValueError(f"image_index has {len(image_index)} entries for {n} rollouts")
    return Rollouts(
        image_index=image_index, prompts=[p for r in parts for p in r.prompts],
        response_ids=torch.cat([pad_right(r.response_ids, width, pad_id) for r in parts]),
        mask=torch.cat([pad_right(r.mask, width, False) for r in parts]),
        logprobs=torch.cat([pad_right(r.logprobs, width, 0.0) for r in parts]),
        texts=[t for r in parts for t in r.texts],
    )


def save_rollouts(path: str | Path, rollouts: Rollouts, extra: dict[str, Sequence] | None = None) -> Path:
    """Write rollouts to directory `path`: tensors as safetensors, one JSON row per answer.

    `extra` adds per-row columns to the JSONL (e.g. image ids, mention rewards): each value must
    hold one JSON-serialisable item per rollout.
    """
    extra = dict(extra or {})
    n = len(rollouts)
    for key, column in extra.items():
        if len(column) != n:
            raise ValueError(f"extra column {key!r} has {len(column)} items for {n} rollouts")
        if key in BUILT_IN:
            raise ValueError(f"extra column {key!r} clashes with a built-in column; rename it")
    tensors = {f.name: getattr(rollouts, f.name).contiguous() for f in fields(Rollouts) if isinstance(getattr(rollouts, f.name), Tensor)}
    rows = [{"row": i, "image_index": int(rollouts.image_index[i]), "prompt": rollouts.prompts[i],
             "text": rollouts.texts[i], **{k: v[i] for k, v in extra.items()}} for i in range(n)]
    with io.atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / TENSORS))
        io.write_jsonl(tmp / ROWS, rows)
    return Path(path)


def load_rollouts(path: str | Path) -> tuple[Rollouts, dict[str, list]]:
    """(rollouts, extra columns) as written by `save_rollouts`."""
    path = Path(path)
    if not (path / TENSORS).is_file():
        raise FileNotFoundError(f"{path} holds no {TENSORS}: not a rollouts directory (see save_rollouts)")
    tensors = load_file(str(path / TENSORS))
    rows = io.read_jsonl(path / ROWS)
    extra_keys = [k for k in (rows[0] if rows else {}) if k not in BUILT_IN]
    rollouts = Rollouts(prompts=[r["prompt"] for r in rows], texts=[r["text"] for r in rows], **tensors)
    return rollouts, {k: [r[k] for r in rows] for k in extra_keys}
