"""CHAIR (Rohrbach et al., EMNLP 2018): how many of the objects a caption names are not there.

As in the authors' code (LisaAnne/Hallucination, utils/chair.py), with the recall and length
that later papers report (Maxlinn/CHAIR-metric-standalone, OPERA):
- CHAIR_i = hallucinated mentions / all mentions. Every mention counts: an absent object named
  twice in one caption is two hallucinated mentions.
- CHAIR_s = captions with at least one hallucinated mention / captions.
- recall = ground-truth objects a caption mentions / ground-truth objects, summed over captions
  (each ground-truth category counts once per caption).
- len = mean caption length in words.
- glued = captions holding a word with a token glued onto it ("a green starNo",
  `fisao.benchmarks.mentions.glued_words`) / captions: not the authors', a guard. CHAIR reads such a
  word as unknown, so a policy that glues a token onto an object hides that mention from CHAIR_i.
- looped = captions writing one word four or more times in a row ("a yellow yellow yellow yellow",
  `fisao.benchmarks.mentions.word_loops`) / captions: not the authors', a guard for a policy that
  loops where a name belongs (it shortens no caption and names nothing, so CHAIR alone hides it).
A mention is hallucinated when its category is not in the image's ground truth: the categories
of its instances, plus, when reference captions are given, every object those captions mention
(parsed by the same parser), as the authors do.

Departures, and why:
- Mentions come from `fisao.benchmarks.mentions` (see there for how it differs from the
  authors' tokenizer and singulariser).
- `len` counts words (punctuation excluded). OPERA's `Len` counts nltk tokens including
  punctuation, after joining double words, and divides by 100: the numbers are not comparable.
- Ratios with a zero denominator are 0.0 (the authors' code divides by zero); the counts beside
  them (`n_mentions`, `n_gt_objects`) say when that happened.
- Bad input is counted, not fatal: a caption naming an image id without ground truth
  (`n_unknown_image`) or an empty caption (`n_empty`) is left out of every ratio. If no caption
  is left, there is nothing to score and that is an error.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Hashable, Mapping, Sequence

from fisao import io
from fisao.benchmarks.mentions import Mention, count_words, glued_words, mentioned_categories, parse_mentions, word_loops
from fisao.benchmarks.vocab import Vocabulary
from fisao.coco import load_captions, load_instances

ImageId = Hashable


@dataclass(frozen=True)
class CaptionScore:
    """One caption's verdict. `skipped` is "unknown_image" or "empty" for captions left out."""

    image_id: ImageId
    caption: str
    mentions: tuple[Mention, ...] = ()
    hallucinated: tuple[Mention, ...] = ()
    missed: tuple[str, ...] = ()  # ground-truth categories the caption does not mention
    ground_truth: tuple[str, ...] = ()
    skipped: str | None = None

    def to_json(self) -> dict:
        def spans(ms: tuple[Mention, ...]) -> list[dict]:
            return [{"category": m.category, "text": m.text, "start": m.start, "end": m.end} for m in ms]

        return {
            "image_id": self.image_id, "caption": self.caption, "skipped": self.skipped,
            "mentioned": [m.category for m in self.mentions], "hallucinated": spans(self.hallucinated),
            "missed": list(self.missed), "ground_truth": list(self.ground_truth),
            "mentions": spans(self.mentions),
        }


@dataclass(frozen=True)
class ChairResult:
    metrics: dict[str, float | int]  # chair_s, chair_i, recall, len, counts
    details: list[CaptionScore]  # one per input caption, in input order


def ground_truth_objects(
    objects: Mapping[ImageId, Sequence[str]],
    vocab: Vocabulary,
    references: Mapping[ImageId, Sequence[str]] | None = None,
) -> dict[ImageId, set[str]]:
    """Per image: canonical categories of its instances, plus objects its reference captions mention.

    Every instance name must be a vocabulary name (ValueError otherwise). References of images
    not in `objects` are ignored: they have no instances, so CHAIR cannot score them.
    """
    truth = {image_id: {vocab.canonical(name) for name in names} for image_id, names in objects.items()}
    for image_id, captions in (references or {}).items():
        if image_id in truth:
            for caption in captions:
                truth[image_id].update(mentioned_categories(caption, vocab))
    return truth


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def chair(
    captions: Sequence[tuple[ImageId, str]],
    ground_truth: Mapping[ImageId, set[str] | Sequence[str]],
    vocab: Vocabulary,
) -> ChairResult:
    """Score (image id, caption) pairs against per-image ground-truth categories.

    Ground-truth names may be synonyms (they are mapped to their category); build them with
    `ground_truth_objects` to add reference-caption objects.
    """
    truth = {k: {vocab.canonical(n) for n in names} for k, names in ground_truth.items()}
    details: list[CaptionScore] = []
    n_unknown = n_empty = n_scored = n_mentions = n_halluc = n_halluc_caps = 0
    n_gt = n_recalled = n_words = n_glued = n_looped = 0
    for image_id, caption in captions:
        if image_id not in truth:
            n_unknown += 1
            details.append(CaptionScore(image_id, caption, skipped="unknown_image"))
            continue
        if not caption.strip():
            n_empty += 1
            details.append(CaptionScore(image_id, caption, skipped="empty"))
            continue
        gt = truth[image_id]
        mentions = tuple(parse_mentions(caption, vocab))
        hallucinated = tuple(m for m in mentions if m.category not in gt)
        named = {m.category for m in mentions}
        n_scored += 1
        n_words += count_words(caption)
        n_glued += bool(glued_words(caption))
        n_looped += bool(word_loops(caption))
        n_mentions += len(mentions)
        n_halluc += len(hallucinated)
        n_halluc_caps += bool(hallucinated)
        n_gt += len(gt)
        n_recalled += len(gt & named)
        details.append(CaptionScore(
            image_id, caption, mentions, hallucinated,
            missed=tuple(sorted(gt - named)), ground_truth=tuple(sorted(gt)),
        ))
    if n_scored == 0:
        raise ValueError(
            f"no caption to score: of {len(captions)} captions, {n_unknown} name image ids without "
            f"ground truth and {n_empty} are empty; check that captions and annotations belong together"
        )
    metrics: dict[str, float | int] = {
        "chair_s": _ratio(n_halluc_caps, n_scored),
        "chair_i": _ratio(n_halluc, n_mentions),
        "recall": _ratio(n_recalled, n_gt),
        "len": n_words / n_scored,
        "glued": n_glued / n_scored,
        "looped": n_looped / n_scored,
        "n_captions": n_scored,
        "n_mentions": n_mentions,
        "n_hallucinated": n_halluc,
        "n_gt_objects": n_gt,
        "n_unknown_image": n_unknown,
        "n_empty": n_empty,
    }
    return ChairResult(metrics, details)


def _caption_rows(path: Path, file_ids: Mapping[str, int]) -> list[tuple[ImageId, str]]:
    """(image id, caption) per line of a captions JSONL ({"image_id" or "image", "caption" or "text"})."""
    pairs = []
    for lineno, row in io.iter_jsonl(path):
        where = f"{path}:{lineno}"
        text = row.get("caption", row.get("text"))
        if not isinstance(text, str):
            raise ValueError(f"{where}: needs a string 'caption' (or 'text'), got {text!r}")
        pairs.append((_image_id(row, file_ids, where), text))
    return pairs


def _image_id(row: dict, file_ids: Mapping[str, int], where: str) -> ImageId:
    """An int image id from 'image_id' (int or digits), else from 'image' (a file name)."""
    if "image_id" in row:
        value = row["image_id"]
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().isdigit():
            return int(value)
        raise ValueError(f"{where}: 'image_id' must be an integer, got {value!r}")
    if isinstance(row.get("image"), str):
        # A file name the annotations do not list stays a string: counted as an unknown image.
        return file_ids.get(row["image"], row["image"])
    raise ValueError(f"{where}: needs 'image_id' (an integer) or 'image' (a file name from the annotations)")


def _references(path: Path, file_ids: Mapping[str, int]) -> dict[ImageId, list[str]]:
    """Reference captions per image: JSONL rows like the captions, or a COCO captions JSON."""
    if path.suffix == ".json":
        return load_captions(path)
    out: dict[ImageId, list[str]] = {}
    for image_id, caption in _caption_rows(path, file_ids):
        out.setdefault(image_id, []).append(caption)
    return out


def _check_coco_names(objects: Mapping[ImageId, Sequence[str]], vocab: Vocabulary, annotations: Path) -> None:
    """Without --vocab, annotations with names outside COCO-80 need their own vocabulary: say which file."""
    unknown = sorted({n for names in objects.values() for n in names if vocab.category_of(n) is None})
    if unknown:
        near = [p for p in (annotations.parent / "vocab.txt", annotations.parent.parent / "vocab.txt") if p.is_file()]
        suggestion = near[0] if near else "data/world/vocab.txt"
        raise ValueError(
            f"{annotations} names objects that are not COCO-80 names ({', '.join(map(repr, unknown[:5]))}"
            f"{' and more' if len(unknown) > 5 else ''}): pass the vocabulary of these annotations, e.g. "
            f"--vocab {suggestion} (a world's is its vocab.txt)")


def chair_from_files(
    captions_jsonl: str | Path,
    annotations_json: str | Path,
    references_jsonl: str | Path | None = None,
    vocab_file: str | Path | None = None,
    details_out: str | Path | None = None,
) -> dict[str, float | int]:
    """CHAIR of a captions JSONL against a COCO instances file; returns the metrics.

    captions_jsonl: one {"image_id": int, "caption": str} per line ("image": file name and
    "text" are accepted too). references_jsonl: reference captions in the same format (or a
    COCO captions .json), added to the ground truth. vocab_file: `category, synonym, ...` lines
    (default: COCO-80). details_out: a JSONL with every caption's mentions and verdict.
    """
    captions_jsonl = io.require_file(captions_jsonl)
    if details_out is not None:  # before the work: an unwritable path must not cost the metrics
        io.check_writable(details_out)
    instances = load_instances(annotations_json)
    vocab = Vocabulary.from_file(vocab_file) if vocab_file is not None else Vocabulary.coco()
    file_ids = {name: image_id for image_id, name in instances.file_names.items()}
    references = None
    if references_jsonl is not None:
        references = _references(Path(references_jsonl), file_ids)
        if not references.keys() & instances.file_names.keys():
            raise ValueError(
                f"no image of {references_jsonl} is in {annotations_json}; "
                "reference captions must describe the annotated images"
            )
    if vocab_file is None:
        _check_coco_names(instances.objects, vocab, Path(annotations_json))
    try:
        truth = ground_truth_objects(instances.objects, vocab, references)
    except ValueError as e:
        raise ValueError(f"{annotations_json}: {e}") from e
    result = chair(_caption_rows(captions_jsonl, file_ids), truth, vocab)
    if details_out is not None:
        io.write_jsonl(details_out, (d.to_json() for d in result.details))
    return result.metrics
