"""Write the shapes world to disk: images, COCO instances, captions, questions, POPE files.

Layout (one directory per split)::

    world.json  vocab.txt
    {train,val,test,pretrain}/images/000001.png
                    /instances.json      COCO instances: images, annotations, categories
                    /captions.jsonl      {"image_id", "caption"}, several per image
                    /questions.jsonl     {"image_id", "question", "answer"} yes/no training questions
                    /pope_{random,popular,adversarial}.jsonl   official POPE format
    (pretrain, the CLIP's split, has images, instances and captions only; absent when its size is 0)

The same config (seed included) gives byte-identical files: every random stream is seeded by
(seed, split, purpose), so changing one part (say, caption templates) leaves the others alone.
The directory is built beside its target and renamed into place.
"""
from __future__ import annotations

import json
import random
from pathlib import Path


from fisao import io
from fisao.progress import bar as progress_bar
from fisao.world.config import SPLITS, WorldConfig, config_of_record
from fisao.world.pope import STRATEGIES, class_statistics, pope_questions
from fisao.world.render import Scene, render
from fisao.world.scenes import sample_scene
from fisao.world.target import check_fits
from fisao.world.text import caption, questions, vocabulary_lines

CAPTIONS_PER_IMAGE = 3


def _rng(cfg: WorldConfig, split: str, purpose: str) -> random.Random:
    return random.Random(f"fisao-world/{cfg.seed}/{split}/{purpose}")


PRETRAIN = "pretrain"


def sample_split(cfg: WorldConfig, split: str, progress: bool = False) -> list[Scene]:
    rng, hard = _rng(cfg, split, "scenes"), _rng(cfg, split, "hardness")
    n, p = (cfg.pretrain_size, cfg.pretrain_cooccurrence) if split == PRETRAIN else (cfg.sizes[split], cfg.cooccurrence[split])
    return [sample_scene(rng, cfg, p, hard) for _ in progress_bar(range(n), f"scenes {split}", progress)]


def instances(cfg: WorldConfig, scenes: list[Scene], split: str) -> dict:
    """COCO instances for a split (category ids follow `cfg.classes`, from 1)."""
    cat_id = {c: i + 1 for i, c in enumerate(cfg.classes)}
    images, annotations = [], []
    for image_id, scene in enumerate(scenes, start=1):
        images.append({"id": image_id, "file_name": f"{image_id:06d}.png", "width": cfg.canvas, "height": cfg.canvas})
        for obj in scene.objects:
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": cat_id[obj.shape],
                "bbox": list(obj.bbox), "area": obj.size * obj.size, "iscrowd": 0, "color": obj.colour,
            })
    return {
        "info": {"description": f"fisao shapes world, {split} split", "seed": cfg.seed},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": c, "supercategory": "shape"} for c, i in cat_id.items()],
    }


def write_split(out: Path, cfg: WorldConfig, split: str, scenes: list[Scene], train_stats, progress: bool) -> None:
    (out / "images").mkdir(parents=True)
    for image_id, scene in enumerate(progress_bar(scenes, f"world {split}", progress), start=1):
        render(scene, cfg.canvas).save(out / "images" / f"{image_id:06d}.png", format="PNG")
    io.write_json(out / "instances.json", instances(cfg, scenes, split), indent=None)

    rng = _rng(cfg, split, "captions")
    io.write_jsonl(out / "captions.jsonl", (
        {"image_id": i, "caption": caption(rng, s, cfg)}
        for i, s in enumerate(scenes, start=1) for _ in range(CAPTIONS_PER_IMAGE)
    ))
    if split == PRETRAIN:
        return
    rng = _rng(cfg, split, "questions")
    io.write_jsonl(out / "questions.jsonl", (
        {"image_id": i, "question": q, "answer": a}
        for i, s in enumerate(scenes, start=1) for q, a in questions(rng, s, cfg)
    ))
    files = [(f"{i:06d}.png", s.classes) for i, s in enumerate(scenes, start=1)]
    freq, cooc = train_stats
    for strategy in STRATEGIES:
        rows = pope_questions(files, strategy, cfg.classes, _rng(cfg, split, f"pope-{strategy}"), freq, cooc)
        io.write_jsonl(out / f"pope_{strategy}.jsonl", rows)


def world_json_bytes(cfg: WorldConfig) -> bytes:
    """The exact bytes of a world's `world.json` (so a recorded world can be recognised by its md5)."""
    return (json.dumps({"config": world_record(cfg), "format": 1}, indent=2) + "\n").encode("utf-8")


def build_world(out: str | Path, cfg: WorldConfig, progress: bool = True) -> Path:
    """Generate the whole world into `out` (replacing it atomically) and return `out`.

    Refuses (ValueError, before anything is written) a world too large for the disk or memory."""
    out = Path(out)
    check_fits(out.parent, cfg)
    splits = SPLITS + ((PRETRAIN,) if cfg.pretrain_size else ())
    scenes = {split: sample_split(cfg, split, progress) for split in splits}
    train_stats = class_statistics([s.classes for s in scenes["train"]])
    with io.atomic_dir(out) as tmp:
        io.atomic_write_bytes(tmp / "world.json", world_json_bytes(cfg))
        io.atomic_write_text(tmp / "vocab.txt", "\n".join(vocabulary_lines(cfg)) + "\n")
        for split in splits:
            write_split(tmp / split, cfg, split, scenes[split], train_stats, progress)
    return out


def world_record(cfg: WorldConfig) -> dict:
    """What world.json records of the config: all of it, less `hardness` when it is off (so a world
    built before the hardness options existed is byte-identical to one built now)."""
    return cfg.model_dump(mode="json", exclude=None if cfg.hardness.active else {"hardness"})


def read_world_config(world_dir: str | Path) -> WorldConfig:
    """The config a world directory was built with (from its world.json)."""
    meta = io.read_json(Path(world_dir) / "world.json")
    try:
        return config_of_record(meta["config"])
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{Path(world_dir) / 'world.json'} does not describe a world: {e}") from e
