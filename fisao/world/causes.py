"""Why a description names a shape that is not in the image: the shapes world knows.

The world draws every scene from its seed, so for each hallucinated category it can say which of
its causes was in the image (the first that applies):
- "lookalike": a look-alike of the category is drawn (`world.hardness.lookalikes`: a hexagon
  for circle), a perception error the verifier shares;
- "pair": the category's pair partner is in the image (`world.pairs`, co-occurring in 70% of
  the train images): the language prior, which the verifier learnt from the same captions;
- "other": neither.

`halluc_<cause>` figures count hallucinated categories per description (distinct within it), so
their sum is the description's hallucinated categories; `reward_<cause>` figures are the mean
reward the verifier gave such mentions. Neither is used in any reward: they say which kind of
hallucination a method removes and which the verifier cannot see (docs/method.md).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

CAUSES = ("lookalike", "pair", "other")


@dataclass(frozen=True)
class SceneFacts:
    """What one image holds: its classes and the classes its look-alikes resemble."""

    classes: frozenset[str]
    lookalike_of: frozenset[str]


def partners(pairs: Iterable[Sequence[str]]) -> dict[str, frozenset[str]]:
    """{class: the classes it is paired with} from `world.pairs` ([[a, b], ...], both directions)."""
    out: dict[str, set[str]] = {}
    for a, b in pairs:
        out.setdefault(a, set()).add(b)
        out.setdefault(b, set()).add(a)
    return {k: frozenset(v) for k, v in out.items()}


def cause(category: str, facts: SceneFacts, partner: Mapping[str, frozenset[str]]) -> str | None:
    """The cause of naming `category` on an image with `facts`; None when the category is there."""
    if category in facts.classes:
        return None
    if category in facts.lookalike_of:
        return "lookalike"
    if partner.get(category, frozenset()) & facts.classes:
        return "pair"
    return "other"


def scene_facts(world_dir: str | Path, split: str) -> tuple[dict[int, SceneFacts], dict[str, frozenset[str]]]:
    """({image_id: SceneFacts}, partners) of a built world's split, its scenes drawn again from the
    world's config; a ValueError when they do not match the split's instances (a world built by
    other code), since the causes would then be wrong."""
    # Here, not at import: the sweep's and the summary's tables only need CAUSES.
    from fisao.coco import load_instances
    from fisao.world.build import read_world_config, sample_split
    from fisao.world.data import split_dir
    from fisao.world.scenes import LOOKALIKES

    cfg = read_world_config(world_dir)
    scenes = sample_split(cfg, split)
    inst = load_instances(split_dir(world_dir, split) / "instances.json")
    facts = {}
    for image_id, scene in enumerate(scenes, start=1):
        classes = frozenset(scene.classes)
        if classes != frozenset(inst.objects.get(image_id, ())):
            raise ValueError(f"{world_dir}: the {split} scenes drawn from world.json do not match instances.json at "
                             f"image {image_id}; rebuild the world with this version of fisao to tell hallucinations' causes")
        facts[image_id] = SceneFacts(classes, frozenset(LOOKALIKES[o.shape] for o in scene.extras))
    if len(inst.objects) != len(scenes):
        raise ValueError(f"{world_dir}: {len(inst.objects)} images in the {split} instances but {len(scenes)} scenes drawn")
    return facts, partners(cfg.pairs)


def world_facts(world_dir: str | Path, split: str) -> tuple[dict[int, SceneFacts], dict[str, frozenset[str]]] | None:
    """`scene_facts`, or None with a warning when the scenes do not match (a world built by another
    version of the generator): the causes are a diagnostic, so the stage goes on without them."""
    try:
        return scene_facts(world_dir, split)
    except ValueError as e:
        warnings.warn(f"{e}; the hallucinations' causes are left out", stacklevel=2)
        return None


def hallucinations_by_cause(described: Iterable[tuple[int, Sequence[str]]], facts: Mapping[int, SceneFacts],
                            partner: Mapping[str, frozenset[str]]) -> dict[str, float]:
    """{"halluc_<cause>": hallucinated categories of that cause per description} over (image_id,
    categories the description names) pairs; each category counts once per description."""
    counts = dict.fromkeys(CAUSES, 0)
    n = 0
    for image_id, categories in described:
        n += 1
        for c in dict.fromkeys(categories):
            why = cause(c, facts[image_id], partner)
            if why is not None:
                counts[why] += 1
    return {f"halluc_{k}": (v / n if n else 0.0) for k, v in counts.items()}


def rewards_by_cause(described: Iterable[tuple[int, Sequence[tuple[str, float]]]], facts: Mapping[int, SceneFacts],
                     partner: Mapping[str, frozenset[str]]) -> dict[str, float]:
    """{"reward_correct"/"reward_<cause>": mean reward, "share_<cause>": share of the mentions} over
    (image_id, [(category, reward), ...]) descriptions, counting the first mention of each category
    in a description (a repeat's reward is the repeat rule's, not the object's); a kind without a
    mention has no reward figure, and no mention at all gives {}."""
    sums: dict[str, list[float]] = {k: [] for k in ("correct", *CAUSES)}
    for image_id, mentions in described:
        for category, reward in dict(reversed(list(mentions))).items():  # the first reward of each category
            sums[cause(category, facts[image_id], partner) or "correct"].append(reward)
    total = sum(len(v) for v in sums.values())
    if not total:
        return {}
    out = {f"reward_{k}": sum(v) / len(v) for k, v in sums.items() if v}
    out.update({f"share_{k}": len(sums[k]) / total for k in CAUSES})
    return out
