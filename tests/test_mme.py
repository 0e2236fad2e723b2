"""MME: the official answer reading, acc+ arithmetic, totals, the eval-tool directory layout."""
from __future__ import annotations

import math
import re

import pytest

from fisao.benchmarks.mme import (
    COGNITION, PERCEPTION, MmeItem, attach_answers, missing_subtasks, mme, mme_answer, mme_from_dir,
    read_mme_dir, read_mme_questions, subtask_score, write_mme_dir,
)


@pytest.mark.parametrize("text, expected", [
    ("Yes", "yes"), ("No.", "no"), (" yes \n", "yes"),
    ("   yes", "yes"),  # stripped first (calculation.py alone would read "   y" as other)
    ("Yes, it is.", "yes"),  # first 4 characters "yes," contain "yes"
    ("Not really", "no"),  # "not " contains "no"
    ("nope", "no"),
    ("The answer is yes", "other"),  # "the " has neither: wrong whatever the truth
    ("I don't know", "other"),
])
def test_official_answer_reading(text, expected):
    assert mme_answer(text) == expected


def pair(image: str, gt1: str, a1: str, gt2: str, a2: str) -> list[MmeItem]:
    return [MmeItem(image, f"Q1 about {image}?", gt1, a1), MmeItem(image, f"Q2 about {image}?", gt2, a2)]


def test_acc_plus_arithmetic():
    items = (
        pair("a.jpg", "yes", "Yes", "no", "No")  # both right
        + pair("b.jpg", "yes", "Yes", "no", "Yes")  # one right
        + pair("c.jpg", "yes", "Maybe", "no", "no")  # "other" (wrong) + right
    )
    s = subtask_score("existence", items)
    # acc = 4 right of 6 questions; acc+ = 1 image of 3 with both right.
    assert s["acc"] == pytest.approx(4 / 6)
    assert s["acc_plus"] == pytest.approx(1 / 3)
    assert s["score"] == pytest.approx(100 * 4 / 6 + 100 / 3)  # = 100.0
    assert (s["n_questions"], s["n_images"], s["n_other"]) == (6, 3, 1)


# One image per subtask. Perception: both right (200) everywhere but "count", one right (50).
# Cognition: commonsense 200, numerical one right (50), translation both wrong (0),
# code "other" + right (50).
ANSWERS = {s: ("Yes.", "no") for s in PERCEPTION} | {
    "count": ("yes", "yes"),
    "commonsense_reasoning": ("Yes", "No"),
    "numerical_calculation": ("no", "no"),
    "text_translation": ("No", "Yes"),
    "code_reasoning": ("I think so", "No"),
}


def write_dir(path, subtasks=PERCEPTION + COGNITION, with_answers=True) -> None:
    path.mkdir(parents=True, exist_ok=True)
    for s in subtasks:
        a1, a2 = ANSWERS[s]
        rows = [("img.png", "Is it so?", "Yes", a1), ("img.png", "Is it not so?", "No", a2)]
        lines = ["\t".join(r if with_answers else r[:3]) for r in rows]
        (path / f"{s}.txt").write_text("\n".join(lines) + "\n")


def test_totals_by_hand(tmp_path):
    write_dir(tmp_path / "results")
    m = mme_from_dir(tmp_path / "results")
    assert m["count/score"] == pytest.approx(50.0)  # acc 1/2, acc+ 0/1
    assert m["existence/score"] == pytest.approx(200.0)
    assert m["perception"] == pytest.approx(9 * 200 + 50)  # 1850
    assert m["cognition"] == pytest.approx(200 + 50 + 0 + 50)  # 300
    assert m["total"] == pytest.approx(2150)
    assert (m["n_missing_subtasks"], m["n_unknown_subtasks"], m["n_questions"], m["n_other"]) == (0, 0, 28, 1)


def test_missing_subtask_is_reported_not_zero(tmp_path):
    write_dir(tmp_path / "results", [s for s in PERCEPTION + COGNITION if s != "OCR"])
    (tmp_path / "results" / "OCR_typo.txt").write_text("img.png\tQ?\tyes\tyes\nimg.png\tQ2?\tno\tno\n")
    with pytest.raises(ValueError, match=re.escape("lacks MME subtasks ['OCR']; these files are no MME subtask: ['OCR_typo.txt']")):
        mme_from_dir(tmp_path / "results")
    m = mme_from_dir(tmp_path / "results", require_complete=False)
    assert math.isnan(m["perception"]) and math.isnan(m["total"])
    assert m["cognition"] == pytest.approx(300)
    assert (m["n_missing_subtasks"], m["n_unknown_subtasks"]) == (1, 1)
    assert m["OCR_typo/score"] == pytest.approx(200)
    assert missing_subtasks(read_mme_dir(tmp_path / "results")) == ["OCR"]


def test_questions_only_then_attach_answers_then_official_layout(tmp_path):
    write_dir(tmp_path / "questions", with_answers=False)
    questions = read_mme_questions(tmp_path / "questions")
    assert questions["count"][0] == MmeItem("img.png", "Is it so?", "yes", None)
    answers = {(s, it.image, it.question): ANSWERS[s][k] for s, items in questions.items() for k, it in enumerate(items)}
    answers["code_reasoning", "img.png", "Is it so?"] = "I think\tso\nreally"  # tabs and newlines survive writing
    write_mme_dir(tmp_path / "results", attach_answers(questions, answers))
    assert mme_from_dir(tmp_path / "results")["total"] == pytest.approx(2150)
    del answers["count", "img.png", "Is it so?"]
    with pytest.raises(ValueError, match=r"1 questions without an answer \(\('count', 'img.png', 'Is it so\?'\)\)"):
        attach_answers(questions, answers)


def test_unanswered_items_cannot_be_scored():
    with pytest.raises(ValueError, match="attach answers first"):
        mme({"existence": pair("a.jpg", "yes", None, "no", None)})  # type: ignore[arg-type]


@pytest.mark.parametrize("content, message", [
    ("a.png\tQ?\tyes\tyes\na.png\tQ2?\tno\n", "existence.txt:2: expected 4 tab-separated columns"),
    ("a.png\tQ?\tyes\tyes\na.png\tQ2?\tmaybe\tno\n", "existence.txt:2: ground truth must be yes or no"),
    ("a.png\tQ?\tyes\tyes\nb.png\tQ2?\tno\tno\n", "existence.txt:2: image 'b.png' differs from 'a.png' on line 1"),
    ("a.png\tQ?\tyes\tyes\n", "existence.txt: 1 questions, an odd number"),
])
def test_bad_layout_names_file_and_line(tmp_path, content, message):
    (tmp_path / "existence.txt").write_text(content)
    with pytest.raises(ValueError, match=re.escape(message)):
        read_mme_dir(tmp_path)


def test_not_an_mme_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no <subtask>.txt files"):
        read_mme_dir(tmp_path)
