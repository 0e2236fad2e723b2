"""The images (and, where known, objects) a campaign reads: from the shapes world or from COCO.

`load_examples(data_dir, split)` is what the FiSAO stages call; the layout decides the source:
- a world directory (`world.json`): `fisao.world.data.load_split`, unchanged;
- a COCO directory as users have it:

      train2014/COCO_train2014_000000000009.jpg ...     rollout images (split "train")
      val2014/COCO_val2014_000000000042.jpg ...         calibration and CHAIR (split "val")
      annotations/instances_val2014.json                ground truth of val2014 (required for "val")
      annotations/captions_val2014.json                 reference captions (optional; add to CHAIR's truth)
      annotations/instances_train2014.json              optional: only for the audit of rollout mentions

  Rollouts need images only (FiSAO never uses ground truth in the reward), so train2014 without
  annotations is fine: its examples have `objects=None` and the audit says "unknown". Image ids
  come from the instances file, or from the file names (`COCO_train2014_<12-digit id>.jpg`).

The vocabulary is the world's `vocab.txt`, or the COCO-80 synonyms of the CHAIR authors.
"""
from __future__ import annotations

import re
from pathlib import Path

from fisao import io
from fisao.benchmarks.vocab import Vocabulary
from fisao.coco import load_captions, load_instances
from fisao.world.data import Example, load_split

COCO_SPLITS = {"train": "train2014", "val": "val2014", "test": "val2014"}
NAME_RE = re.compile(r"^COCO_(?:train|val)2014_(\d{12})\.jpg$")


def is_world(data_dir: str | Path) -> bool:
    return (Path(data_dir) / "world.json").is_file()


def data_vocabulary(data_dir: str | Path) -> Vocabulary:
    """The object vocabulary of a data directory (world: its vocab.txt; COCO: COCO-80)."""
    return Vocabulary.from_file(Path(data_dir) / "vocab.txt") if is_world(data_dir) else Vocabulary.coco()


def coco_references(root: str | Path, split: str = "val") -> dict[int, list[str]]:
    """Reference captions of a COCO split by image id ({} when the captions file is absent)."""
    path = Path(root) / "annotations" / f"captions_{COCO_SPLITS[split]}.json"
    return load_captions(path) if path.is_file() else {}


def coco_examples(root: str | Path, split: str, limit: int | None = None, need_objects: bool = False) -> list[Example]:
    """Examples of a COCO split, sorted by image id; `objects` None where no instances file exists."""
    root = Path(root)
    if split not in COCO_SPLITS:
        raise ValueError(f"COCO has splits {sorted(COCO_SPLITS)}, not {split!r} (the world's 'pretrain' split "
                         "does not exist on COCO: set rollout.split: train)")
    folder = root / COCO_SPLITS[split]
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist: put the COCO {COCO_SPLITS[split]} images there "
                                f"(see docs/real-models.md, 'Data to prepare')")
    instances = root / "annotations" / f"instances_{COCO_SPLITS[split]}.json"
    if instances.is_file():
        inst = load_instances(instances)
        refs = coco_references(root, split)
        ids = sorted(inst.file_names)[:limit]
        return [Example(i, folder / inst.file_names[i], tuple(inst.objects[i]), tuple(refs.get(i, ())), ()) for i in ids]
    if need_objects:
        raise FileNotFoundError(f"{instances} does not exist: calibration needs the ground truth of {COCO_SPLITS[split]}")
    files = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := NAME_RE.match(p.name)))
    if not files:
        raise FileNotFoundError(f"{folder} holds no COCO_{COCO_SPLITS[split]}_<id>.jpg images")
    return [Example(i, p, None, (), ()) for i, p in files[:limit]]  # type: ignore[arg-type]


def example_truth(data_dir: str | Path, examples: list[Example], vocab: Vocabulary) -> list[set[str] | None]:
    """Ground-truth categories of each example (None where unknown).

    World: the classes of its objects, as they always were. COCO: the canonical categories of
    its instances plus every object its reference captions mention, as CHAIR counts them.
    """
    if is_world(data_dir):
        return [set(e.objects) for e in examples]
    from fisao.benchmarks.chair import ground_truth_objects

    known = [e for e in examples if e.objects is not None]
    truth = ground_truth_objects({e.image_id: e.objects for e in known}, vocab, {e.image_id: e.captions for e in known})
    return [truth.get(e.image_id) if e.objects is not None else None for e in examples]


def coco_fingerprint(root: str | Path) -> str:
    """A content id of a COCO directory: DVC's md5 from `<root>.dvc` when the user versioned it
    (`dvc add data/coco`), else the md5 of the annotation files and the list of image names and sizes
    (cheap; a changed image of the same size goes unnoticed: `dvc add` for the real guarantee)."""
    import hashlib

    import yaml

    root = Path(root)
    dvc_file = root.parent / f"{root.name}.dvc"
    if dvc_file.is_file():
        return str(yaml.safe_load(dvc_file.read_text())["outs"][0]["md5"])
    h = hashlib.md5()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            rel = p.relative_to(root).as_posix()
            h.update(f"{rel}\0{p.stat().st_size}\0".encode())
            if p.suffix == ".json":
                h.update(io.file_digest(p, "md5").encode())
    return h.hexdigest() + ".fingerprint"


def load_examples(data_dir: str | Path, split: str, limit: int | None = None, need_objects: bool = False) -> list[Example]:
    """The examples of `split` in a world or COCO directory (see the module docstring)."""
    if is_world(data_dir):
        return load_split(data_dir, split, limit=limit)
    if not Path(data_dir).is_dir():
        raise FileNotFoundError(f"data directory {data_dir} does not exist")
    return coco_examples(data_dir, split, limit, need_objects)
