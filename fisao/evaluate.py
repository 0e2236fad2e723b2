"""Evaluate a model on CHAIR, POPE and MME, on the world's splits or on COCO-layout data.

Data layouts understood by `eval_data`:
- a world directory (has `world.json`; or a directory holding `world/`): the split's
  `images/`, `instances.json`, `pope_{random,popular,adversarial}.jsonl`, and `vocab.txt`;
- COCO layout: `val2014/` (or `images/`), `annotations/instances_val2014.json` (or one
  `instances*.json`), optional `annotations/captions_val2014.json` (reference captions add to
  CHAIR's ground truth, as the original does), POPE files named `*pope_<strategy>.json[l]`
  anywhere under `pope/` or the root (else the official files shipped in
  fisao/benchmarks/data/pope/), the COCO-80 vocabulary;
- either may hold `mme/`: the eval-tool question lists `<subtask>.txt` (image, question,
  answer) with images in `mme/<subtask>/` or `mme/<subtask>/images/`.

CHAIR asks every selected image for a description (greedy, the configured prompt) and scores
the mentions; POPE asks each question as written (on COCO all of a file's questions, as
the POPE protocol; on the world those of the selected images). Selection: the whole split, or `limit`
images (the first ones for the world; a seeded random sample for COCO, as the usual protocol
of 500 random val2014 images).
"""
from __future__ import annotations

import random
from importlib import resources
from dataclasses import dataclass, field
from pathlib import Path

from fisao import io
from fisao.benchmarks.chair import chair, ground_truth_objects
from fisao.benchmarks.mme import MmeItem, attach_answers, mme, read_mme_questions, write_mme_dir
from fisao.benchmarks.pope import pope
from fisao.benchmarks.vocab import Vocabulary
from fisao.coco import Instances, load_captions, load_image, load_instances
from fisao.config import EvalConfig
from fisao.generate import answer, load_policy
from fisao.runtime import load_runtime_policy
from fisao.world.causes import hallucinations_by_cause, world_facts
from fisao.world.pope import STRATEGIES


@dataclass(frozen=True)
class EvalData:
    name: str
    images_dir: Path
    instances: Path
    vocab_file: Path | None  # None: COCO-80
    pope: dict[str, Path] = field(default_factory=dict)
    references: Path | None = None
    mme_dir: Path | None = None
    random_selection: bool = False
    world: tuple[Path, str] | None = None  # (world directory, split) on the shapes world, which knows hallucinations' causes

    def vocabulary(self) -> Vocabulary:
        return Vocabulary.from_file(self.vocab_file) if self.vocab_file else Vocabulary.coco()


def _world(root: Path, split: str) -> EvalData:
    d = root / split
    if not d.is_dir():
        raise FileNotFoundError(f"{root} is a world but has no split {split!r}")
    mme_dir = root / "mme" if (root / "mme").is_dir() else None
    return EvalData(f"world:{split}", d / "images", d / "instances.json", root / "vocab.txt",
                    {s: d / f"pope_{s}.jsonl" for s in STRATEGIES if (d / f"pope_{s}.jsonl").is_file()},
                    mme_dir=mme_dir, world=(root, split))


def _one(paths: list[Path], what: str, root: Path) -> Path | None:
    if len(paths) > 1:
        raise ValueError(f"{root}: several {what} files ({', '.join(map(str, paths))}); keep one")
    return paths[0] if paths else None


def _coco(root: Path) -> EvalData:
    images = next((root / d for d in ("val2014", "images") if (root / d).is_dir()), None)
    if images is None:
        raise FileNotFoundError(f"{root}: no val2014/ or images/ directory of COCO images")
    instances = (root / "annotations" / "instances_val2014.json")
    if not instances.is_file():
        instances = _one(sorted(root.glob("**/instances*.json")), "instances", root)
    if instances is None:
        raise FileNotFoundError(f"{root}: no instances JSON (expected annotations/instances_val2014.json)")
    refs = root / "annotations" / "captions_val2014.json"
    pope_files = {}
    for s in STRATEGIES:
        found = _one(sorted(p for p in root.glob(f"**/*pope_{s}.json*") if p.is_file()), f"POPE {s}", root)
        pope_files[s] = found or shipped_pope(s)
    return EvalData("coco", images, instances, None, pope_files, refs if refs.is_file() else None,
                    root / "mme" if (root / "mme").is_dir() else None, random_selection=True)


def shipped_pope(strategy: str) -> Path:
    """The official POPE COCO file of `strategy` shipped with fisao (RUCAIBox/POPE, MIT; see its LICENSE)."""
    return Path(str(resources.files("fisao.benchmarks").joinpath("data", "pope", f"coco_pope_{strategy}.json")))


def eval_data(data: str | Path, split: str = "test") -> EvalData:
    """Find the benchmark files in `data` (see the module docstring for the layouts)."""
    root = Path(data)
    if not root.is_dir():
        raise FileNotFoundError(f"evaluation data {root} is not a directory")
    if (root / "world.json").is_file():
        return _world(root, split)
    if (root / "world" / "world.json").is_file():
        return _world(root / "world", split)
    return _coco(root)


def select_images(inst: Instances, limit: int | None, seeded_random: bool, seed: int = 0) -> list[int]:
    ids = sorted(inst.file_names)
    if limit is None or limit >= len(ids):
        return ids
    return sorted(random.Random(seed).sample(ids, limit)) if seeded_random else ids[:limit]


class _Images:
    """Load each image once."""

    def __init__(self, root: Path):
        self.root, self.cache = root, {}

    def __call__(self, name: str):
        if name not in self.cache:
            self.cache[name] = load_image(self.root / name)
        return self.cache[name]


def run_chair(model, processor, data: EvalData, cfg: EvalConfig, out: Path, progress: bool) -> dict:
    inst = load_instances(data.instances)
    vocab = data.vocabulary()
    ids = select_images(inst, cfg.limit, data.random_selection, cfg.seed)
    images = _Images(data.images_dir)
    captions = answer(model, processor, [images(inst.file_names[i]) for i in ids], [cfg.caption_prompt] * len(ids),
                      max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, progress=progress, desc="CHAIR captions")
    references = load_captions(data.references) if data.references else None
    truth = ground_truth_objects({i: inst.objects[i] for i in ids}, vocab, references)
    result = chair(list(zip(ids, captions)), truth, vocab)
    io.write_jsonl(out / "captions.jsonl", ({"image_id": i, "caption": c} for i, c in zip(ids, captions)))
    io.write_jsonl(out / "chair_details.jsonl", (d.to_json() for d in result.details))
    m = result.metrics
    figures = {"chair_s": m["chair_s"], "chair_i": m["chair_i"], "recall": m["recall"], "len": m["len"], "glued": m["glued"],
               "looped": m["looped"], "chair_n_captions": m["n_captions"], "chair_n_mentions": m["n_mentions"]}
    known = world_facts(*data.world) if data.world else None  # why each hallucinated shape was named
    if known:
        figures.update(hallucinations_by_cause(((d.image_id, [x.category for x in d.mentions]) for d in result.details
                                                if d.skipped is None), *known))
    return figures


def run_pope(model, processor, data: EvalData, cfg: EvalConfig, out: Path, progress: bool) -> dict:
    if not data.pope:
        raise FileNotFoundError(f"{data.name}: no POPE question files found")
    images = _Images(data.images_dir)
    keep = None
    if not data.random_selection:  # the world: the evaluated images; COCO: every question, as POPE's protocol
        inst = load_instances(data.instances)
        keep = {inst.file_names[i] for i in select_images(inst, cfg.limit, data.random_selection, cfg.seed)}
    asked = {}
    for strategy, path in data.pope.items():
        rows = [r for r in io.read_jsonl(path) if keep is None or r["image"] in keep]
        missing = sorted({r["image"] for r in rows if not (data.images_dir / r["image"]).is_file()})
        if missing:
            raise FileNotFoundError(f"POPE {strategy} ({path}) asks about {len(missing)} images missing from "
                                    f"{data.images_dir}, e.g. {missing[0]}: put all of COCO val2014 there")
        asked[strategy] = rows
    # The three strategies share their positive questions (same image, same object): each distinct
    # (image, question) is asked once and its answer given to every file that asks it (on the world's
    # test split, 3,253 distinct of 6,894).
    distinct = list(dict.fromkeys((r["image"], r["text"]) for rows in asked.values() for r in rows))
    texts = answer(model, processor, [images(image) for image, _ in distinct], [text for _, text in distinct],
                   max_new_tokens=cfg.pope_max_new_tokens, batch_size=cfg.batch_size, progress=progress,
                   desc="POPE")
    said = dict(zip(distinct, texts))
    metrics = {}
    for strategy, rows in asked.items():
        answers = {r["question_id"]: said[(r["image"], r["text"])] for r in rows}
        io.write_jsonl(out / f"pope_{strategy}_answers.jsonl",
                       ({"question_id": r["question_id"], "text": answers[r["question_id"]]} for r in rows))
        scores = pope({r["question_id"]: r["label"] for r in rows}, answers)
        for key in ("accuracy", "precision", "recall", "f1", "yes_ratio", "n_unclear"):
            metrics[f"pope_{strategy}_{key}"] = scores[key]
    return metrics


def _mme_image(mme_dir: Path, subtask: str, image: str) -> Path:
    for cand in (mme_dir / subtask / image, mme_dir / subtask / "images" / image):
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"MME image {image!r} of {subtask} not found under {mme_dir / subtask}")


def run_mme(model, processor, data: EvalData, cfg: EvalConfig, out: Path, progress: bool) -> dict:
    if data.mme_dir is None:
        raise FileNotFoundError(f"{data.name}: no mme/ directory with MME question lists")
    questions = read_mme_questions(data.mme_dir)
    flat: list[tuple[str, MmeItem]] = [(s, it) for s, items in questions.items() for it in items]
    texts = answer(model, processor, [load_image(_mme_image(data.mme_dir, s, it.image)) for s, it in flat],
                   [it.question for _, it in flat], max_new_tokens=cfg.pope_max_new_tokens,
                   batch_size=cfg.batch_size, progress=progress, desc="MME")
    results = attach_answers(questions, {(s, it.image, it.question): t for (s, it), t in zip(flat, texts)})
    write_mme_dir(out / "mme", results)
    scores = mme(results)
    return {f"mme_{k}".replace("/", "_"): v for k, v in scores.items()}


RUNNERS = {"chair": run_chair, "pope": run_pope, "mme": run_mme}


def evaluate_model(model_dir: str | Path, data: str | Path, benchmarks: tuple[str, ...], cfg: EvalConfig,
                   out: str | Path, progress: bool = True, trust_remote_code: bool = False, runtime=None) -> dict:
    """Run `benchmarks` for the model in `model_dir`; write answers and details to `out`; return metrics."""
    unknown = [b for b in benchmarks if b not in RUNNERS]
    if unknown:
        raise ValueError(f"unknown benchmarks {unknown}; choose from {list(RUNNERS)}")
    where = eval_data(data, cfg.split)
    model, processor = load_runtime_policy(model_dir, runtime) if runtime else load_policy(model_dir, trust_remote_code=trust_remote_code)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metrics: dict = {}
    for name in benchmarks:
        metrics.update(RUNNERS[name](model, processor, where, cfg, out, progress))
    io.write_json(out / "metrics.json", {"model": str(model_dir), "data": where.name, "metrics": metrics})
    return metrics
