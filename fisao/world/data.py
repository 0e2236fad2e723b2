"""Load one split of a built world as examples (image path, objects, captions, questions)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fisao import io
from fisao.coco import load_instances


@dataclass(frozen=True)
class Example:
    image_id: int
    image: Path
    objects: tuple[str, ...]  # class of each object in the image (repeats allowed)
    captions: tuple[str, ...]
    questions: tuple[tuple[str, str], ...]  # (question, answer)


def split_dir(world_dir: str | Path, split: str) -> Path:
    d = Path(world_dir) / split
    if not d.is_dir():
        raise FileNotFoundError(
            f"{d} does not exist; build the world with `fisao world build --out {world_dir}`"
        )
    return d


def load_split(world_dir: str | Path, split: str, limit: int | None = None) -> list[Example]:
    """The first `limit` images of a split (all when None), with their texts."""
    d = split_dir(world_dir, split)
    inst = load_instances(d / "instances.json")
    captions: dict[int, list[str]] = {}
    for row in io.read_jsonl(d / "captions.jsonl"):
        captions.setdefault(int(row["image_id"]), []).append(row["caption"])
    questions: dict[int, list[tuple[str, str]]] = {}
    for row in io.read_jsonl(d / "questions.jsonl") if (d / "questions.jsonl").exists() else ():
        questions.setdefault(int(row["image_id"]), []).append((row["question"], row["answer"]))
    ids = sorted(inst.file_names)[:limit]
    return [
        Example(i, d / "images" / inst.file_names[i], tuple(inst.objects[i]),
                tuple(captions.get(i, ())), tuple(questions.get(i, ())))
        for i in ids
    ]
