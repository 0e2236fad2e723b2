"""Sample scenes: which shapes, in which colours, where.

The language prior that makes a weak model hallucinate lives here: when a class that belongs
to a configured pair is placed, its partner is added with probability `p_cooccur` (high in
train, lower in val/test), so a model that leans on text statistics names absent partners.
"""
from __future__ import annotations

import random

from fisao.world.config import WorldConfig
from fisao.world.render import Scene, ShapeObject


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


def sample_scene(rng: random.Random, cfg: WorldConfig, p_cooccur: float, hard_rng: random.Random | None = None) -> Scene:
    """One scene: classes under the pair prior, placed on a light, slightly varying background.

    `hard_rng` draws what `cfg.hardness` adds (look-alikes, faint and occluded objects, noise) from a
    stream of its own, so that a world without hardness is the same scene for scene as one with it.
    """
    objects = LAYOUTS[cfg.layout](rng, cfg, sample_classes(rng, cfg, p_cooccur))
    grey = rng.randint(215, 245)
    background = (grey + rng.randint(-8, 8), grey + rng.randint(-8, 8), grey + rng.randint(-8, 8))
    scene = Scene(tuple(objects), tuple(min(255, max(0, c)) for c in background))
    if cfg.hardness.active:
        scene = harden(hard_rng or random.Random(f"{cfg.seed}/hardness"), cfg, scene)
    return scene


# Shapes outside any vocabulary, each resembling a class (render.SHAPES draws them).
LOOKALIKES: dict[str, str] = {"hexagon": "circle", "oblong": "square", "kite": "diamond", "pentagon": "star",
                              "ring": "moon"}


def _free_spot(rng: random.Random, cfg: WorldConfig, taken: list[ShapeObject], size: int) -> tuple[int, int] | None:
    """Top-left corner for a new box: a free grid cell, or a place overlapping no object by more than allowed."""
    if cfg.layout == "grid":
        n = cfg.canvas // cfg.cell
        used = {(o.y // cfg.cell) * n + o.x // cfg.cell for o in taken}
        free = [c for c in range(n * n) if c not in used]
        if not free:
            return None
        row, col = divmod(rng.choice(free), n)
        return col * cfg.cell + rng.randint(0, cfg.cell - size), row * cfg.cell + rng.randint(0, cfg.cell - size)
    for _ in range(60):
        x, y = rng.randint(0, cfg.canvas - size), rng.randint(0, cfg.canvas - size)
        probe = ShapeObject("", "", x, y, size)
        if all(_overlap(probe, o) <= cfg.max_overlap for o in taken):
            return x, y
    return None


def _occluder(rng: random.Random, obj: ShapeObject, cover: tuple[float, float]) -> tuple[int, int, int, int, int]:
    """A grey bar over one side of `obj`'s box, covering a share drawn from `cover`."""
    depth = max(1, round(obj.size * rng.uniform(*cover)))
    side = rng.choice("lrtb")
    x, y, w, h = obj.x, obj.y, obj.size, obj.size
    if side == "l":
        w = depth
    elif side == "r":
        x, w = obj.x + obj.size - depth, depth
    elif side == "t":
        h = depth
    else:
        y, h = obj.y + obj.size - depth, depth
    return x, y, w, h, rng.randint(110, 190)


def harden(rng: random.Random, cfg: WorldConfig, scene: Scene) -> Scene:
    """Add `cfg.hardness` to a scene: look-alikes in free places, faint and occluded objects, a noise seed."""
    hard = cfg.hardness
    objects = []
    for obj in scene.objects:
        alpha = rng.uniform(*hard.faint_alpha) if rng.random() < hard.faint_prob else 1.0
        occluder = _occluder(rng, obj, hard.occlusion_cover) if rng.random() < hard.occlusion_prob else None
        objects.append(ShapeObject(obj.shape, obj.colour, obj.x, obj.y, obj.size, alpha, occluder))
    kinds = [k for k, cls in LOOKALIKES.items() if cls in cfg.classes and k not in cfg.classes]
    extras: list[ShapeObject] = []
    lo, hi = cfg.object_size
    for _ in range(hard.lookalikes if kinds else 0):
        if rng.random() >= hard.lookalike_prob:
            continue
        size = rng.randint(lo, hi)
        spot = _free_spot(rng, cfg, objects + extras, size)
        if spot is not None:
            extras.append(ShapeObject(rng.choice(kinds), rng.choice(cfg.colours), *spot, size))
    return Scene(tuple(objects), scene.background, tuple(extras), hard.noise, rng.randrange(2 ** 31))
