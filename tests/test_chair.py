"""CHAIR on hand-counted captions, in memory and from files."""
from __future__ import annotations

import json

import pytest

from fisao import io
from fisao.benchmarks.chair import chair, chair_from_files, ground_truth_objects
from fisao.benchmarks.mentions import word_loops
from fisao.benchmarks.vocab import Vocabulary

COCO = Vocabulary.coco()

# Image 1 holds a dog, a person (given as the synonym "man") and a bicycle; image 2 a cat;
# image 3 nothing annotated.
TRUTH = {1: {"dog", "man", "bicycle"}, 2: {"cat"}, 3: set()}
CAPTIONS = [
    (1, "A man walks two dogs and a cat. The cat is black."),  # person, dog, cat, cat: 2 hallucinated
    (2, "A kitten on a sofa."),  # cat, couch: 1 hallucinated
    (2, "A cat."),  # cat: none
    (3, "An empty room."),  # no mention
    (99, "A dog."),  # unknown image: counted, not scored
    (1, "   "),  # empty: counted, not scored
]


def test_chair_metrics_by_hand():
    result = chair(CAPTIONS, TRUTH, COCO)
    m = result.metrics
    # 4 captions scored; mentions 4 + 2 + 1 + 0 = 7, hallucinated 2 + 1 = 3.
    assert m["n_captions"] == 4 and m["n_mentions"] == 7 and m["n_hallucinated"] == 3
    assert m["chair_i"] == pytest.approx(3 / 7)
    assert m["chair_s"] == pytest.approx(2 / 4)  # captions 1 and 2 hallucinate
    # Ground-truth objects per scored caption: 3 + 1 + 1 + 0 = 5; recalled: person, dog (caption 1),
    # cat (caption 2), cat (caption 3) = 4.
    assert m["n_gt_objects"] == 5
    assert m["recall"] == pytest.approx(4 / 5)
    # Words: 12 + 5 + 2 + 3 = 22 over 4 captions.
    assert m["len"] == pytest.approx(22 / 4)
    assert m["n_unknown_image"] == 1 and m["n_empty"] == 1
    assert m["glued"] == 0.0 and m["looped"] == 0.0


def test_glued_share_counts_captions_with_a_glued_word_and_chair_ignores_the_glued_name():
    truth = {1: {"dog"}, 2: {"dog"}, 3: {"dog"}}
    m = chair([(1, "A dog and a catNo."), (2, "A dogYes dogYes."), (3, "A dog.")], truth, COCO).metrics
    # The glued "catNo" is no mention for CHAIR (the authors' tokenizer reads one unknown word), so
    # caption 1 does not hallucinate; two of three captions hold a glued word.
    assert m["n_mentions"] == 2 and m["n_hallucinated"] == 0
    assert m["glued"] == pytest.approx(2 / 3)


def test_looped_share_counts_captions_writing_one_word_four_times_in_a_row():
    truth = {1: {"dog"}, 2: {"dog"}, 3: {"dog"}}
    captions = [(1, "A yellow yellow Yellow yellow dog."), (2, "A dog, a dog, a dog, a dog."), (3, "A dog dog dog.")]
    m = chair(captions, truth, COCO).metrics
    # only caption 1 writes a word four times in a row (case aside); 2 repeats a phrase, 3 a word three times
    assert m["looped"] == pytest.approx(1 / 3)
    assert word_loops("a b b b b c c c c c d d d") == ["b", "c"] and word_loops("b b b b", times=5) == []


def test_chair_details_per_caption():
    details = chair(CAPTIONS, TRUTH, COCO).details
    assert len(details) == len(CAPTIONS)
    first = details[0]
    assert [m.category for m in first.mentions] == ["person", "dog", "cat", "cat"]
    assert [(h.text, h.category) for h in first.hallucinated] == [("cat", "cat"), ("cat", "cat")]
    assert first.missed == ("bicycle",)
    assert first.ground_truth == ("bicycle", "dog", "person")
    assert [(h.text, h.category) for h in details[1].hallucinated] == [("sofa", "couch")]
    assert [d.skipped for d in details] == [None, None, None, None, "unknown_image", "empty"]


def test_an_absent_object_named_twice_is_two_hallucinations():
    m = chair([(1, "a cat and a cat")], {1: set()}, COCO).metrics
    assert (m["n_mentions"], m["n_hallucinated"], m["chair_i"], m["chair_s"]) == (2, 2, 1.0, 1.0)


def test_reference_captions_extend_the_ground_truth():
    truth = ground_truth_objects({2: ["cat"]}, COCO, references={2: ["A cat on a couch."], 7: ["a dog"]})
    assert truth == {2: {"cat", "couch"}}  # image 7 has no instances: ignored
    m = chair([(2, "A kitten on a sofa.")], truth, COCO).metrics
    assert m["chair_i"] == 0.0 and m["recall"] == 1.0  # the sofa is a couch the references saw


def test_special_cases_change_the_score():
    # "baby elephant" is an elephant, not a hallucinated person; "toilet seat" is not a chair.
    m = chair([(1, "a baby elephant near a toilet seat")], {1: {"elephant", "toilet"}}, COCO).metrics
    assert (m["n_mentions"], m["n_hallucinated"]) == (2, 0)


def test_world_vocabulary():
    world = Vocabulary.from_lines(["circle, disk", "square", "cross, plus sign"])
    m = chair([(1, "Two red disks and a plus sign.")], {1: {"circle"}}, world).metrics
    assert (m["n_mentions"], m["chair_i"], m["chair_s"], m["recall"]) == (2, 0.5, 1.0, 1.0)


def test_ground_truth_outside_the_vocabulary_is_an_error():
    with pytest.raises(ValueError, match="'unicorn' is not a name in the vocabulary"):
        chair([(1, "a dog")], {1: {"unicorn"}}, COCO)


def test_nothing_to_score_is_an_error():
    with pytest.raises(ValueError, match="1 name image ids without ground truth and 1 are empty"):
        chair([(5, "a dog"), (1, "")], {1: {"dog"}}, COCO)


# ---- files -----------------------------------------------------------------------------------


def write_instances(path, objects: dict[int, list[str]]) -> None:
    names = sorted({n for ns in objects.values() for n in ns})
    cat_id = {n: i + 1 for i, n in enumerate(names)}
    io.write_json(path, {
        "images": [{"id": i, "file_name": f"{i:06d}.png"} for i in objects],
        "annotations": [{"id": k, "image_id": i, "category_id": cat_id[n]}
                        for k, (i, n) in enumerate(((i, n) for i, ns in objects.items() for n in ns), start=1)],
        "categories": [{"id": c, "name": n} for n, c in cat_id.items()],
    })


def test_chair_from_files_matches_in_memory(tmp_path):
    write_instances(tmp_path / "instances.json", {1: ["dog", "person", "bicycle", "dog"], 2: ["cat"], 3: []})
    rows = [{"image_id": i, "caption": c} for i, c in CAPTIONS]
    rows[2] = {"image": "000002.png", "text": CAPTIONS[2][1]}  # file name and "text" are accepted
    io.write_jsonl(tmp_path / "captions.jsonl", rows)
    details = tmp_path / "details.jsonl"
    metrics = chair_from_files(tmp_path / "captions.jsonl", tmp_path / "instances.json", details_out=details)
    expected = chair(CAPTIONS, TRUTH, COCO).metrics
    assert metrics == pytest.approx(expected)
    lines = io.read_jsonl(details)
    assert [d["skipped"] for d in lines] == [None, None, None, None, "unknown_image", "empty"]
    assert lines[0]["hallucinated"][0] == {"category": "cat", "text": "cat", "start": 27, "end": 30}
    json.dumps(metrics)  # plain numbers


def test_chair_from_files_with_references_and_a_vocabulary_file(tmp_path):
    write_instances(tmp_path / "instances.json", {1: ["circle"]})
    (tmp_path / "vocab.txt").write_text("circle, disk\nsquare\ncross, plus sign\n")
    io.write_jsonl(tmp_path / "refs.jsonl", [{"image_id": 1, "caption": "a circle and a square"}])
    io.write_jsonl(tmp_path / "caps.jsonl", [{"image_id": "1", "caption": "A disk, a square and a plus sign."}])
    m = chair_from_files(tmp_path / "caps.jsonl", tmp_path / "instances.json",
                         references_jsonl=tmp_path / "refs.jsonl", vocab_file=tmp_path / "vocab.txt")
    # Truth {circle, square} (the square from the reference); 3 mentions, the cross hallucinated.
    assert (m["n_mentions"], m["n_hallucinated"], m["recall"]) == (3, 1, 1.0)


@pytest.mark.parametrize("line2, message", [
    ("{not json", "caps.jsonl:2: not valid JSON"),
    ('{"image_id": 1}', "caps.jsonl:2: needs a string 'caption'"),
    ('{"image_id": "one", "caption": "a dog"}', "caps.jsonl:2: 'image_id' must be an integer"),
    ('{"caption": "a dog"}', "caps.jsonl:2: needs 'image_id'"),
])
def test_unparseable_captions_stop_with_file_and_line(tmp_path, line2, message):
    write_instances(tmp_path / "instances.json", {1: ["dog"]})
    (tmp_path / "caps.jsonl").write_text('{"image_id": 1, "caption": "a dog"}\n' + line2 + "\n")
    with pytest.raises(ValueError, match=message):
        chair_from_files(tmp_path / "caps.jsonl", tmp_path / "instances.json")


def test_annotation_category_outside_the_vocabulary(tmp_path):
    write_instances(tmp_path / "instances.json", {1: ["unicorn"]})
    io.write_jsonl(tmp_path / "caps.jsonl", [{"image_id": 1, "caption": "a dog"}])
    # Without --vocab: the annotations need their own vocabulary, and the flag is named.
    with pytest.raises(ValueError, match=r"instances.json names objects that are not COCO-80 names \('unicorn'\): "
                                         r"pass the vocabulary of these annotations, e.g. --vocab data/world/vocab.txt"):
        chair_from_files(tmp_path / "caps.jsonl", tmp_path / "instances.json")
    # With a vocabulary that lacks the name: that file is the one to extend.
    (tmp_path / "vocab.txt").write_text("dog\n")
    with pytest.raises(ValueError, match="instances.json: 'unicorn' is not a name in the vocabulary"):
        chair_from_files(tmp_path / "caps.jsonl", tmp_path / "instances.json", vocab_file=tmp_path / "vocab.txt")


def test_world_annotations_without_vocab_suggest_the_worlds_vocab_file(tmp_path):
    from fisao.world.config import WorldConfig
    from fisao.world.build import build_world

    world = build_world(tmp_path / "world", WorldConfig(sizes={"train": 4, "val": 2, "test": 3}, pretrain_size=0),
                        progress=False)
    test = world / "test"
    with pytest.raises(ValueError, match=f"e.g. --vocab {world / 'vocab.txt'} ") as e:
        chair_from_files(test / "captions.jsonl", test / "instances.json")
    assert "add it to that file" not in str(e.value)  # not the bundled COCO synonyms


def test_captions_given_as_a_directory_say_so(tmp_path):
    write_instances(tmp_path / "instances.json", {1: ["dog"]})
    with pytest.raises(FileNotFoundError, match=f"{tmp_path} is a directory, not a file"):
        chair_from_files(tmp_path, tmp_path / "instances.json")


def test_an_unwritable_details_path_fails_before_scoring(tmp_path, monkeypatch):
    import fisao.benchmarks.chair as chair_module

    write_instances(tmp_path / "instances.json", {1: ["dog"]})
    io.write_jsonl(tmp_path / "caps.jsonl", [{"image_id": 1, "caption": "a dog"}])
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(chair_module, "chair", lambda *a: pytest.fail("scored before checking --details"))
    with pytest.raises(OSError) as e:
        chair_from_files(tmp_path / "caps.jsonl", tmp_path / "instances.json", details_out=tmp_path / "file" / "d.jsonl")
    assert (e.value.filename, e.value.strerror) == (str(tmp_path / "file" / "d.jsonl"), f"cannot write there: {tmp_path / 'file'} is a file, not a folder")


def test_the_worlds_own_captions_hallucinate_nothing(tmp_path):
    # The world's captions name every object (plurals, synonyms, "plus signs"), and only those:
    # against its own annotations CHAIR must be 0 and recall 1, through the world's vocab.txt.
    from fisao.world.config import WorldConfig
    from fisao.world.build import build_world

    world = build_world(tmp_path / "world", WorldConfig(sizes={"train": 8, "val": 2, "test": 40}, pretrain_size=0, synonym_prob=0.5),
                        progress=False)
    test = world / "test"
    m = chair_from_files(test / "captions.jsonl", test / "instances.json", vocab_file=world / "vocab.txt")
    assert m["n_captions"] == 3 * 40 and m["n_mentions"] > m["n_captions"]
    assert (m["chair_i"], m["chair_s"], m["recall"]) == (0.0, 0.0, 1.0)
