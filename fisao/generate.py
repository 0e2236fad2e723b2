"""Load a vision-language model the way users load llava-hf checkpoints, and answer questions.

`load_policy` goes through `AutoProcessor` / `AutoModelForImageTextToText.from_pretrained`, the
calls that load llava-hf/llava-1.5-7b-hf, so the world's tiny models exercise the real path.
`answer` is batched greedy decoding with the KV cache; special tokens that would break the next
forward pass (the image placeholder, padding, <s>) can never be generated.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from fisao.models.families import chat_prompt, family_of
from fisao.models.source import check_model_source
from fisao.progress import bar as progress_bar


def load_policy(path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None, trust_remote_code: bool = False):
    """(model, processor) from a Hugging Face directory or hub id, in eval mode."""
    path = str(path)
    check_model_source(path)
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    family_of(model)  # an unsupported model stops here, not in the middle of a round
    processor.tokenizer.padding_side = "left"
    return model.to(device).eval(), processor


def banned_token_ids(processor) -> list[int]:
    """Tokens a rollout must never emit: the image placeholder, padding and <s>."""
    tok = processor.tokenizer
    image = getattr(processor, "image_token", None) or "<image>"
    image = getattr(image, "content", image)  # InstructBLIP's processor holds an AddedToken
    ids = {tok.convert_tokens_to_ids(image), tok.pad_token_id, tok.bos_token_id}
    ids.discard(None)
    ids.discard(tok.unk_token_id if tok.unk_token_id is not None else -1)
    return sorted(i for i in ids if i is not None and i != tok.eos_token_id)


@torch.no_grad()
def answer(
    model,
    processor,
    images: Sequence[Image.Image],
    questions: Sequence[str],
    max_new_tokens: int = 64,
    batch_size: int = 32,
    progress: bool = True,
    desc: str = "generate",
) -> list[str]:
    """Greedy answers, one per (image, question), batched with left padding."""
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images but {len(questions)} questions")
    device = next(model.parameters()).device
    suppress = banned_token_ids(processor)
    out: list[str] = []
    for i in progress_bar(range(0, len(images), batch_size), desc, progress):
        prompts = [chat_prompt(processor, q) for q in questions[i : i + batch_size]]
        inputs = processor(images=list(images[i : i + batch_size]), text=prompts, return_tensors="pt", padding=True).to(device)
        seqs = model.generate(
            **inputs, do_sample=False, max_new_tokens=max_new_tokens, suppress_tokens=suppress,
            pad_token_id=processor.tokenizer.pad_token_id,
        )
        new = seqs[:, inputs["input_ids"].shape[1]:]
        out += [t.strip() for t in processor.batch_decode(new, skip_special_tokens=True)]
    return out
