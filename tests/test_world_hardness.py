"""world.hardness: objects that are hard to verify (look-alikes, faint, occluded, noisy), as in photos.

Each option must change only what it says: the scenes' objects stay the same (hardness draws from
its own random stream), look-alikes are drawn but never annotated, captioned or asked about, and a
world with every option off is the world built before the options existed (the demo's data.dvc).
"""
from __future__ import annotations

import numpy as np
import pytest

from fisao import io
from fisao.config import load_config
from fisao.dvcdata import file_md5s
from fisao.world.build import build_world, read_world_config, sample_split
from fisao.world.config import CRISP
from fisao.world.render import SHAPES, Scene, ShapeObject, render
from fisao.world.scenes import LOOKALIKES

SIZES = {"train": 40, "val": 4, "test": 30}
HARD = {"lookalikes": 2, "lookalike_prob": 1.0, "faint_prob": 0.5, "occlusion_prob": 0.5, "noise": 10.0}


def world(**hardness):
    overrides = {"world.sizes": SIZES, "world.pretrain_size": 6}
    overrides.update({f"world.hardness.{k}": v for k, v in hardness.items()})
    return load_config(None, overrides).world


def test_hardness_keeps_each_scenes_objects_and_adds_only_what_it_says():
    plain, hard = world(**CRISP), world(**HARD)
    for split in ("train", "test", "pretrain"):
        for a, b in zip(sample_split(plain, split), sample_split(hard, split), strict=True):
            assert [(o.shape, o.colour, o.x, o.y, o.size) for o in a.objects] == \
                   [(o.shape, o.colour, o.x, o.y, o.size) for o in b.objects]
            assert a.extras == () and a.noise == 0 and all(o.alpha == 1 and o.occluder is None for o in a.objects)
            assert b.noise == 10.0
    scenes = sample_split(hard, "train")
    objects = [o for s in scenes for o in s.objects]
    faint = [o for o in objects if o.alpha < 1]
    occluded = [o for o in objects if o.occluder is not None]
    # Half of the objects each (binomial, 40 images x 1-4 objects): far from none and from all.
    assert 0.3 < len(faint) / len(objects) < 0.7 and 0.3 < len(occluded) / len(objects) < 0.7
    assert all(0.3 <= o.alpha <= 0.55 for o in faint)
    extras = [e for s in scenes for e in s.extras]
    assert extras and {e.shape for e in extras} <= set(LOOKALIKES)
    for s in scenes:  # a look-alike takes a free grid cell of its own
        cells = [(o.x // 16, o.y // 16) for o in (*s.objects, *s.extras)]
        assert len(set(cells)) == len(cells)


def test_an_occluder_covers_one_side_of_its_object_within_the_drawn_share():
    for o in (o for s in sample_split(world(**HARD), "train") for o in s.objects if o.occluder):
        x, y, w, h, grey = o.occluder
        assert o.x <= x and o.y <= y and x + w <= o.x + o.size and y + h <= o.y + o.size
        covered = (w * h) / o.size ** 2
        assert 0.3 * (1 - 1 / o.size) <= covered <= 0.6 + 1 / o.size and (w == o.size or h == o.size)
        assert 110 <= grey <= 190


def test_render_draws_faint_occluded_and_noisy_objects():
    bg = (230, 230, 230)
    solid = ShapeObject("square", "red", 8, 8, 16)
    faint = ShapeObject("square", "red", 8, 8, 16, alpha=0.4)
    hidden = ShapeObject("square", "red", 8, 8, 16, occluder=(8, 8, 8, 16, 150))
    centre = lambda scene: np.asarray(render(scene, 32))[16, 16].tolist()  # noqa: E731
    assert centre(Scene((solid,), bg)) == [220, 40, 40]
    # 40% red over the background: 0.4 * 220 + 0.6 * 230 = 226, 0.4 * 40 + 0.6 * 230 = 154
    assert centre(Scene((faint,), bg)) == pytest.approx([226, 154, 154], abs=1)
    px = np.asarray(render(Scene((hidden,), bg), 32))
    assert px[16, 10].tolist() == [150, 150, 150] and px[16, 20].tolist() == [220, 40, 40]
    noisy = Scene((solid,), bg, noise=10.0, noise_seed=3)
    a, b = np.asarray(render(noisy, 32), float), np.asarray(render(noisy, 32), float)
    assert (a == b).all()  # seeded: rendering stays a pure function of the scene
    diff = a - np.asarray(render(Scene((solid,), bg), 32), float)
    assert 8 < diff[:8].std() < 12  # the background rows: noise of std ~10, unclipped there
    other = np.asarray(render(Scene((solid,), bg, noise=10.0, noise_seed=4), 32), float)
    assert (other != a).any()


def test_lookalike_shapes_differ_from_the_class_they_resemble():
    from PIL import Image, ImageDraw

    def mask(name):
        m = Image.new("L", (16, 16), 0)
        SHAPES[name](ImageDraw.Draw(m), 16)
        return np.asarray(m) > 0

    for lookalike, cls in LOOKALIKES.items():
        a, b = mask(lookalike), mask(cls)
        iou = (a & b).sum() / (a | b).sum()
        assert 0.4 < iou < 0.95, (lookalike, cls, iou)  # alike, yet not the same mask


def test_a_hard_world_is_deterministic_and_never_annotates_lookalikes(tmp_path):
    cfg = world(**HARD)
    a = file_md5s(build_world(tmp_path / "a", cfg, progress=False))
    b = file_md5s(build_world(tmp_path / "b", cfg, progress=False))
    assert a == b
    assert read_world_config(tmp_path / "a") == cfg
    inst = io.read_json(tmp_path / "a" / "train" / "instances.json")
    names = {c["name"] for c in inst["categories"]}
    assert names == set(cfg.classes) and not names & set(LOOKALIKES)
    text = (tmp_path / "a" / "train" / "captions.jsonl").read_text() + (tmp_path / "a" / "test" / "questions.jsonl").read_text()
    assert not any(shape in text for shape in LOOKALIKES)
    plain = file_md5s(build_world(tmp_path / "c", world(**CRISP), progress=False))
    assert plain["train/instances.json"] == a["train/instances.json"]  # same objects, other pixels
    assert plain["train/images/000001.png"] != a["train/images/000001.png"]


def test_without_hardness_world_json_is_as_before(tmp_path):
    build_world(tmp_path / "w", world(**CRISP), progress=False)
    assert "hardness" not in io.read_json(tmp_path / "w" / "world.json")["config"]
    assert read_world_config(tmp_path / "w") == world(**CRISP)  # read back as the crisp world, not the default
    assert world().hardness.active  # the default (the demo's) world is hard
    build_world(tmp_path / "h", world(**{**CRISP, "noise": 4.0}), progress=False)
    assert io.read_json(tmp_path / "h" / "world.json")["config"]["hardness"]["noise"] == 4.0


@pytest.mark.parametrize("key, value", [("faint_alpha", [0.0, 0.5]), ("occlusion_cover", [0.6, 0.3]),
                                        ("noise", -1), ("lookalikes", 9)])
def test_bad_hardness_values_are_refused_by_name(key, value):
    with pytest.raises(ValueError, match=key):
        world(**{key: value})


def test_a_lookalike_that_is_a_class_of_the_world_is_never_drawn_unannotated():
    classes = ["circle", "square", "star", "pentagon", "hexagon"]
    cfg = load_config(None, {"world.sizes": SIZES, "world.pretrain_size": 6, "world.classes": classes,
                             "world.pairs": [], "world.synonyms": {}, "world.hardness.lookalikes": 2,
                             "world.hardness.lookalike_prob": 1.0}).world
    extras = {e.shape for s in sample_split(cfg, "train") for e in s.extras}
    assert extras == {"oblong"}  # hexagon and pentagon are classes here; kite, ring lack their class
