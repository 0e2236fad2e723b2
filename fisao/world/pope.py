"""POPE question files for the world, with the three official negative-sampling strategies.

Li et al. (2023) ask, per image, about k objects that are present ("yes") and k that are not
("no"). The absent ones are drawn uniformly (random), from the most frequent classes
(popular), or from the classes that most often co-occur with the present ones (adversarial).
Frequencies and co-occurrences come from the train split: they are the prior the model has
learnt. Questions alternate yes/no per image, as in the official files.
"""
from __future__ import annotations

import random
from collections import Counter
from typing import Literal

from fisao.world.text import question

Strategy = Literal["random", "popular", "adversarial"]
STRATEGIES: tuple[Strategy, ...] = ("random", "popular", "adversarial")


def class_statistics(scenes_classes: list[list[str]]) -> tuple[Counter, dict[str, Counter]]:
    """Per class: number of images containing it; per pair: number of images containing both."""
    freq: Counter = Counter()
    cooc: dict[str, Counter] = {}
    for classes in scenes_classes:
        distinct = set(classes)
        freq.update(distinct)
        for a in distinct:
            cooc.setdefault(a, Counter()).update(b for b in distinct if b != a)
    return freq, cooc


def negatives(
    strategy: Strategy,
    present: list[str],
    classes: tuple[str, ...],
    k: int,
    rng: random.Random,
    freq: Counter,
    cooc: dict[str, Counter],
) -> list[str]:
    """k absent classes chosen by `strategy` (ties broken by class order, so the result is stable)."""
    absent = [c for c in classes if c not in present]
    if strategy == "random":
        return rng.sample(absent, min(k, len(absent)))
    if strategy == "popular":
        ranked = sorted(absent, key=lambda c: -freq[c])
    else:
        ranked = sorted(absent, key=lambda c: -sum(cooc.get(p, Counter())[c] for p in present))
    return ranked[:k]


def pope_questions(
    images: list[tuple[str, list[str]]],
    strategy: Strategy,
    classes: tuple[str, ...],
    rng: random.Random,
    freq: Counter,
    cooc: dict[str, Counter],
    per_image: int = 3,
) -> list[dict]:
    """POPE rows for `images` (file name, classes present): half yes, half no."""
    rows: list[dict] = []
    for file_name, present_all in images:
        present = list(dict.fromkeys(present_all))
        k = min(per_image, len(present), len(classes) - len(present))
        yes = rng.sample(present, k)
        no = negatives(strategy, present, classes, k, rng, freq, cooc)
        for y, n in zip(yes, no):
            for name, label in ((y, "yes"), (n, "no")):
                rows.append({"question_id": len(rows) + 1, "image": file_name, "text": question(name), "label": label})
    return rows
