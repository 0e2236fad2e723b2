"""POPE: the official answer rule, hand-computed metrics, pairing by question id."""
from __future__ import annotations

import re

import pytest

from fisao import io
from fisao.benchmarks.pope import is_unclear, pope, pope_answer, pope_from_files


@pytest.mark.parametrize("text, answer, unclear", [
    ("Yes, there is a dog in the image.", "yes", False),
    ("No, there is no dog in the image.", "no", False),
    ("There is not a dog.", "no", False),  # "not" is a no-word
    ("Yes. But there is no cat.", "yes", False),  # only the first sentence counts
    ("no", "no", False),
    ("NO", "yes", True),  # the official rule is case-sensitive: scored yes, but counted unclear
    ("Nope!", "yes", True),
    ("I cannot tell", "yes", True),
    ("", "yes", True),
    ("YES!", "yes", False),  # clearly yes
])
def test_official_answer_rule(text, answer, unclear):
    assert pope_answer(text) == answer
    assert is_unclear(text) is unclear


LABELS = {1: "yes", 2: "yes", 3: "no", 4: "no", 5: "yes"}
ANSWERS = {
    1: "Yes.",  # yes, right: TP
    2: "No, there is not.",  # no, wrong: FN
    3: "Yes there is",  # yes, wrong: FP
    4: "No.",  # no, right: TN
    5: "Maybe",  # yes by default, right: TP, unclear
}


def test_metrics_by_hand():
    m = pope(LABELS, ANSWERS)
    assert (m["tp"], m["fp"], m["tn"], m["fn"], m["n"], m["n_unclear"]) == (2, 1, 1, 1, 5, 1)
    assert m["accuracy"] == pytest.approx(3 / 5)  # (TP + TN) / n
    assert m["precision"] == pytest.approx(2 / 3)  # TP / (TP + FP)
    assert m["recall"] == pytest.approx(2 / 3)  # TP / (TP + FN)
    assert m["f1"] == pytest.approx(2 / 3)  # 2pr / (p + r) with p = r
    assert m["yes_ratio"] == pytest.approx(3 / 5)  # (TP + FP) / n


def test_all_no_answers_give_zero_precision_not_a_crash():
    m = pope({1: "yes", 2: "no"}, {1: "no", 2: "no"})
    assert (m["precision"], m["recall"], m["f1"], m["accuracy"], m["yes_ratio"]) == (0.0, 0.0, 0.0, 0.5, 0.0)


def test_missing_and_extra_ids_are_named():
    with pytest.raises(ValueError, match=r"no answer for question_id 4.*answers for unknown question_id 9"):
        pope(LABELS, {**{k: v for k, v in ANSWERS.items() if k != 4}, 9: "yes"})


def write_questions(path, labels: dict[int, str]) -> None:
    io.write_jsonl(path, ({"question_id": q, "image": f"COCO_val2014_{q:012d}.jpg",
                           "text": "Is there a dog in the image?", "label": lab} for q, lab in labels.items()))


def test_from_files_pairs_by_id_not_line_order(tmp_path):
    write_questions(tmp_path / "q.jsonl", LABELS)
    # Answers in reverse order, one under the "answer" alias.
    rows = [{"question_id": q, "text": a} for q, a in reversed(ANSWERS.items())]
    rows[0] = {"question_id": 5, "answer": ANSWERS[5]}
    io.write_jsonl(tmp_path / "a.jsonl", rows)
    assert pope_from_files(tmp_path / "q.jsonl", tmp_path / "a.jsonl") == pytest.approx(pope(LABELS, ANSWERS))


def test_from_files_missing_answer(tmp_path):
    write_questions(tmp_path / "q.jsonl", LABELS)
    io.write_jsonl(tmp_path / "a.jsonl", [{"question_id": q, "text": a} for q, a in ANSWERS.items() if q != 3])
    with pytest.raises(ValueError, match="a.jsonl against .*q.jsonl: no answer for question_id 3;"):
        pope_from_files(tmp_path / "q.jsonl", tmp_path / "a.jsonl")


@pytest.mark.parametrize("answers, message", [
    ('{"question_id": 1, "text": "yes"}\n{"question_id": 1, "text": "no"}\n', "a.jsonl:2: question_id 1 repeats line 1"),
    ('{"question_id": 1, "text": "yes"}\n\n{"question_id": 2}\n', "a.jsonl:3: needs a string 'text' (or 'answer')"),
    ('{"text": "yes"}\n', "a.jsonl:1: needs a 'question_id'"),
    ('{"question_id": 1, "text": "yes"}\n[1, 2]\n', "a.jsonl:2: expected a JSON object"),
])
def test_bad_answer_files_name_file_and_line(tmp_path, answers, message):
    write_questions(tmp_path / "q.jsonl", {1: "yes", 2: "no"})
    (tmp_path / "a.jsonl").write_text(answers)
    with pytest.raises(ValueError, match=re.escape(message)):
        pope_from_files(tmp_path / "q.jsonl", tmp_path / "a.jsonl")


def test_bad_label_names_file_and_line(tmp_path):
    (tmp_path / "q.jsonl").write_text('{"question_id": 1, "label": "yes"}\n{"question_id": 2, "label": "Maybe"}\n')
    io.write_jsonl(tmp_path / "a.jsonl", [{"question_id": 1, "text": "yes"}, {"question_id": 2, "text": "no"}])
    with pytest.raises(ValueError, match=r"q.jsonl:2: 'label' must be one of \['yes', 'no'\]"):
        pope_from_files(tmp_path / "q.jsonl", tmp_path / "a.jsonl")


def test_the_evaluation_asks_each_distinct_pope_question_once_and_answers_every_file(tiny_models, tmp_path, monkeypatch):
    """The three POPE files share their positive questions: each distinct (image, question) is
    generated once, and every file's answers are those of its own questions."""
    import fisao.evaluate as evaluate
    from fisao import io

    asked: list[tuple[str, str]] = []
    real = evaluate.answer

    def spy(model, processor, images, questions, **kwargs):
        asked.extend(questions)
        return real(model, processor, images, questions, **kwargs)

    monkeypatch.setattr(evaluate, "answer", spy)
    cfg = tiny_models["config"].eval
    metrics = evaluate.evaluate_model(tiny_models["llava"], tiny_models["world"], ("pope",), cfg, tmp_path, progress=False)
    split = tiny_models["world"] / cfg.split
    files = {s: list(io.read_jsonl(split / f"pope_{s}.jsonl")) for s in ("random", "popular", "adversarial")}
    selected = {r["image"] for rows in files.values() for r in rows}  # the tiny config evaluates the whole split
    distinct = {(r["image"], r["text"]) for rows in files.values() for r in rows if r["image"] in selected}
    assert len(asked) == len(distinct) < sum(len(rows) for rows in files.values())
    for s, rows in files.items():
        answers = {a["question_id"]: a["text"] for a in io.read_jsonl(tmp_path / f"pope_{s}_answers.jsonl")}
        assert set(answers) == {r["question_id"] for r in rows}
        assert f"pope_{s}_f1" in metrics
    # one question asked by two files got one answer
    shared = next((r, q) for r in files["random"] for q in files["adversarial"]
                  if (r["image"], r["text"]) == (q["image"], q["text"]))
    by_file = {s: {a["question_id"]: a["text"] for a in io.read_jsonl(tmp_path / f"pope_{s}_answers.jsonl")}
               for s in ("random", "adversarial")}
    assert by_file["random"][shared[0]["question_id"]] == by_file["adversarial"][shared[1]["question_id"]]
