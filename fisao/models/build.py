"""Build the base models from a world directory and save them in Hugging Face format.

`build_clip` trains the tokenizer and the CLIP; `build_llava` puts the CLIP's vision tower into a
LLaVA and fine-tunes it. Each writes its directory atomically (model, processor, tokenizer,
`train_log.json`) so a crash never leaves a directory that looks finished.
"""
from __future__ import annotations

import time
from pathlib import Path

from transformers import CLIPModel, CLIPProcessor, LlavaProcessor

from fisao import io
from fisao.config import ClipBuildConfig, LlavaBuildConfig
from fisao.models.clip import name_prompts, object_name_auroc, save_clip, train_clip
from fisao.models.files import TRAIN_LOG
from fisao.models.llava import CAPTION_PROMPTS, CHAT_TEMPLATE, llava_from_clip, save_llava, train_llava
from fisao.models.tokenizer import train_bpe, wrap
from fisao.world.build import PRETRAIN, read_world_config
from fisao.world.data import Example, load_split


def tokenizer_corpus(examples: list[Example], prompts: list[str]) -> list[str]:
    """Every text the models will read or write in the world (fixed prompts weighted up)."""
    texts = (list(prompts) + list(CAPTION_PROMPTS) + ["USER:", "ASSISTANT:"]) * 100
    for e in examples:
        texts += e.captions
        texts += [t for qa in e.questions for t in qa]
    return texts


def build_clip(world_dir: str | Path, cfg: ClipBuildConfig, out: str | Path, progress: bool = True) -> dict:
    """Train tokenizer + CLIP on the world's train split; save to `out`; return its figures."""
    t0 = time.time()
    world = read_world_config(world_dir)
    train, val, test = (load_split(world_dir, s) for s in ("train", "val", "test"))
    clip_train = load_split(world_dir, PRETRAIN) if world.pretrain_size else train
    prompts, _ = name_prompts(world)
    bpe = train_bpe(tokenizer_corpus(train, prompts), cfg.vocab_size)
    model, processor, curves = train_clip(clip_train, val, world, cfg, wrap(bpe, "clip"), progress=progress)
    curves["test_auroc"] = object_name_auroc(model, processor, test, world.classes)
    curves["seconds"] = round(time.time() - t0, 1)
    with io.atomic_dir(out) as tmp:
        save_clip(model, processor, tmp)
        io.write_json(tmp / TRAIN_LOG, curves, indent=None)
    return {k: v for k, v in curves.items() if not isinstance(v, list)}


def build_llava(world_dir: str | Path, clip_dir: str | Path, cfg: LlavaBuildConfig, out: str | Path, progress: bool = True) -> dict:
    """Fine-tune a LLaVA on the CLIP in `clip_dir` (its vision tower, its vocabulary); save to `out`."""
    t0 = time.time()
    clip = CLIPModel.from_pretrained(clip_dir)
    clip_processor = CLIPProcessor.from_pretrained(clip_dir)
    tokenizer = wrap(clip_processor.tokenizer.backend_tokenizer, "llava")
    tokenizer.padding_side = "left"  # generation pads on the left; training builds its own batches
    processor = LlavaProcessor(
        image_processor=clip_processor.image_processor, tokenizer=tokenizer,
        patch_size=clip.config.vision_config.patch_size, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )
    model = llava_from_clip(clip, cfg, tokenizer)
    curves = train_llava(model, processor, load_split(world_dir, "train"), cfg, progress=progress)
    curves["seconds"] = round(time.time() - t0, 1)
    with io.atomic_dir(out) as tmp:
        save_llava(model, processor, tmp)
        io.write_json(tmp / TRAIN_LOG, curves, indent=None)
    return {"final_loss": curves["loss"][-1], "seconds": curves["seconds"]}
