"""Read COCO-format data: instances files and image folders (the world uses the same layout).

A malformed file stops with its name and what is wrong; a missing or unreadable image stops
with its path. Both the world and real COCO (`instances_val2014.json`, `captions_val2014.json`,
`val2014/`) load here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from fisao import io


@dataclass(frozen=True)
class Instances:
    """What an instances file says: image files, the categories present in each, category names."""

    path: Path
    file_names: dict[int, str]  # image id -> file name
    objects: dict[int, list[str]] = field(repr=False)  # image id -> category names, one per annotation
    categories: dict[int, str] = field(repr=False)  # category id -> name

    def present(self, image_id: int) -> set[str]:
        return set(self.objects.get(image_id, ()))


def load_instances(path: str | Path) -> Instances:
    """Parse a COCO instances JSON (`images`, `annotations`, `categories`)."""
    path = Path(path)
    data = io.read_json(path)
    try:
        categories = {int(c["id"]): str(c["name"]) for c in data["categories"]}
        file_names = {int(im["id"]): str(im["file_name"]) for im in data["images"]}
        objects: dict[int, list[str]] = {i: [] for i in file_names}
        for k, ann in enumerate(data["annotations"]):
            image_id, cat = int(ann["image_id"]), int(ann["category_id"])
            if image_id not in objects:
                raise ValueError(f"annotation #{k} (id {ann.get('id')}) refers to unknown image id {image_id}")
            if cat not in categories:
                raise ValueError(f"annotation #{k} (id {ann.get('id')}) has unknown category id {cat}")
            objects[image_id].append(categories[cat])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(
            f"{path} is not a COCO instances file ({type(e).__name__}: {e}); it needs 'images' "
            "(id, file_name), 'annotations' (image_id, category_id) and 'categories' (id, name)"
        ) from e
    return Instances(path, file_names, objects, categories)


def load_captions(path: str | Path) -> dict[int, list[str]]:
    """Parse a COCO captions JSON (`annotations` with image_id, caption): captions by image id, in file order."""
    captions: dict[int, list[str]] = {}
    try:
        for ann in io.read_json(path)["annotations"]:
            captions.setdefault(int(ann["image_id"]), []).append(str(ann["caption"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(
            f"{path} is not a COCO captions file ({type(e).__name__}: {e}); it needs "
            "'annotations' with 'image_id' and 'caption' (or give a JSONL file)"
        ) from e
    return captions


def load_image(path: str | Path) -> Image.Image:
    """Open an image as RGB; a missing or corrupt file stops with its path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"image {path} cannot be read ({e}); rebuild or re-download it") from e
