"""Words about scenes: detailed captions, yes/no questions and the world's vocabulary file.

Captions name every object (colour, class, count) in a first sentence and place up to two of
them in the following ones, with synonyms now and then, so the mention parser has plurals,
synonyms and multi-word names to handle. The vocabulary file has the format of the CHAIR
authors' COCO synonyms (`category, synonym, ...` per line).
"""
from __future__ import annotations

import random

from fisao.world.config import WorldConfig
from fisao.world.render import Scene, ShapeObject

NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}

LIST_TEMPLATES = (
    "The image shows {items}.",
    "There {be} {items} in the image.",
    "In this picture, there {be} {items}.",
    "This image contains {items}.",
)

POSITIONS = (
    ("in the top left corner", "at the top", "in the top right corner"),
    ("on the left", "in the center", "on the right"),
    ("in the bottom left corner", "at the bottom", "in the bottom right corner"),
)


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def plural(word: str) -> str:
    head, _, last = word.rpartition(" ")
    last = last + "es" if last.endswith(("s", "x", "sh", "ch")) else last + "s"
    return f"{head} {last}" if head else last


def question(name: str) -> str:
    """The POPE question for a class name."""
    return f"Is there {article(name)} {name} in the image?"


def yes_no_answer(name: str, present: bool) -> str:
    if present:
        return f"Yes, there is {article(name)} {name} in the image."
    return f"No, there is no {name} in the image."


def position(obj: ShapeObject, canvas: int) -> str:
    cx, cy = obj.x + obj.size / 2, obj.y + obj.size / 2
    col = min(2, int(3 * cx / canvas))
    row = min(2, int(3 * cy / canvas))
    return POSITIONS[row][col]


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def caption(rng: random.Random, scene: Scene, cfg: WorldConfig) -> str:
    """A detailed description of `scene` naming every object once, in a random order."""
    names = {
        cls: rng.choice(cfg.synonyms[cls]) if cls in cfg.synonyms and rng.random() < cfg.synonym_prob else cls
        for cls in scene.classes
    }
    groups: dict[tuple[str, str], list[ShapeObject]] = {}
    for obj in scene.objects:
        groups.setdefault((obj.colour, obj.shape), []).append(obj)
    keys = list(groups)
    rng.shuffle(keys)
    items = []
    for colour, shape in keys:
        n = len(groups[colour, shape])
        name = names[shape]
        items.append(f"{article(colour)} {colour} {name}" if n == 1 else f"{NUMBERS[n]} {colour} {plural(name)}")
    be = "is" if len(groups[keys[0]]) == 1 else "are"
    sentences = [rng.choice(LIST_TEMPLATES).format(items=_join(items), be=be)]
    singles = [k for k in keys if len(groups[k]) == 1]
    for colour, shape in singles[: rng.randint(0, 2)]:
        where = position(groups[colour, shape][0], cfg.canvas)
        sentences.append(f"The {colour} {names[shape]} is {where}.")
    return " ".join(sentences)


def questions(rng: random.Random, scene: Scene, cfg: WorldConfig) -> list[tuple[str, str]]:
    """Balanced yes/no training questions: each present class, and as many absent ones."""
    present = scene.classes
    absent = [c for c in cfg.classes if c not in present]
    negatives = rng.sample(absent, min(len(present), len(absent)))
    pairs = [(question(c), yes_no_answer(c, True)) for c in present]
    pairs += [(question(c), yes_no_answer(c, False)) for c in negatives]
    rng.shuffle(pairs)
    return pairs


def vocabulary_lines(cfg: WorldConfig) -> list[str]:
    """`category, synonym, ...` lines, the format of the CHAIR authors' COCO synonyms file."""
    return [", ".join((cls, *cfg.synonyms.get(cls, ()))) for cls in cfg.classes]
