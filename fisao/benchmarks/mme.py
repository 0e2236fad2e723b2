"""MME (Fu et al., 2023): yes/no questions in 14 subtasks, two questions per image.

Files follow the layout of MME's official `eval_tool/calculation.py`: a directory with one
`<subtask>.txt` per subtask, each line `image<TAB>question<TAB>ground_truth<TAB>model_answer`,
the two questions of an image on consecutive lines. `read_mme_questions` reads the same layout
without the answer column, `attach_answers` adds a model's answers, `write_mme_dir` writes the
4-column files the official tool reads.

Scoring, as the official calculation:
- an answer is lowercased, stripped and its '.' removed; exactly "yes"/"no" is that answer,
  otherwise its first 4 characters decide: containing "yes" -> yes, else containing "no" -> no,
  else "other", which is wrong whatever the ground truth;
- per subtask, acc = right answers / questions and acc+ = images (consecutive pairs of lines)
  with both answers right / images; score = 100 * acc + 100 * acc+ (at most 200);
- perception = sum of the 10 perception subtask scores (max 2000), cognition = sum of the 4
  cognition ones (max 800).

Departures: calculation.py only lowercases the answer (its trailing newline included) before
the same rule; the strip and '.' removal follow the normalisation of widely used re-implementations
(lmms-eval) and change the verdict only for answers that start with spaces or dots. A missing
subtask is never scored as 0: `mme` reports it (`n_missing_subtasks`) and leaves its group total
NaN; `mme_from_dir` refuses an incomplete directory unless told to score a subset. Lines that
break the layout (wrong column count, ground truth other than yes/no, an odd number of lines,
the two lines of a pair naming different images) are errors naming the file and line, where the
official script fails an assert. Blank lines are skipped. A `.txt` file whose name is no MME
subtask is scored on its own and counted in `n_unknown_subtasks`, never added to a total.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, Mapping

from fisao import io

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
GROUPS = {"perception": PERCEPTION, "cognition": COGNITION}


@dataclass(frozen=True)
class MmeItem:
    """One question. `answer` is None until a model's answer is attached."""

    image: str
    question: str
    ground_truth: Literal["yes", "no"]
    answer: str | None = None


def mme_answer(text: str) -> Literal["yes", "no", "other"]:
    """The official reading of a model's answer."""
    text = text.lower().strip().replace(".", "")
    if text in ("yes", "no"):
        return text  # type: ignore[return-value]
    prefix = text[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def _read_file(path: Path, columns: int) -> list[MmeItem]:
    """Items of one subtask file with `columns` 3 (questions) or 4 (with answers)."""
    items: list[MmeItem] = []
    pair_start = 0  # line number of the first line of the current image pair
    for lineno, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < columns or (columns == 3 and len(parts) > 3):
            layout = "image, question, ground truth" + (", model answer" if columns == 4 else "")
            raise ValueError(f"{path}:{lineno}: expected {columns} tab-separated columns ({layout}), got {len(parts)}")
        gt = parts[2].strip().lower()
        if gt not in ("yes", "no"):
            raise ValueError(f"{path}:{lineno}: ground truth must be yes or no, got {parts[2]!r}")
        # An answer with a tab in it keeps its tail: only its start matters to the score.
        answer = "\t".join(parts[3:]) if columns == 4 else None
        item = MmeItem(parts[0], parts[1], gt, answer)  # type: ignore[arg-type]
        if len(items) % 2 == 1 and item.image != items[-1].image:
            raise ValueError(
                f"{path}:{lineno}: image {item.image!r} differs from {items[-1].image!r} on line "
                f"{pair_start}; MME needs each image's two questions on consecutive lines"
            )
        pair_start = lineno if len(items) % 2 == 0 else pair_start
        items.append(item)
    if len(items) % 2:
        raise ValueError(f"{path}: {len(items)} questions, an odd number; MME asks two per image")
    return items


def _read_dir(path: str | Path, columns: int) -> dict[str, list[MmeItem]]:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"MME directory {path} does not exist")
    files = sorted(p for p in path.glob("*.txt") if p.is_file())
    if not files:
        raise FileNotFoundError(f"{path} has no <subtask>.txt files (e.g. existence.txt); is it an MME directory?")
    return {p.stem: _read_file(p, columns) for p in files}


def read_mme_dir(path: str | Path) -> dict[str, list[MmeItem]]:
    """Subtask -> items of a results directory (4 columns: image, question, ground truth, answer)."""
    return _read_dir(path, 4)


def read_mme_questions(path: str | Path) -> dict[str, list[MmeItem]]:
    """Subtask -> items of a questions-only directory (3 columns: image, question, ground truth)."""
    return _read_dir(path, 3)


def _shown(keys: list) -> str:
    return ", ".join(map(repr, keys[:5])) + (f" (and {len(keys) - 5} more)" if len(keys) > 5 else "")


def attach_answers(
    questions: Mapping[str, list[MmeItem]], answers: Mapping[tuple[str, str, str], str]
) -> dict[str, list[MmeItem]]:
    """Copy of `questions` with answers keyed by (subtask, image, question) filled in.

    Every question needs an answer and every answer a question (ValueError naming them).
    """
    keys = [(s, it.image, it.question) for s, items in questions.items() for it in items]
    repeated = [k for k, n in Counter(keys).items() if n > 1]
    if repeated:
        raise ValueError(f"questions asked twice, so answers cannot be told apart: {_shown(repeated)}")
    known = set(keys)
    missing = [k for k in keys if k not in answers]
    extra = [k for k in answers if k not in known]
    if missing or extra:
        raise ValueError(
            f"{len(missing)} questions without an answer ({_shown(missing)}) and {len(extra)} answers "
            f"without a question ({_shown(extra)}); key answers by (subtask, image, question)"
        )
    return {s: [replace(it, answer=answers[s, it.image, it.question]) for it in items] for s, items in questions.items()}


def write_mme_dir(out: str | Path, results: Mapping[str, list[MmeItem]]) -> Path:
    """Write `<subtask>.txt` files for the official tool; tabs and newlines in answers become spaces."""
    out = Path(out)
    for subtask, items in results.items():
        lines = []
        for it in items:
            if it.answer is None:
                raise ValueError(f"{subtask}: no answer for image {it.image!r}, question {it.question!r}")
            answer = " ".join(it.answer.replace("\t", " ").splitlines())
            lines.append(f"{it.image}\t{it.question}\t{it.ground_truth}\t{answer}\n")
        io.atomic_write_text(out / f"{subtask}.txt", "".join(lines))
    return out


def subtask_score(subtask: str, items: list[MmeItem]) -> dict[str, float | int]:
    """acc, acc+ and score (100 * acc + 100 * acc+) of one subtask; items pair up per image."""
    if not items or len(items) % 2:
        raise ValueError(f"{subtask}: {len(items)} questions; MME needs two per image, at least one image")
    right: list[bool] = []
    n_other = 0
    for it in items:
        if it.answer is None:
            raise ValueError(f"{subtask}: no answer for image {it.image!r}, question {it.question!r}; attach answers first")
        predicted = mme_answer(it.answer)
        n_other += predicted == "other"
        right.append(predicted == it.ground_truth)
    for k in range(0, len(items), 2):
        if items[k].image != items[k + 1].image:
            raise ValueError(f"{subtask}: questions {k + 1} and {k + 2} should be one image's pair, but name "
                             f"{items[k].image!r} and {items[k + 1].image!r}")
    both_right = [right[k] and right[k + 1] for k in range(0, len(items), 2)]
    acc = sum(right) / len(items)
    acc_plus = sum(both_right) / len(both_right)
    return {"score": 100 * acc + 100 * acc_plus, "acc": acc, "acc_plus": acc_plus,
            "n_questions": len(items), "n_images": len(both_right), "n_other": n_other}


def missing_subtasks(results: Mapping[str, list[MmeItem]]) -> list[str]:
    """The MME subtasks (perception first) that `results` lacks."""
    return [s for s in PERCEPTION + COGNITION if s not in results]


def mme(results: Mapping[str, list[MmeItem]]) -> dict[str, float | int]:
    """Per-subtask `<subtask>/score|acc|acc_plus|n_other`, and the perception and cognition totals.

    A group's total (and `total`) is NaN when one of its subtasks is missing; `n_missing_subtasks`
    counts those and `missing_subtasks(results)` names them.
    """
    metrics: dict[str, float | int] = {}
    for subtask, items in results.items():
        s = subtask_score(subtask, items)
        for key in ("score", "acc", "acc_plus", "n_other"):
            metrics[f"{subtask}/{key}"] = s[key]
    for group, names in GROUPS.items():
        complete = all(n in results for n in names)
        metrics[group] = sum(metrics[f"{n}/score"] for n in names) if complete else math.nan
    metrics["total"] = metrics["perception"] + metrics["cognition"]
    metrics["n_missing_subtasks"] = len(missing_subtasks(results))
    metrics["n_unknown_subtasks"] = sum(s not in PERCEPTION + COGNITION for s in results)
    metrics["n_questions"] = sum(len(items) for items in results.values())
    metrics["n_other"] = sum(int(metrics[f"{s}/n_other"]) for s in results)
    return metrics


def mme_from_dir(results_dir: str | Path, require_complete: bool = True) -> dict[str, float | int]:
    """MME metrics of a results directory (see `mme`).

    With `require_complete` (default) a directory missing any of the 14 subtasks is an error that
    names them; pass False to score a subset (its incomplete group totals are then NaN).
    """
    results = read_mme_dir(results_dir)
    missing = missing_subtasks(results)
    if missing and require_complete:
        unknown = [s for s in results if s not in PERCEPTION + COGNITION]
        hint = f"; these files are no MME subtask: {[f'{s}.txt' for s in unknown]}" if unknown else ""
        raise ValueError(
            f"{results_dir} lacks MME subtasks {missing}{hint}; add their <subtask>.txt files or "
            "pass require_complete=False to score the subtasks present"
        )
    return mme(results)
