"""A scene of coloured shapes (what is drawn where), and its rendering with Pillow.

Each shape is drawn as a white-on-black mask in its own box, then pasted in its colour, so
any outline (a crescent, a heart) works the same way and later objects sit on top of earlier
ones. Rendering is a pure function of the scene: the same scene gives the same pixels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    colour: str
    x: int  # left edge, pixels
    y: int  # top edge, pixels
    size: int  # side of the (square) box, pixels
    alpha: float = 1.0  # opacity (world.hardness.faint_prob)
    # A grey bar drawn over the object: (x, y, width, height, grey level) (world.hardness.occlusion_prob)
    occluder: tuple[int, int, int, int, int] | None = None

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """COCO box: (x, y, width, height)."""
        return (self.x, self.y, self.size, self.size)


@dataclass(frozen=True)
class Scene:
    objects: tuple[ShapeObject, ...]
    background: tuple[int, int, int]
    # Shapes outside the vocabulary (world.hardness.lookalikes): drawn, never annotated or named.
    extras: tuple[ShapeObject, ...] = ()
    noise: float = 0.0  # per-pixel noise std, 0-255 units (world.hardness.noise)
    noise_seed: int = 0

    @property
    def classes(self) -> list[str]:
        """Distinct classes present, in order of first appearance."""
        return list(dict.fromkeys(o.shape for o in self.objects))


PALETTE: dict[str, RGB] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
    "purple": (140, 60, 190),
    "orange": (240, 130, 20),
    "black": (30, 30, 30),
}


def _polygon(points: list[tuple[float, float]]) -> Callable[[ImageDraw.ImageDraw, int], None]:
    """A shape given as a polygon in unit coordinates ([0, 1]^2)."""

    def draw(d: ImageDraw.ImageDraw, s: int) -> None:
        d.polygon([(x * (s - 1), y * (s - 1)) for x, y in points], fill=255)

    return draw


def _star_points(n: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    pts = []
    for i in range(2 * n):
        r = 0.5 if i % 2 == 0 else 0.5 * inner
        a = -math.pi / 2 + i * math.pi / n
        pts.append((0.5 + r * math.cos(a), 0.52 + r * math.sin(a)))
    return pts


def _circle(d: ImageDraw.ImageDraw, s: int) -> None:
    d.ellipse([0, 0, s - 1, s - 1], fill=255)


def _square(d: ImageDraw.ImageDraw, s: int) -> None:
    m = round(s * 0.08)
    d.rectangle([m, m, s - 1 - m, s - 1 - m], fill=255)


def _cross(d: ImageDraw.ImageDraw, s: int) -> None:
    t = s / 3
    d.rectangle([t, 0, 2 * t, s - 1], fill=255)
    d.rectangle([0, t, s - 1, 2 * t], fill=255)


def _heart(d: ImageDraw.ImageDraw, s: int) -> None:
    r = s / 4
    d.ellipse([0, 0, 2 * r, 2 * r], fill=255)
    d.ellipse([2 * r - 1, 0, 4 * r - 1, 2 * r], fill=255)
    d.polygon([(0.3, r * 1.35), (s - 1.3, r * 1.35), (s / 2 - 0.5, s - 1)], fill=255)


def _moon(d: ImageDraw.ImageDraw, s: int) -> None:
    d.ellipse([0, 0, s - 1, s - 1], fill=255)
    off = s * 0.38
    d.ellipse([off, -s * 0.1, s - 1 + off, s - 1 - s * 0.1], fill=0)


def _oblong(d: ImageDraw.ImageDraw, s: int) -> None:
    m = round(s * 0.22)
    d.rectangle([0, m, s - 1, s - 1 - m], fill=255)


def _ring(d: ImageDraw.ImageDraw, s: int) -> None:
    d.ellipse([0, 0, s - 1, s - 1], fill=255)
    t = s * 0.28
    d.ellipse([t, t, s - 1 - t, s - 1 - t], fill=0)


SHAPES: dict[str, Callable[[ImageDraw.ImageDraw, int], None]] = {
    "circle": _circle,
    "square": _square,
    "triangle": _polygon([(0.5, 0.0), (1.0, 0.95), (0.0, 0.95)]),
    "star": _polygon(_star_points()),
    "heart": _heart,
    "cross": _cross,
    "diamond": _polygon([(0.5, 0.0), (0.92, 0.5), (0.5, 1.0), (0.08, 0.5)]),
    "moon": _moon,
    "hexagon": _polygon([(0.5 + 0.5 * math.cos(a), 0.5 + 0.5 * math.sin(a))
                         for a in (math.pi / 3 * k + math.pi / 6 for k in range(6))]),
    # Look-alikes (fisao.world.scenes.LOOKALIKES): outside the vocabulary, each near a class.
    "oblong": _oblong,
    "kite": _polygon([(0.5, 0.0), (0.85, 0.35), (0.5, 1.0), (0.15, 0.35)]),
    "pentagon": _polygon([(0.5 + 0.5 * math.cos(a), 0.53 + 0.5 * math.sin(a))
                          for a in (-math.pi / 2 + 2 * math.pi / 5 * k for k in range(5))]),
    "ring": _ring,
}


def render(scene: Scene, canvas: int) -> Image.Image:
    """Draw `scene` on a `canvas` x `canvas` RGB image (objects, then look-alikes, then noise)."""
    image = Image.new("RGB", (canvas, canvas), scene.background)
    draw = ImageDraw.Draw(image)
    for obj in (*scene.objects, *scene.extras):
        mask = Image.new("L", (obj.size, obj.size), 0)
        SHAPES[obj.shape](ImageDraw.Draw(mask), obj.size)
        if obj.alpha < 1:
            mask = mask.point(lambda v, a=obj.alpha: round(v * a))
        image.paste(PALETTE[obj.colour], (obj.x, obj.y), mask)
        if obj.occluder is not None:
            x, y, w, h, grey = obj.occluder
            draw.rectangle([x, y, x + w - 1, y + h - 1], fill=(grey, grey, grey))
    if scene.noise:
        image = _add_noise(image, scene.noise_seed, scene.noise)
    return image


def _add_noise(image: Image.Image, seed: int, std: float) -> Image.Image:
    """Per-pixel Gaussian noise of standard deviation `std` (0-255 units), seeded."""
    pixels = np.asarray(image, dtype=np.float32)
    pixels = pixels + np.random.default_rng(seed).normal(0.0, std, pixels.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
