"""A COCO-layout fixture the tiny models can see: the shapes world under COCO's names and formats.

Random tiny models cannot be calibrated (their verifier does not separate correct from
hallucinated mentions, and calibration refuses them), so the campaign on COCO needs images a tiny
CLIP can learn. This builds the shapes world, renames its eight shapes to eight COCO categories
(a circle is a "clock", a square a "book", ...) and writes it in the layout users have:

    train2014/COCO_train2014_<id>.jpg        world train (the pair prior) and pretrain images
    val2014/COCO_val2014_<id>.jpg            world val and test images (a weak prior)
    annotations/instances_{train,val}2014.json, captions_{train,val}2014.json   COCO's formats, COCO's ids
    pope/coco_pope_{random,popular,adversarial}.json                          the world's POPE questions

Then a tiny `CLIPModel` is trained on the pretrain images and a tiny `LlavaForConditionalGeneration`
on its vision tower with the train captions and yes/no questions, as fisao/models/build.py trains
the world's (the same functions, fed COCO-named examples). The LLaVA learnt the pair prior, so on
val2014 it names absent partners: real hallucinations the verifier has to catch.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from transformers import LlavaProcessor

from fisao import io
from fisao.coco import load_image
from fisao.config import ClipBuildConfig, LlavaBuildConfig
from fisao.models.build import tokenizer_corpus
from fisao.models.clip import name_prompts, save_clip, train_clip
from fisao.models.llava import CHAT_TEMPLATE, llava_from_clip, save_llava, train_llava
from fisao.models.tokenizer import train_bpe, wrap
from fisao.world.build import PRETRAIN, build_world
from fisao.world.config import CRISP, WorldConfig
from fisao.world.data import Example, load_split
from fisao.world.text import plural

# Shape -> (COCO category, its official COCO id). Single words with a regular plural, none a
# colour or a word of the world's caption templates (a test checks the parser finds only these).
COCO_NAMES = {"circle": ("clock", 85), "square": ("book", 84), "triangle": ("kite", 38), "star": ("cake", 61),
              "heart": ("cup", 47), "cross": ("vase", 86), "diamond": ("bowl", 51), "moon": ("banana", 52)}
# World split -> (COCO folder, id offset): train2014 holds the rollout images, val2014 the labelled ones.
SPLITS = {"train": ("train", 100_000), PRETRAIN: ("train", 200_000), "val": ("val", 300_000), "test": ("val", 400_000)}

# Four shapes in two co-occurring pairs on a 32-pixel canvas (four 16-pixel cells, one vision token
# each): small enough for a CLIP to learn in seconds (measured: object-name AUROC ~0.9 on val).
WORLD = WorldConfig(classes=("circle", "square", "star", "moon"), pairs=(("circle", "square"), ("star", "moon")),
                    canvas=32, max_objects=3, sizes={"train": 64, "val": 24, "test": 16}, pretrain_size=256,
                    synonyms={}, synonym_prob=0.0, hardness=CRISP, cooccurrence={"train": 0.95, "val": 0.3, "test": 0.3})
# Settings of their own, not the demo's defaults (a hard world, a CLIP stopped at a target AUROC, the
# demo LLaVA's learning rate): this fixture needs a policy that names objects, half of them absent.
CLIP = ClipBuildConfig(steps=300, batch_size=32, width=64, layers=2, text_width=64, text_layers=1, projection_dim=32,
                       vocab_size=400, caption_batch_size=8, target_auroc=None)
LLAVA = LlavaBuildConfig(steps=80, batch_size=16, lr=2e-3, loss_mean="token")

_WORD = {**{s: c for s, (c, _) in COCO_NAMES.items()}, **{plural(s): plural(c) for s, (c, _) in COCO_NAMES.items()}}
_WORD_RE = re.compile(r"\b(" + "|".join(sorted(_WORD, key=len, reverse=True)) + r")\b")


def rename(text: str) -> str:
    """World text with every shape word (singular or plural) replaced by its COCO name."""
    return _WORD_RE.sub(lambda m: _WORD[m.group(1)], text)


def file_name(folder: str, image_id: int) -> str:
    return f"COCO_{folder}2014_{image_id:012d}.jpg"


@dataclass(frozen=True)
class Names:
    """What CLIP training reads of a world (classes, synonyms, canvas), with COCO's names."""

    classes: tuple[str, ...]
    canvas: int
    synonyms: dict[str, tuple[str, ...]] = field(default_factory=dict)


def _as_coco(world: Path, root: Path) -> dict[str, list[Example]]:
    """Write the world's splits in COCO's layout under `root`; return each split's examples, renamed."""
    out: dict[str, list[Example]] = {}
    files: dict[str, dict] = {f: {"images": [], "annotations": [], "captions": []} for f in ("train", "val")}
    for split, (folder, offset) in SPLITS.items():
        (root / f"{folder}2014").mkdir(parents=True, exist_ok=True)
        examples = []
        for e in load_split(world, split):
            image_id = offset + e.image_id
            path = root / f"{folder}2014" / file_name(folder, image_id)
            load_image(e.image).save(path, quality=95)
            data = files[folder]
            data["images"].append({"id": image_id, "file_name": path.name, "width": WORLD.canvas, "height": WORLD.canvas})
            for obj in e.objects:
                data["annotations"].append({"id": len(data["annotations"]) + 1, "image_id": image_id,
                                            "category_id": COCO_NAMES[obj][1], "bbox": [0, 0, 1, 1], "area": 1.0,
                                            "iscrowd": 0})
            for c in e.captions:
                data["captions"].append({"id": len(data["captions"]) + 1, "image_id": image_id, "caption": rename(c)})
            examples.append(Example(image_id, path, tuple(COCO_NAMES[o][0] for o in e.objects),
                                    tuple(map(rename, e.captions)), tuple((rename(q), rename(a)) for q, a in e.questions)))
        out[split] = examples
    (root / "annotations").mkdir(exist_ok=True)
    categories = [{"id": COCO_NAMES[s][1], "name": COCO_NAMES[s][0], "supercategory": "object"} for s in WORLD.classes]
    for folder, data in files.items():
        io.write_json(root / "annotations" / f"instances_{folder}2014.json",
                      {"images": data["images"], "annotations": data["annotations"], "categories": categories})
        io.write_json(root / "annotations" / f"captions_{folder}2014.json",
                      {"images": data["images"], "annotations": data["captions"]})
    (root / "pope").mkdir(exist_ok=True)
    for strategy in ("random", "popular", "adversarial"):
        rows = []
        for split in ("val", "test"):
            offset = SPLITS[split][1]
            for r in io.read_jsonl(world / split / f"pope_{strategy}.jsonl"):
                rows.append({"question_id": len(rows) + 1, "image": file_name("val", offset + int(r["image"][:-4])),
                             "text": rename(r["text"]), "label": r["label"]})
        (root / "pope" / f"coco_pope_{strategy}.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def build_coco_world(root: Path) -> dict[str, Path]:
    """{"coco", "clip", "llava", "world"}: the COCO-layout directory and the models trained on it."""
    world = build_world(root / "world", WORLD, progress=False)
    examples = _as_coco(world, root / "coco")
    names = Names(tuple(COCO_NAMES[c][0] for c in WORLD.classes), WORLD.canvas)
    prompts, _ = name_prompts(names)
    bpe = train_bpe(tokenizer_corpus(examples["train"] + examples[PRETRAIN], prompts), CLIP.vocab_size)
    clip, clip_processor, _ = train_clip(examples[PRETRAIN], examples["val"], names, CLIP, wrap(bpe, "clip"),
                                         progress=False)
    save_clip(clip, clip_processor, root / "clip")
    tokenizer = wrap(bpe, "llava")
    tokenizer.padding_side = "left"
    processor = LlavaProcessor(image_processor=clip_processor.image_processor, tokenizer=tokenizer,
                               patch_size=CLIP.patch_size, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
    llava = llava_from_clip(clip, LLAVA, tokenizer)
    train_llava(llava, processor, examples["train"], LLAVA, progress=False)
    save_llava(llava, processor, root / "llava")
    return {"coco": root / "coco", "clip": root / "clip", "llava": root / "llava", "world": world}
