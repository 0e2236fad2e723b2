"""Image preprocessing shared by the CLIP and LLaVA builders (the CLIP image processor)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from transformers import CLIPImageProcessorPil

from fisao.coco import load_image


def clip_image_processor(canvas: int) -> CLIPImageProcessorPil:
    """CLIP's preprocessing (resize, centre crop, CLIP mean/std) at the world's resolution."""
    return CLIPImageProcessorPil(size={"shortest_edge": canvas}, crop_size={"height": canvas, "width": canvas})


def pixel_values(processor, paths: Sequence[str | Path], batch_size: int = 256) -> torch.Tensor:
    """(N, 3, H, W) float pixels for the images at `paths`, preprocessed by `processor`."""
    chunks = []
    for i in range(0, len(paths), batch_size):
        images = [load_image(p) for p in paths[i : i + batch_size]]
        chunks.append(processor(images=images, return_tensors="pt")["pixel_values"])
    return torch.cat(chunks)
