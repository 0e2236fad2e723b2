"""Build and train the world's tiny CLIP: the verifier, and the policy's vision tower.

Two losses, both on cosine similarities of projected, normalised embeddings:
- CLIP's symmetric InfoNCE between an image and one of its captions;
- a multi-label sigmoid loss between an image and every object-name prompt
  ("a photo of a {name}.", synonyms included), label = the object is in the image.
The second one is what the verifier uses at reward time: it teaches the cosine of an image and
a name prompt to separate present from absent objects, which InfoNCE on captions alone does only
slowly (the feasibility run stalled near 0.9 AUROC). The caption loss is weighted down (0.1) and
runs on 16 images of each batch: at equal weight it crowds the names out of the 64-d embedding
(measured on the default world, 1200 steps, val object AUROC: caption weight 1.0 -> 0.84,
0.1 -> 0.98, 0 -> 0.998).
"""
from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTextConfig, CLIPVisionConfig

from fisao.auroc import auroc
from fisao.config import ClipBuildConfig
from fisao.models.images import clip_image_processor, pixel_values
from fisao.progress import bar as progress_bar
from fisao.world.config import WorldConfig
from fisao.world.data import Example

PROMPT_TEMPLATE = "a photo of a {}."


def clip_config(cfg: ClipBuildConfig, canvas: int, tokenizer) -> CLIPConfig:
    vision = CLIPVisionConfig(
        image_size=canvas, patch_size=cfg.patch_size, hidden_size=cfg.width, intermediate_size=4 * cfg.width,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, projection_dim=cfg.projection_dim,
    )
    text = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.text_width, intermediate_size=4 * cfg.text_width,
        num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.heads, max_position_embeddings=77,
        projection_dim=cfg.projection_dim, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=cfg.projection_dim)


def name_prompts(world: WorldConfig) -> tuple[list[str], list[str]]:
    """Prompts for every class name and synonym, and the class each one stands for."""
    prompts, owners = [], []
    for cls in world.classes:
        for name in (cls, *world.synonyms.get(cls, ())):
            prompts.append(PROMPT_TEMPLATE.format(name))
            owners.append(cls)
    return prompts, owners


def embed_images(model: CLIPModel, pixels: torch.Tensor) -> torch.Tensor:
    """(N, D) unit-norm image embeddings."""
    return F.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)


def embed_texts(model: CLIPModel, tokenizer, texts: list[str], max_tokens: int | None = None) -> torch.Tensor:
    """(N, D) unit-norm text embeddings; texts cut to `max_tokens` (default: the tokenizer's limit)."""
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_tokens or tokenizer.model_max_length,
                    return_tensors="pt")
    return F.normalize(model.get_text_features(**enc).pooler_output, dim=-1)


def _lr(step: int, total: int, base: float) -> float:
    warm = max(1, total // 20)
    if step < warm:
        return base * (step + 1) / warm
    return base * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


@torch.no_grad()
def object_name_auroc(
    model: CLIPModel, processor: CLIPProcessor, examples: list[Example], classes: tuple[str, ...],
    pixels: torch.Tensor | None = None,
) -> float:
    """AUROC of cos(image, "a photo of a {class}.") for present vs absent classes, pooled.

    `pixels`: the examples' (N, 3, H, W) pixel values when the caller already has them.
    """
    was_training = model.training
    model.eval()
    if pixels is None:
        pixels = pixel_values(processor.image_processor, [e.image for e in examples])
    img = torch.cat([embed_images(model, pixels[i : i + 256]) for i in range(0, len(pixels), 256)])
    txt = embed_texts(model, processor.tokenizer, [PROMPT_TEMPLATE.format(c) for c in classes])
    scores = (img @ txt.T).numpy()
    labels = np.array([[c in e.objects for c in classes] for e in examples])
    model.train(was_training)
    return auroc(scores, labels)


def train_clip(
    train: list[Example], val: list[Example], world: WorldConfig, cfg: ClipBuildConfig, tokenizer, progress: bool = True
) -> tuple[CLIPModel, CLIPProcessor, dict]:
    """Train a CLIP from scratch on `train`; returns the model, its processor and training curves."""
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    processor = CLIPProcessor(image_processor=clip_image_processor(world.canvas), tokenizer=tokenizer)
    model = CLIPModel(clip_config(cfg, world.canvas, tokenizer))
    pixels = pixel_values(processor.image_processor, [e.image for e in train])
    prompts, owners = name_prompts(world)
    presence = torch.tensor([[o in e.objects for o in owners] for e in train], dtype=torch.float32)
    name_enc = tokenizer(prompts, padding=True, return_tensors="pt")
    # The sigmoid loss's own temperature and bias (as SigLIP's); not part of the saved CLIP.
    name_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))
    name_bias = torch.nn.Parameter(torch.tensor(-5.0))
    opt = torch.optim.AdamW(
        [{"params": model.parameters(), "weight_decay": cfg.weight_decay},
         {"params": [name_scale, name_bias], "weight_decay": 0.0}], lr=cfg.lr,
    )
    g = torch.Generator().manual_seed(cfg.seed)
    curves: dict[str, list[float]] = {"loss": [], "loss_caption": [], "loss_names": []}
    val_pixels = pixel_values(processor.image_processor, [e.image for e in val]) if cfg.target_auroc else None
    val_auroc: float | None = None  # set by the check that stops training, else measured at the end
    model.train()
    bar = progress_bar(range(cfg.steps), "train CLIP", progress, leave=True)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr(step, cfg.steps, cfg.lr)
        idx = torch.randperm(len(train), generator=g)[: cfg.batch_size]
        img = embed_images(model, pixels[idx])
        loss_caption = torch.zeros(())
        if cfg.caption_loss_weight:
            sub = idx[: cfg.caption_batch_size]
            captions = [rng.choice(train[i].captions) for i in sub.tolist()]
            txt = embed_texts(model, tokenizer, captions, cfg.max_text_tokens)
            logits = model.logit_scale.exp().clamp(max=100) * img[: len(sub)] @ txt.T
            target = torch.arange(len(sub))
            loss_caption = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        names = F.normalize(model.get_text_features(**name_enc).pooler_output, dim=-1)
        name_logits = name_scale.exp() * img @ names.T + name_bias
        loss_names = F.binary_cross_entropy_with_logits(name_logits, presence[idx])
        loss = cfg.caption_loss_weight * loss_caption + cfg.name_loss_weight * loss_names
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        for key, value in (("loss", loss), ("loss_caption", loss_caption), ("loss_names", loss_names)):
            curves[key].append(round(float(value.detach()), 5))
        if step % 20 == 0:
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        if cfg.target_auroc and (step + 1) % cfg.check_every == 0 and step + 1 < cfg.steps:
            reached = object_name_auroc(model, processor, val, world.classes, val_pixels)
            curves.setdefault("val_auroc_checks", []).append(round(reached, 5))
            if reached >= cfg.target_auroc:
                val_auroc = reached
                bar.set_postfix(val_auroc=f"{reached:.3f}", stopped="target")
                break
    bar.close()
    curves["steps_trained"] = len(curves["loss"])
    if val_auroc is None:
        val_auroc = object_name_auroc(model, processor, val, world.classes, val_pixels)
    curves["val_auroc"] = val_auroc
    return model, processor, curves


def save_clip(model: CLIPModel, processor: CLIPProcessor, out: str | Path) -> None:
    model.save_pretrained(out)
    processor.save_pretrained(out)
