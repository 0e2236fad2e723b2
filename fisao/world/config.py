"""The `world` section of a campaign config: the shapes world's classes, colours, co-occurrence
priors, layout and split sizes, with the checks that keep it renderable and its names parseable.

`fisao.config` holds it with the campaign's other sections.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fisao.benchmarks.vocab import words
from fisao.world.render import PALETTE, SHAPES

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")


class Hardness(BaseModel):
    """Objects that are hard to verify and to describe, the way real photographs make them.

    CLIP on photographs is fallible because objects are small, faint, partly hidden, surrounded by
    things outside the vocabulary that resemble things in it, and seen through sensor noise; a
    world whose every object is a crisp, whole shape gives a verifier that never errs (AUROC 1.0 on
    the policy's own mentions). Each option recreates one of these causes. The defaults are the
    demo world's (docs/method.md, "A verifier as fallible as CLIP", says how they were chosen and
    what each gave); `lookalikes`, `faint_prob`, `occlusion_prob` and `noise` all 0 give the crisp
    world, whose verifier is an oracle.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Look-alikes: each image holds up to `lookalikes` shapes outside the vocabulary that resemble a
    # class (a hexagon beside circles, an oblong beside squares): in photos most pixels belong to
    # things no vocabulary names, and CLIP scores a named look-alike high. Each is added with
    # probability `lookalike_prob`; they are never annotated, captioned or asked about.
    lookalikes: int = Field(2, ge=0, le=4)
    lookalike_prob: float = Field(0.5, ge=0, le=1)
    # Faint objects: drawn at low contrast (opacity drawn from `faint_alpha`), as in shadow or haze.
    faint_prob: float = Field(0.15, ge=0, le=1)
    faint_alpha: tuple[float, float] = (0.3, 0.55)
    # Occlusion: a grey bar covers a share (drawn from `occlusion_cover`) of the object's box along
    # one side, as when an object is partly behind another.
    occlusion_prob: float = Field(0.15, ge=0, le=1)
    occlusion_cover: tuple[float, float] = (0.3, 0.6)
    # Sensor noise: standard deviation of per-pixel Gaussian noise, in 0-255 units.
    noise: float = Field(10.0, ge=0, le=64)

    @model_validator(mode="after")
    def _check(self) -> "Hardness":
        for key in ("faint_alpha", "occlusion_cover"):
            lo, hi = getattr(self, key)
            if not 0 < lo <= hi < 1:
                raise ValueError(f"world.hardness.{key} {getattr(self, key)} must satisfy 0 < lo <= hi < 1")
        return self

    @property
    def active(self) -> bool:
        return bool(self.lookalikes and self.lookalike_prob) or bool(self.faint_prob or self.occlusion_prob or self.noise)


# `world.hardness` with every cause off: the crisp world, whose verifier is an oracle.
CRISP = {"lookalikes": 0, "faint_prob": 0.0, "occlusion_prob": 0.0, "noise": 0.0}


class WorldConfig(BaseModel):
    """The shapes world: classes, colours, co-occurrence priors and split sizes."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # as every section of fisao.config

    seed: int = 0
    canvas: int = Field(64, ge=32, le=512)
    classes: tuple[str, ...] = (
        "circle", "square", "triangle", "star", "heart", "cross", "diamond", "moon",
    )
    # Extra names a caption may use for a class (CHAIR maps them back to the class).
    synonyms: dict[str, tuple[str, ...]] = {
        "circle": ("disk",),
        "cross": ("plus sign",),
        "diamond": ("rhombus",),
        "moon": ("crescent",),
    }
    colours: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple")
    # Pairs whose members co-occur with probability `cooccurrence[split]`: the language prior.
    # Precisely, p is P(both | at least one present); P(partner | a given member) comes out higher
    # (measured: 0.92 for p = 0.85, 0.71 for p = 0.5), as a partner can also be drawn on its own.
    # The defaults give a base LLaVA that names an absent partner often enough to measure without
    # drowning the hard world's own errors (measured on the crisp world: CHAIR_i 0.21 on test with
    # 0.95/0.3, 0.06 with 0.85/0.5; on the hard world, seed 0: 0.31 with 0.85/0.3, 0.26 with 0.7/0.3).
    pairs: tuple[tuple[str, str], ...] = (("circle", "square"), ("star", "moon"), ("heart", "cross"))
    cooccurrence: dict[Split, float] = {"train": 0.7, "val": 0.3, "test": 0.3}
    sizes: dict[Split, int] = {"train": 2000, "val": 200, "test": 500}
    # A larger split for the CLIP alone (images, instances, captions; no questions, no POPE), with
    # a weak pair prior: a verifier that learnt the prior would reward the hallucinations it
    # should catch, and 2000 images are too few for a ViT from scratch (measured: object AUROC
    # 0.99 on train, 0.92 on val). 0 trains the CLIP on the train split.
    pretrain_size: int = Field(6000, ge=0)
    pretrain_cooccurrence: float = Field(0.3, ge=0, le=1)
    min_objects: int = Field(1, ge=1)
    max_objects: int = Field(4, ge=1, le=6)
    # "grid": each object inside its own cell of `cell` pixels, which should equal the CLIP's patch
    # size, so that a shape is one vision token. A tiny ViT learns shapes spread over several
    # patches very slowly (measured: object AUROC 0.84 after 1500 steps, against 0.999 for the
    # grid); the world's difficulty is meant to be the language prior, not the vision.
    # "free": anywhere on the canvas, with overlap limited by `max_overlap`.
    layout: Literal["grid", "free"] = "grid"
    cell: int = Field(16, ge=8)
    object_size: tuple[int, int] = (10, 15)
    # Chance that a newly added object repeats a class already present ("two red circles").
    duplicate_prob: float = Field(0.12, ge=0, le=1)
    # Free layout: largest allowed intersection over the smaller box (shapes stay recognisable).
    max_overlap: float = Field(0.15, ge=0, le=1)
    synonym_prob: float = Field(0.2, ge=0, le=1)
    # What makes an object hard to verify, as in photographs; with all four causes at 0 the world
    # renders exactly as before these options existed. Each draws from its own random stream.
    hardness: Hardness = Hardness()

    @model_validator(mode="after")
    def _check(self) -> "WorldConfig":
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"world.classes has duplicates: {list(self.classes)}")
        unknown = [c for c in self.classes if c not in SHAPES]
        if unknown:
            raise ValueError(f"world.classes: no renderer for {unknown}; choose from {sorted(SHAPES)}")
        bad_colours = [c for c in self.colours if c not in PALETTE]
        if bad_colours:
            raise ValueError(f"world.colours: unknown {bad_colours}; choose from {sorted(PALETTE)}")
        paired: list[str] = [name for pair in self.pairs for name in pair]
        missing = [n for n in paired + list(self.synonyms) if n not in self.classes]
        if missing:
            raise ValueError(f"world.pairs/synonyms name classes not in world.classes: {missing}")
        if len(set(paired)) != len(paired):
            raise ValueError(f"world.pairs: a class may belong to one pair only, got {self.pairs}")
        self._check_names()
        if set(self.cooccurrence) != set(SPLITS) or set(self.sizes) != set(SPLITS):
            raise ValueError("world.cooccurrence and world.sizes need exactly the keys train, val, test")
        if not all(0 <= p <= 1 for p in self.cooccurrence.values()):
            raise ValueError(f"world.cooccurrence values must lie in [0, 1], got {self.cooccurrence}")
        if min(self.sizes.values()) < 1:
            raise ValueError(f"world.sizes must be positive, got {self.sizes}")
        if not self.min_objects <= self.max_objects:
            raise ValueError("world.min_objects must not exceed world.max_objects")
        lo, hi = self.object_size
        if not 6 <= lo <= hi <= self.canvas // 2:
            raise ValueError(f"world.object_size {self.object_size} must satisfy 6 <= lo <= hi <= canvas/2")
        if self.layout == "grid":
            if self.canvas % self.cell or hi > self.cell:
                raise ValueError(f"world.layout grid needs canvas ({self.canvas}) divisible by cell ({self.cell}) "
                                 f"and object_size up to the cell, got {self.object_size}")
            if self.max_objects > (self.canvas // self.cell) ** 2:
                raise ValueError(f"world.max_objects {self.max_objects} exceeds the {(self.canvas // self.cell) ** 2} grid cells")
        return self

    def _check_names(self) -> None:
        """Class names and synonyms must make a valid vocabulary file (see text.vocabulary_lines)."""
        owner: dict[tuple[str, ...], str] = {words(cls): cls for cls in self.classes}
        for cls, names in self.synonyms.items():
            if not names:
                raise ValueError(f"world.synonyms.{cls} is empty: list at least one name or remove the key")
            for name in names:
                key = words(name)
                if not key or "," in name:
                    raise ValueError(f"world.synonyms.{cls}: {name!r} is not a usable name (it needs letters, no commas)")
                if owner.setdefault(key, cls) != cls:
                    raise ValueError(f"world.synonyms.{cls}: {name!r} is already a name of {owner[key]!r}; "
                                     "a name may refer to one class only")

    def partner(self) -> dict[str, str]:
        """Map each paired class to its partner."""
        out: dict[str, str] = {}
        for a, b in self.pairs:
            out[a], out[b] = b, a
        return out


def config_of_record(record: dict) -> WorldConfig:
    """The config a world.json records as `record` (fisao.world.build.world_record leaves out
    `hardness` when it is off, so a world.json without it is the crisp world's)."""
    return WorldConfig.model_validate({"hardness": CRISP, **record})
