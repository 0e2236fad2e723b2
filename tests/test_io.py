"""File helpers, COCO readers and AUROC: atomic writes, errors that name the file and line."""
from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
from PIL import Image

from fisao import io
from fisao.auroc import auroc
from fisao.coco import load_image, load_instances

# --- atomic writes -------------------------------------------------------------------------


def test_atomic_write_replaces_content_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "sub" / "out.txt"
    io.atomic_write_text(path, "first, and longer\n")
    io.atomic_write_text(path, "second\n")
    assert path.read_text() == "second\n"
    io.atomic_write_bytes(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert os.listdir(path.parent) == ["out.txt"]


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "out.txt"
    io.atomic_write_text(path, "old\n")

    def no_rename(src, dst):
        raise OSError("no space left")

    monkeypatch.setattr(io.os, "replace", no_rename)
    with pytest.raises(OSError, match="no space left"):
        io.atomic_write_text(path, "new\n")
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_json_and_jsonl_round_trip(tmp_path):
    obj = {"a": [1, 2.5, None], "b": {"c": "é"}}
    assert io.read_json(io.write_json(tmp_path / "x.json", obj)) == obj
    rows = [{"i": i} for i in range(3)]
    assert io.read_jsonl(io.write_jsonl(tmp_path / "x.jsonl", rows)) == rows


def test_jsonl_errors_name_file_and_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n{"a": \n')
    with pytest.raises(ValueError, match=rf"^{path}:4: not valid JSON"):
        io.read_jsonl(path)
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(ValueError, match=rf"^{path}:2: expected a JSON object, got list"):
        io.read_jsonl(path)
    path.write_text('{"a": 1}\n\n  \n{"a": 2}\n')
    assert list(io.iter_jsonl(path)) == [(1, {"a": 1}), (4, {"a": 2})]  # blank lines skipped, numbers kept
    with pytest.raises(FileNotFoundError, match="missing.jsonl does not exist"):
        io.read_jsonl(tmp_path / "missing.jsonl")


def test_read_json_errors(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{\n  "a": 1,\n}\n')
    with pytest.raises(ValueError, match=rf"^{path}:3: not valid JSON"):
        io.read_json(path)
    with pytest.raises(FileNotFoundError, match="nope.json does not exist"):
        io.read_json(tmp_path / "nope.json")


def test_atomic_dir_replaces_on_success_and_cleans_up_on_error(tmp_path):
    target = tmp_path / "d"
    with io.atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("1")
    (target / "old.txt").write_text("stale")
    with io.atomic_dir(target) as tmp:
        assert not target.joinpath("b.txt").exists()
        (tmp / "b.txt").write_text("2")
    assert sorted(os.listdir(target)) == ["b.txt"]
    with pytest.raises(RuntimeError, match="halfway"):
        with io.atomic_dir(target) as tmp:
            (tmp / "c.txt").write_text("3")
            raise RuntimeError("halfway")
    assert sorted(os.listdir(target)) == ["b.txt"]
    assert os.listdir(tmp_path) == ["d"]


def test_tree_digest_sees_content_and_names(tmp_path):
    root = tmp_path / "ckpt"
    (root / "sub").mkdir(parents=True)
    (root / "a.bin").write_bytes(b"x")
    (root / "sub" / "b.bin").write_bytes(b"y")
    d0 = io.tree_digest(root)
    assert io.tree_digest(root) == d0
    (root / "a.bin").write_bytes(b"z")
    d1 = io.tree_digest(root)
    (root / "a.bin").rename(root / "c.bin")
    assert len({d0, d1, io.tree_digest(root)}) == 3
    assert io.file_digest(root / "c.bin", "md5") == "fbade9e36a3f36d3d676c1b808451dd7"  # md5(b"z")
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        io.tree_digest(tmp_path / "none")


# --- COCO ----------------------------------------------------------------------------------


def instances(annotations: list[dict]) -> dict:
    return {
        "images": [{"id": 1, "file_name": "1.png"}, {"id": 2, "file_name": "2.png"}],
        "annotations": annotations,
        "categories": [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}],
    }


def test_load_instances(tmp_path):
    path = io.write_json(tmp_path / "i.json", instances([
        {"id": 1, "image_id": 1, "category_id": 2}, {"id": 2, "image_id": 1, "category_id": 2},
        {"id": 3, "image_id": 1, "category_id": 1},
    ]))
    inst = load_instances(path)
    assert inst.file_names == {1: "1.png", 2: "2.png"}
    assert inst.objects == {1: ["square", "square", "circle"], 2: []}
    assert inst.present(1) == {"circle", "square"} and inst.present(2) == set() and inst.present(3) == set()


@pytest.mark.parametrize("annotation,message", [
    ({"id": 7, "image_id": 5, "category_id": 1}, r"annotation #1 \(id 7\) refers to unknown image id 5"),
    ({"id": 8, "image_id": 2, "category_id": 9}, r"annotation #1 \(id 8\) has unknown category id 9"),
    ({"id": 9, "image_id": 2}, "KeyError: 'category_id'"),
])
def test_load_instances_names_bad_annotations(tmp_path, annotation, message):
    path = io.write_json(tmp_path / "i.json", instances([{"id": 1, "image_id": 1, "category_id": 1}, annotation]))
    with pytest.raises(ValueError, match=message) as e:
        load_instances(path)
    assert str(e.value).startswith(f"{path} is not a COCO instances file")


def test_load_instances_without_sections(tmp_path):
    path = io.write_json(tmp_path / "i.json", {"images": []})
    with pytest.raises(ValueError, match="it needs 'images'"):
        load_instances(path)


def test_load_image(tmp_path):
    path = tmp_path / "ok.png"
    Image.new("RGBA", (8, 6), (10, 20, 30, 255)).save(path)
    im = load_image(path)
    assert im.mode == "RGB" and im.size == (8, 6) and im.getpixel((3, 3)) == (10, 20, 30)

    with pytest.raises(FileNotFoundError, match=f"image {tmp_path / 'gone.png'} does not exist"):
        load_image(tmp_path / "gone.png")

    noisy = tmp_path / "noisy.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(noisy)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(noisy.read_bytes()[: noisy.stat().st_size // 2])
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not a png at all" * 10)
    for bad in (truncated, garbage):
        with pytest.raises(ValueError, match=f"image {bad} cannot be read"):
            load_image(bad)


# --- AUROC ---------------------------------------------------------------------------------


def naive_auroc(scores, labels) -> float:
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(6))
def test_auroc_matches_pairwise_counting_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 300))
    scores = rng.integers(0, 1 + seed * 3, n) / 4.0  # few distinct values: many ties
    labels = rng.random(n) < 0.4
    labels[:2] = [True, False]
    assert auroc(scores, labels) == pytest.approx(naive_auroc(scores, labels), abs=1e-12)
    scores = rng.normal(size=n) + labels  # continuous, shifted positives
    assert auroc(scores, labels) == pytest.approx(naive_auroc(scores, labels), abs=1e-12)


def test_auroc_by_hand():
    assert auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert auroc([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0]) == 0.0
    assert auroc([0.5] * 5, [1, 0, 1, 0, 0]) == 0.5
    # Positives 0.35 and 0.8 against negatives 0.1 and 0.4: 3 of 4 pairs won.
    assert auroc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == 0.75
    # One tie (0.4 vs 0.4) counts one half: (1 + 0.5 + 1 + 1) / 4.
    assert auroc(np.array([[0.1, 0.4], [0.4, 0.8]]), np.array([[0, 0], [1, 1]])) == 0.875


def test_auroc_errors():
    with pytest.raises(ValueError, match="needs positives and negatives, got 3 and 0"):
        auroc([0.1, 0.2, 0.3], [1, 1, 1])
    with pytest.raises(ValueError, match="needs positives and negatives, got 0 and 0"):
        auroc([], [])
    with pytest.raises(ValueError, match="differ in length"):
        auroc([0.1, 0.2], [1, 0, 1])
    with pytest.raises(ValueError, match=r"finite scores; 1 are not \(first at index 1: nan\)"):
        auroc([0.1, float("nan"), 0.3], [1, 0, 0])


def test_leftovers_of_interrupted_writes_are_found_and_removed_but_nothing_else(tmp_path):
    from fisao.io import atomic_dir, remove_temp_siblings, temp_siblings

    target = tmp_path / "abc"
    (tmp_path / ".abc.tmp-1234abcd").mkdir()  # what a kill inside atomic_dir leaves
    (tmp_path / ".abc.tmp-1234abcd" / "model.safetensors").write_bytes(b"half")
    (tmp_path / ".abc.old-1234abcd").mkdir()  # killed between the two renames of a replacement
    (tmp_path / ".abc.lock").write_text("")
    (tmp_path / ".abcd.tmp-00000000").mkdir()  # another target's
    assert [p.name for p in temp_siblings(target)] == [".abc.old-1234abcd", ".abc.tmp-1234abcd"]
    remove_temp_siblings(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".abc.lock", ".abcd.tmp-00000000"]
    with atomic_dir(target) as tmp:
        (tmp / "f").write_text("x")
    assert (target / "f").read_text() == "x" and temp_siblings(target) == []
