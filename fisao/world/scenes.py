"""Sample scenes: which shapes, in which colours, where.

The language prior that makes a weak model hallucinate lives here: when a class that belongs
to a configured pair is placed, its partner is added with probability `p_cooccur` (high in
train, lower in val/test), so a model that leans on text statistics names absent partners.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from fisao.config import WorldConfig


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    colour: str
    x: int  # left edge, pixels
    y: int  # top edge, pixels
    size: int  # side of the (square) box, pixels

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """COCO box: (x, y, width, height)."""
        return (self.x, self.y, self.size, self.size)


@dataclass(frozen=True)
class Scene:
    objects: tuple[ShapeObject, ...]
    background: tuple[int, int, int]

    @property
    def classes(self) -> list[str]:
        """Distinct classes present, in order of first appearance."""
        return list(dict.fromkeys(o.shape for o in self.objects))


def _overlap(a: ShapeObject, b: ShapeObject) -> float:
    """Intersection area over the smaller box's area."""
    w = min(a.x + a.size, b.x + b.size) - max(a.x, b.x)
    h = min(a.y + a.size, b.y + b.size) - max(a.y, b.y)
    if w <= 0 or h <= 0:
        return 0.0
    return (w * h) / min(a.size, b.size) ** 2


def sample_classes(rng: random.Random, cfg: WorldConfig, p_cooccur: float) -> list[str]:
    """The classes of one scene's objects (a class may repeat), with the pair prior applied."""
    partner = cfg.partner()
    n = rng.randint(cfg.min_objects, cfg.max_objects)
    chosen: list[str] = []
    while len(chosen) < n:
        if chosen and rng.random() < cfg.duplicate_prob:
            chosen.append(rng.choice(chosen))
            continue
        absent = [c for c in cfg.classes if c not in chosen]
        if not absent:
            if len(chosen) >= cfg.min_objects:
                break
            chosen.append(rng.choice(chosen))  # every class is in: only repeats reach min_objects
            continue
        cls = rng.choice(absent)
        mate = partner.get(cls)
        if mate is not None and mate not in chosen and rng.random() < p_cooccur:
            if len(chosen) + 2 <= cfg.max_objects:
                chosen += [cls, mate]
                continue
            # No room for the pair: take a class without a partner rather than break the prior,
            # or stop; only when the scene is still below min_objects does `cls` go in alone.
            unpaired = [c for c in absent if c not in partner]
            if unpaired:
                cls = rng.choice(unpaired)
            elif len(chosen) >= cfg.min_objects:
                break
        chosen.append(cls)
    return chosen


def place_grid(rng: random.Random, cfg: WorldConfig, classes: list[str]) -> list[ShapeObject]:
    """Each object in its own grid cell (random cell, random offset inside it), no overlap."""
    n = cfg.canvas // cfg.cell
    lo, hi = cfg.object_size
    objects = []
    for cls, cell in zip(classes, rng.sample(range(n * n), len(classes))):
        colour = rng.choice(cfg.colours)
        size = rng.randint(lo, hi)
        row, col = divmod(cell, n)
        x = col * cfg.cell + rng.randint(0, cfg.cell - size)
        y = row * cfg.cell + rng.randint(0, cfg.cell - size)
        objects.append(ShapeObject(cls, colour, x, y, size))
    return objects


def place_free(rng: random.Random, cfg: WorldConfig, classes: list[str]) -> list[ShapeObject]:
    """Anywhere on the canvas, with overlap limited by rejection sampling."""
    lo, hi = cfg.object_size
    objects: list[ShapeObject] = []
    for cls in classes:
        colour = rng.choice(cfg.colours)
        best: ShapeObject | None = None
        best_overlap = float("inf")
        for _ in range(60):  # rejection sampling; keep the least-overlapping try
            size = rng.randint(lo, hi)
            cand = ShapeObject(cls, colour, rng.randint(0, cfg.canvas - size), rng.randint(0, cfg.canvas - size), size)
            worst = max((_overlap(cand, o) for o in objects), default=0.0)
            if worst < best_overlap:
                best, best_overlap = cand, worst
            if worst <= cfg.max_overlap:
                break
        assert best is not None
        objects.append(best)
    return objects


LAYOUTS = {"grid": place_grid, "free": place_free}


def sample_scene(rng: random.Random, cfg: WorldConfig, p_cooccur: float) -> Scene:
    """One scene: classes under the pair prior, placed on a light, slightly varying background."""
    objects = LAYOUTS[cfg.layout](rng, cfg, sample_classes(rng, cfg, p_cooccur))
    grey = rng.randint(215, 245)
    background = (grey + rng.randint(-8, 8), grey + rng.randint(-8, 8), grey + rng.randint(-8, 8))
    return Scene(tuple(objects), tuple(min(255, max(0, c)) for c in background))
