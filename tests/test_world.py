"""The shapes world: determinism, the co-occurrence prior, ground truth that matches pixels and words.

One moderately sized world is built per module (train 600 images) and every statistical
check reads it back from disk, the way the rest of the project reads it.
"""
from __future__ import annotations

import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from fisao import io
from fisao.benchmarks.chair import chair
from fisao.benchmarks.vocab import Vocabulary
from fisao.coco import load_image, load_instances
from fisao.config import load_config
from fisao.dvcdata import file_md5s
from fisao.world import build as world_build
from fisao.world.build import build_world, read_world_config, sample_split
from fisao.world.config import CRISP, SPLITS, WorldConfig
from fisao.world.data import load_split
from fisao.world.pope import STRATEGIES
from fisao.world.render import PALETTE, SHAPES, ShapeObject
from fisao.world.scenes import _overlap

TINY = {"train": 12, "val": 4, "test": 6}
QUESTION_RE = re.compile(r"^Is there an? (.+) in the image\?$")


def world_config(sizes: dict, **world) -> WorldConfig:
    world.setdefault("pretrain_size", 5)
    return load_config(None, {"world.sizes": sizes, **{f"world.{k}": v for k, v in world.items()}}).world


@pytest.fixture(scope="module")
def cfg() -> WorldConfig:
    # The crisp world (no hardness: pixels can be checked exactly; tests/test_world_hardness.py
    # checks what hardness draws) with a strong train prior (the pair statistics stand out).
    return world_config({"train": 600, "val": 20, "test": 300}, cooccurrence={"train": 0.95, "val": 0.3, "test": 0.3},
                        **{f"hardness.{k}": v for k, v in CRISP.items()})


@pytest.fixture(scope="module")
def world(cfg, tmp_path_factory) -> Path:
    return build_world(tmp_path_factory.mktemp("world") / "world", cfg, progress=False)


def split_objects(world: Path, split: str) -> dict[str, set[str]]:
    """file name -> classes present, from the split's instances.json."""
    inst = load_instances(world / split / "instances.json")
    return {name: inst.present(i) for i, name in inst.file_names.items()}


def cooccurrence(objects: list[set[str]], a: str, b: str) -> tuple[float, float]:
    """(P(partner present | a member present), P(both present | at least one present)) for a pair."""
    with_a = [s for s in objects if a in s]
    with_b = [s for s in objects if b in s]
    conditional = (sum(b in s for s in with_a) + sum(a in s for s in with_b)) / (len(with_a) + len(with_b))
    either = [s for s in objects if a in s or b in s]
    return conditional, sum(a in s and b in s for s in either) / len(either)


# --- determinism and the atomic build ------------------------------------------------------


def test_same_seed_same_bytes_other_seed_other_world(tmp_path):
    cfg = world_config(TINY, seed=5)
    a = file_md5s(build_world(tmp_path / "a" / "world", cfg, progress=False))
    b = file_md5s(build_world(tmp_path / "b" / "world", cfg, progress=False))
    assert a == b
    # world.json, vocab.txt; 6 files and the images per split; pretrain: 2 files and its images
    assert len(a) == 2 + 3 * 6 + sum(TINY.values()) + 2 + cfg.pretrain_size

    c = file_md5s(build_world(tmp_path / "c" / "world", cfg.model_copy(update={"seed": 6}), progress=False))
    assert c.keys() == a.keys()
    images = [k for k in a if k.endswith(".png")]
    assert sum(a[k] != c[k] for k in images) >= 0.9 * len(images)
    for split in SPLITS:
        assert a[f"{split}/instances.json"] != c[f"{split}/instances.json"]
        assert a[f"{split}/captions.jsonl"] != c[f"{split}/captions.jsonl"]
    assert a["vocab.txt"] == c["vocab.txt"]


def test_each_part_has_its_own_random_stream(tmp_path):
    # Changing how captions are worded must leave the scenes, images and POPE files alone.
    a = file_md5s(build_world(tmp_path / "a", world_config(TINY, synonym_prob=0.0), progress=False))
    b = file_md5s(build_world(tmp_path / "b", world_config(TINY, synonym_prob=1.0), progress=False))
    differ = {k for k in a if a[k] != b[k]}
    assert differ == {"world.json"} | {f"{s}/captions.jsonl" for s in (*SPLITS, "pretrain")}


def test_build_replaces_the_world_and_leaves_no_temporary_directories(tmp_path):
    out = tmp_path / "data" / "world"
    build_world(out, world_config(TINY, seed=1), progress=False)
    (out / "stale.txt").write_text("from an older world")
    build_world(out, world_config(TINY, seed=2), progress=False)
    assert sorted(p.name for p in out.parent.iterdir()) == ["world"]
    assert not (out / "stale.txt").exists()
    assert read_world_config(out).seed == 2
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]


def test_a_failed_build_keeps_the_old_world(tmp_path, monkeypatch):
    out = tmp_path / "world"
    build_world(out, world_config(TINY, seed=1), progress=False)
    before = file_md5s(out)

    def broken(out, cfg, split, *args, **kwargs):
        if split == "test":
            raise OSError("disk full")
        return write_split(out, cfg, split, *args, **kwargs)

    write_split = world_build.write_split
    monkeypatch.setattr(world_build, "write_split", broken)
    with pytest.raises(OSError, match="disk full"):
        build_world(out, world_config(TINY, seed=2), progress=False)
    assert file_md5s(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["world"]


def test_world_json_records_the_config(world, cfg):
    assert read_world_config(world) == cfg


# --- scenes --------------------------------------------------------------------------------


def test_default_world_has_enough_variety():
    cfg = WorldConfig()
    assert len(cfg.classes) >= 8 and len(cfg.colours) >= 5
    assert len(cfg.pairs) >= 2


def test_instances_are_coco_with_boxes_inside_the_canvas(world, cfg):
    for split in SPLITS:
        data = io.read_json(world / split / "instances.json")
        assert [c["name"] for c in data["categories"]] == list(cfg.classes)
        assert [c["id"] for c in data["categories"]] == list(range(1, len(cfg.classes) + 1))
        assert [im["id"] for im in data["images"]] == list(range(1, cfg.sizes[split] + 1))
        for im in data["images"]:
            assert (im["width"], im["height"]) == (cfg.canvas, cfg.canvas)
            assert (world / split / "images" / im["file_name"]).is_file()
        assert len({a["id"] for a in data["annotations"]}) == len(data["annotations"])
        for ann in data["annotations"]:
            x, y, w, h = ann["bbox"]
            assert 0 <= x and 0 <= y and x + w <= cfg.canvas and y + h <= cfg.canvas
            assert cfg.object_size[0] <= w == h <= cfg.object_size[1]
            assert ann["area"] == w * h and ann["color"] in cfg.colours
        counts = Counter(a["image_id"] for a in data["annotations"])
        assert all(cfg.min_objects <= counts[im["id"]] <= cfg.max_objects for im in data["images"])


def test_every_class_and_colour_appears(world, cfg):
    for split in ("train", "test"):
        data = io.read_json(world / split / "instances.json")
        names = {c["id"]: c["name"] for c in data["categories"]}
        assert {names[a["category_id"]] for a in data["annotations"]} == set(cfg.classes)
        assert {a["color"] for a in data["annotations"]} == set(cfg.colours)


def test_pairs_cooccur_in_train_far_more_than_in_test(world, cfg):
    # Measured with these sizes: P(partner | member) 0.91-0.95 in train, 0.69-0.72 in test.
    train = list(split_objects(world, "train").values())
    test = list(split_objects(world, "test").values())
    either = {"train": [], "test": []}
    for a, b in cfg.pairs:
        train_cond, train_either = cooccurrence(train, a, b)
        test_cond, test_either = cooccurrence(test, a, b)
        assert train_cond >= 0.8, (a, b, train_cond)
        assert test_cond <= train_cond - 0.15, (a, b, train_cond, test_cond)
        either["train"].append(train_either)
        either["test"].append(test_either)
    # `cooccurrence[split]` is the share of images holding a pair member that hold both
    # (averaged over the pairs: each pair alone has a few hundred images, too few to pin it).
    assert np.mean(either["train"]) == pytest.approx(cfg.cooccurrence["train"], abs=0.04)
    assert np.mean(either["test"]) == pytest.approx(cfg.cooccurrence["test"], abs=0.08)
    # A class outside every pair keeps company at random.
    for c in set(cfg.classes) - set(cfg.partner()):
        with_c = [s for s in train if c in s]
        for other in set(cfg.classes) - {c}:
            assert sum(other in s for s in with_c) / len(with_c) < 0.6


@pytest.mark.parametrize("lo,hi", [(1, 1), (2, 2), (3, 3), (4, 4), (1, 6), (5, 6)])
def test_object_counts_stay_within_bounds(lo, hi):
    cfg = world_config({"train": 400, "val": 1, "test": 1}, min_objects=lo, max_objects=hi)
    counts = Counter(len(s.objects) for s in sample_split(cfg, "train"))
    assert min(counts) >= lo and max(counts) <= hi, counts


def test_object_counts_hold_with_few_or_only_paired_classes():
    # Three classes, two of them a pair, and at least four objects: classes must repeat.
    cfg = world_config({"train": 200, "val": 1, "test": 1}, classes=["circle", "square", "star"],
                       pairs=[["circle", "square"]], synonyms={}, min_objects=4, max_objects=5)
    assert all(4 <= len(s.objects) <= 5 for s in sample_split(cfg, "train"))
    # Every class paired: a scene with room for one more object cannot start a pair.
    cfg = world_config({"train": 200, "val": 1, "test": 1}, classes=["circle", "square", "star", "moon"],
                       pairs=[["circle", "square"], ["star", "moon"]], synonyms={}, min_objects=3, max_objects=3)
    assert all(len(s.objects) == 3 for s in sample_split(cfg, "train"))


def test_free_layout_limits_overlap():
    cfg = world_config({"train": 300, "val": 1, "test": 1}, layout="free", object_size=[15, 22])
    worst = np.array([max((_overlap(p, q) for i, p in enumerate(s.objects) for q in s.objects[i + 1:]), default=0.0)
                      for s in sample_split(cfg, "train")])
    assert (worst <= cfg.max_overlap + 1e-9).mean() >= 0.98
    assert worst.max() <= 0.5
    assert (worst > 0).mean() < 0.5  # most scenes have no overlap at all


def test_grid_layout_puts_each_object_alone_in_a_cell(world, cfg):
    assert cfg.layout == "grid"
    for split in SPLITS:
        data = io.read_json(world / split / "instances.json")
        cells: dict[int, list[tuple[int, int]]] = {}
        for a in data["annotations"]:
            x, y, w, h = a["bbox"]
            cell = (x // cfg.cell, y // cfg.cell)
            assert ((x + w - 1) // cfg.cell, (y + h - 1) // cfg.cell) == cell, f"object {a['id']} crosses a cell edge"
            cells.setdefault(a["image_id"], []).append(cell)
        assert all(len(set(c)) == len(c) for c in cells.values()), "two objects share a cell"


def test_overlap_of_boxes_by_hand():
    a = ShapeObject("circle", "red", 0, 0, 10)
    assert _overlap(a, ShapeObject("circle", "red", 10, 0, 10)) == 0.0  # touching edges
    assert _overlap(a, ShapeObject("circle", "red", 5, 5, 10)) == pytest.approx(25 / 100)
    assert _overlap(a, ShapeObject("circle", "red", 2, 2, 4)) == 1.0  # inside: all of the smaller box


# --- pixels --------------------------------------------------------------------------------


def shape_mask(shape: str, x: int, y: int, size: int, canvas: int) -> np.ndarray:
    mask = Image.new("L", (size, size), 0)
    SHAPES[shape](ImageDraw.Draw(mask), size)
    full = np.zeros((canvas, canvas), dtype=bool)
    full[y:y + size, x:x + size] = np.asarray(mask) > 0
    return full


def test_pixels_show_each_object_in_its_colour_at_its_box(world, cfg):
    data = io.read_json(world / "train" / "instances.json")
    names = {c["id"]: c["name"] for c in data["categories"]}
    anns: dict[int, list[dict]] = {}
    for a in data["annotations"]:
        anns.setdefault(a["image_id"], []).append(a)
    visible_share = []
    for im in data["images"][:150]:
        pixels = np.asarray(load_image(world / "train" / "images" / im["file_name"]))
        masks = [shape_mask(names[a["category_id"]], *a["bbox"][:3], cfg.canvas) for a in anns[im["id"]]]
        covered = np.zeros_like(masks[0])
        for a, mask in reversed(list(zip(anns[im["id"]], masks))):  # later objects are drawn on top
            visible = mask & ~covered
            covered |= mask
            assert (pixels[visible] == PALETTE[a["color"]]).all(), (im["file_name"], a)
            visible_share.append(visible.sum() / mask.sum())
        # Everything else is one light background colour.
        background = pixels[~covered]
        assert (background == background[0]).all() and background[0].min() >= 200
    # Overlap is limited to 15% of the smaller box and shapes do not fill their boxes:
    # measured, every object keeps >= 90% of its pixels, 99.9% on average.
    assert min(visible_share) >= 0.8
    assert np.mean(visible_share) >= 0.99


def test_shapes_are_distinct_masks():
    masks = {name: shape_mask(name, 0, 0, 20, 20) for name in SHAPES}
    assert all(m.sum() >= 0.25 * 400 for m in masks.values())
    names = sorted(masks)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert (masks[a] != masks[b]).sum() >= 20, (a, b)


# --- words ---------------------------------------------------------------------------------


def test_captions_name_exactly_the_objects_and_their_colours(world):
    vocab = Vocabulary.from_file(world / "vocab.txt")
    colours = set(PALETTE)
    for split in ("train", "test"):
        inst = load_instances(world / split / "instances.json")
        data = io.read_json(world / split / "instances.json")
        image_colours: dict[int, set[str]] = {}
        for a in data["annotations"]:
            image_colours.setdefault(a["image_id"], set()).add(a["color"])
        rows = io.read_jsonl(world / split / "captions.jsonl")
        assert Counter(r["image_id"] for r in rows) == Counter({i: 3 for i in inst.file_names})
        m = chair([(r["image_id"], r["caption"]) for r in rows], inst.objects, vocab).metrics
        assert (m["chair_i"], m["chair_s"], m["recall"]) == (0.0, 0.0, 1.0)
        assert m["n_mentions"] >= m["n_captions"]
        for r in rows:
            said = {w for w in re.findall(r"[a-z]+", r["caption"].lower()) if w in colours}
            assert said == image_colours[r["image_id"]], r


def test_vocabulary_file_lists_classes_and_synonyms(world, cfg):
    vocab = Vocabulary.from_file(world / "vocab.txt")
    assert vocab.categories == cfg.classes
    for cls, names in cfg.synonyms.items():
        assert all(vocab.category_of(n) == cls for n in names)


def test_training_questions_are_answered_truthfully(world):
    for split in ("train", "test"):
        inst = load_instances(world / split / "instances.json")
        answers: dict[int, Counter] = {}
        for row in io.read_jsonl(world / split / "questions.jsonl"):
            name = QUESTION_RE.match(row["question"]).group(1)
            present = name in inst.present(row["image_id"])
            assert row["answer"].startswith("Yes" if present else "No"), row
            answers.setdefault(row["image_id"], Counter())[present] += 1
        for image_id, c in answers.items():
            assert c[True] == len(inst.present(image_id)) == c[False]


def read_pope(world: Path, split: str, strategy: str) -> dict[str, list[tuple[str, str]]]:
    """file name -> [(class asked about, label)] in file order."""
    rows = io.read_jsonl(world / split / f"pope_{strategy}.jsonl")
    assert [r["question_id"] for r in rows] == list(range(1, len(rows) + 1))
    out: dict[str, list[tuple[str, str]]] = {}
    for r in rows:
        out.setdefault(r["image"], []).append((QUESTION_RE.match(r["text"]).group(1), r["label"]))
    return out


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_pope_is_balanced_alternating_and_true(world, strategy):
    for split in ("val", "test"):
        objects = split_objects(world, split)
        pope = read_pope(world, split, strategy)
        assert pope.keys() == objects.keys()
        for image, qs in pope.items():
            present = objects[image]
            assert len(qs) == 2 * min(3, len(present))
            assert [label for _, label in qs] == ["yes", "no"] * (len(qs) // 2)
            assert all((name in present) == (label == "yes") for name, label in qs), (image, qs)
            assert len({name for name, _ in qs}) == len(qs)  # no class asked twice


def test_pope_popular_asks_about_the_most_frequent_absent_classes(world):
    freq = Counter(c for classes in split_objects(world, "train").values() for c in classes)
    objects = split_objects(world, "test")
    for image, qs in read_pope(world, "test", "popular").items():
        asked = {name for name, label in qs if label == "no"}
        not_asked = set(freq) - objects[image] - asked
        assert min(freq[c] for c in asked) >= max((freq[c] for c in not_asked), default=0)


def test_pope_adversarial_asks_about_absent_partners(world, cfg):
    partner = cfg.partner()
    objects = split_objects(world, "test")

    def partner_share(strategy: str) -> float:
        hits = total = 0
        for image, qs in read_pope(world, "test", strategy).items():
            missing_partners = {partner[c] for c in objects[image] if c in partner} - objects[image]
            if missing_partners:
                negatives = [name for name, label in qs if label == "no"]
                hits += bool(missing_partners & set(negatives))
                total += 1
        return hits / total

    adversarial, random_ = partner_share("adversarial"), partner_share("random")
    assert adversarial >= 0.95
    assert adversarial >= random_ + 0.3


def test_scenes_resample_identically_without_the_global_random_state(world, cfg):
    rng_state = random.getstate()
    again = sample_split(cfg, "test")
    assert random.getstate() == rng_state  # the generator never touches the global random state
    objects = split_objects(world, "test")
    assert [set(s.classes) for s in again] == [objects[f"{i:06d}.png"] for i in range(1, len(again) + 1)]


def test_the_pretrain_split_is_the_clips_alone(tmp_path):
    # Images, instances and captions with its own (weak) pair prior; no questions, no POPE files.
    world = build_world(tmp_path / "w", world_config(TINY, pretrain_size=7), progress=False)
    names = sorted(p.name for p in (world / "pretrain").iterdir())
    assert names == ["captions.jsonl", "images", "instances.json"]
    examples = load_split(world, "pretrain")
    assert len(examples) == 7 and all(e.captions and not e.questions for e in examples)
    assert not (build_world(tmp_path / "n", world_config(TINY, pretrain_size=0), progress=False) / "pretrain").exists()
