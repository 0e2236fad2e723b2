"""POPE (Li et al., EMNLP 2023): yes/no questions about objects, scored with "yes" as positive.

The answer rule is the official one (RUCAIBox/POPE, evaluate.py): keep the text before the first
'.', delete commas, split on single spaces; if one of the words is exactly "No", "no" or "not"
the answer is "no", otherwise "yes". So "No!" and "NO" count as yes, and so does anything that
is not an answer at all; we score them the same way, so our numbers match the papers', and count
them in `n_unclear`: answers whose first sentence has neither a no-word of the rule nor the word
"yes" (any case, punctuation stripped), which the rule scores as yes only by default.

Departures: answers are paired with questions by `question_id`, not by line order (a missing,
extra or repeated id is an error naming it), and labels other than yes/no are errors (the
official script reads anything but "no" as yes). Precision, recall and F1 are 0.0 where their
denominator is 0 (the official script divides by zero); tp/fp/tn/fn are reported beside them.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Hashable, Literal, Mapping

from fisao import io

QuestionId = Hashable
NO_WORDS = frozenset({"No", "no", "not"})


def first_sentence_words(text: str) -> list[str]:
    """The official tokenisation: text before the first '.', commas removed, split on ' '."""
    return text.split(".")[0].replace(",", "").split(" ")


def pope_answer(text: str) -> Literal["yes", "no"]:
    """The official reading of a free-form answer."""
    return "no" if NO_WORDS.intersection(first_sentence_words(text)) else "yes"


def is_unclear(text: str) -> bool:
    """True when the rule says yes only because the first sentence has no no-word and no "yes"."""
    if pope_answer(text) == "no":
        return False
    words = {re.sub(r"[^\w]", "", w).lower() for w in first_sentence_words(text)}
    return "yes" not in words


def _safe(num: float, den: float) -> float:
    return num / den if den else 0.0


def _check_ids(labels: Mapping[QuestionId, str], answers: Mapping[QuestionId, str]) -> None:
    missing = [q for q in labels if q not in answers]
    extra = [q for q in answers if q not in labels]
    problems = []
    for what, ids in (("no answer for question_id", missing), ("answers for unknown question_id", extra)):
        if ids:
            shown = ", ".join(map(repr, ids[:10])) + (f" (and {len(ids) - 10} more)" if len(ids) > 10 else "")
            problems.append(f"{what} {shown}")
    if problems:
        raise ValueError("; ".join(problems) + "; answer every question of the question file exactly once")


def pope(labels: Mapping[QuestionId, str], answers: Mapping[QuestionId, str]) -> dict[str, float | int]:
    """POPE metrics from labels ("yes"/"no") and free-form answers, both keyed by question id."""
    _check_ids(labels, answers)
    if not labels:
        raise ValueError("no POPE question to score")
    tp = fp = tn = fn = unclear = 0
    for qid, label in labels.items():
        if label not in ("yes", "no"):
            raise ValueError(f"question_id {qid!r}: label must be 'yes' or 'no', got {label!r}")
        answer = answers[qid]
        predicted = pope_answer(answer)
        unclear += is_unclear(answer)
        if predicted == "yes":
            tp, fp = (tp + 1, fp) if label == "yes" else (tp, fp + 1)
        else:
            tn, fn = (tn + 1, fn) if label == "no" else (tn, fn + 1)
    n = tp + fp + tn + fn
    precision, recall = _safe(tp, tp + fp), _safe(tp, tp + fn)
    return {
        "accuracy": (tp + tn) / n,
        "precision": precision,
        "recall": recall,
        "f1": _safe(2 * precision * recall, precision + recall),
        "yes_ratio": (tp + fp) / n,
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        "n": n,
        "n_unclear": unclear,
    }


# Above this share of unclear answers, `fisao eval pope` fails (exit 2) unless --allow-unclear:
# the rule scores an unclear answer as "yes", so F1 then measures the rule, not the model (every
# answer empty scored F1 0.667).
MAX_UNCLEAR_SHARE = 0.10


def check_unclear(metrics: Mapping[str, float | int], max_share: float = MAX_UNCLEAR_SHARE) -> None:
    """ValueError when more than `max_share` of the scored answers are unclear (neither yes nor no)."""
    if metrics["n_unclear"] > max_share * metrics["n"]:
        raise ValueError(
            f"{metrics['n_unclear']} of {metrics['n']} answers ({metrics['n_unclear'] / metrics['n']:.0%}) are unclear, "
            f"neither yes nor no (more than {max_share:.0%}), and the POPE rule scored them as yes: check the answers "
            "file (empty or off-topic answers?), or pass --allow-unclear to accept these figures")


def _question_id(row: dict, where: str) -> QuestionId:
    if "question_id" not in row:
        raise ValueError(f"{where}: needs a 'question_id'")
    qid = row["question_id"]
    if isinstance(qid, str) and qid.strip().isdigit():
        return int(qid)  # "12" and 12 are the same question
    if isinstance(qid, bool) or not isinstance(qid, (int, str)):
        raise ValueError(f"{where}: 'question_id' must be an integer or a string, got {qid!r}")
    return qid


def _keyed(path: Path, field: str, alias: str | None = None, allowed: tuple[str, ...] = ()) -> dict[QuestionId, str]:
    """question_id -> row[field] (or row[alias]) for a JSONL file; repeats and gaps name the line."""
    out: dict[QuestionId, str] = {}
    first_line: dict[QuestionId, int] = {}
    for lineno, row in io.iter_jsonl(path):
        where = f"{path}:{lineno}"
        qid = _question_id(row, where)
        value = row.get(field, row.get(alias) if alias else None)
        if not isinstance(value, str):
            names = f"'{field}'" + (f" (or '{alias}')" if alias else "")
            raise ValueError(f"{where}: needs a string {names}, got {value!r}")
        if allowed and value not in allowed:
            raise ValueError(f"{where}: '{field}' must be one of {list(allowed)}, got {value!r}")
        if qid in out:
            raise ValueError(f"{where}: question_id {qid!r} repeats line {first_line[qid]}; keep one row per question")
        out[qid], first_line[qid] = value, lineno
    return out


def pope_from_files(questions_jsonl: str | Path, answers_jsonl: str | Path) -> dict[str, float | int]:
    """POPE metrics for an official question file and a JSONL of {"question_id", "text"} answers.

    Question rows: {"question_id", "image", "text", "label"} (the official format). Answer rows:
    {"question_id", "text"}, with "answer" accepted for "text".
    """
    questions_jsonl, answers_jsonl = Path(questions_jsonl), Path(answers_jsonl)
    labels = _keyed(questions_jsonl, "label", allowed=("yes", "no"))
    answers = _keyed(answers_jsonl, "text", alias="answer")
    try:
        return pope(labels, answers)
    except ValueError as e:
        raise ValueError(f"{answers_jsonl} against {questions_jsonl}: {e}") from e
