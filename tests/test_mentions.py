"""The vocabulary loader and the object-mention parser: categories, spans, CHAIR's special cases."""
from __future__ import annotations

import re

import pytest

from fisao.benchmarks.mentions import Mention, count_words, glued_words, mentioned_categories, parse_mentions
from fisao.benchmarks.vocab import Vocabulary

COCO = Vocabulary.coco()
WORLD_LINES = ["circle, disk", "square", "cross, plus sign", "diamond, rhombus", "moon, crescent"]


@pytest.fixture(scope="module")
def world() -> Vocabulary:
    return Vocabulary.from_lines(WORLD_LINES, source="world")


def spans(text: str, vocab: Vocabulary) -> list[tuple[str, str, int, int]]:
    return [(m.category, m.text, m.start, m.end) for m in parse_mentions(text, vocab)]


# ---- the vocabulary file -------------------------------------------------------------------


def test_world_vocabulary_file_format(tmp_path, world):
    path = tmp_path / "vocab.txt"
    path.write_text("circle, disk\n\ncross,  plus sign \nmoon, crescent\n")
    vocab = Vocabulary.from_file(path)
    assert vocab.categories == ("circle", "cross", "moon")
    assert vocab.category_of("disk") == "circle"
    assert vocab.category_of("Plus  Sign") == "cross"  # case and spacing ignored
    assert vocab.category_of("plus") is None
    assert vocab.names_of("cross") == ("cross", "plus sign")
    assert vocab.max_words == 2


def test_coco_vocabulary_ships_with_the_package():
    assert len(COCO.categories) == 80
    assert COCO.categories[0] == "person" and COCO.categories[-1] == "toothbrush"
    assert COCO.category_of("teddybear") == "teddy bear"
    assert COCO.max_words == 3  # "stove top oven"
    # The authors' file has " motor bike" and " cheesecake" with a stray leading space and
    # "iPhone" capitalised; we strip and lowercase them so they match.
    assert COCO.category_of("motor bike") == "motorcycle"
    assert COCO.category_of("cheesecake") == "cake"
    assert COCO.category_of("iphone") == "cell phone"


@pytest.mark.parametrize("lines, message", [
    (["circle, disk", "cross,, plus sign"], "vocab.txt:2: name #2"),
    (["circle, disk", "", "cross, plus sign,"], "vocab.txt:3: name #3"),
    (["circle, disk", "square, disk"], "vocab.txt:2: 'disk' is already a name of 'circle' (line 1)"),
    (["circle", "# a comment", "circle, round"], None),  # a category may repeat on its own lines
    (["", "# only comments"], "defines no category"),
])
def test_bad_vocabulary_file_names_file_and_line(tmp_path, lines, message):
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(lines) + "\n")
    if message is None:
        assert Vocabulary.from_file(path).category_of("round") == "circle"
        return
    with pytest.raises(ValueError, match=re.escape(message)):
        Vocabulary.from_file(path)


def test_missing_vocabulary_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        Vocabulary.from_file(tmp_path / "nope.txt")


def test_canonical_rejects_unknown_names(world):
    assert world.canonical("Rhombus") == "diamond"
    with pytest.raises(ValueError, match="'hexagon' is not a name in the vocabulary world"):
        world.canonical("hexagon")


# ---- spans, plurals, synonyms, multi-word names --------------------------------------------


def test_plural_span_covers_exactly_the_word(world):
    text = "two red circles."
    # "two red " is 8 characters, "circles" ends at 8 + 7 = 15; the full stop is not in it.
    assert parse_mentions(text, world) == [Mention("circle", "circles", 8, 15)]


def test_synonyms_and_multi_word_names_map_to_their_category(world):
    text = "Two Plus Signs, a disk and a crescent."
    # "Two " = 4 -> "Plus Signs" is [4, 14); "Two Plus Signs, a " = 18 -> "disk" is [18, 22);
    # "... disk and a " adds 4 + 7 -> "crescent" is [29, 37).
    assert spans(text, world) == [
        ("cross", "Plus Signs", 4, 14), ("circle", "disk", 18, 22), ("moon", "crescent", 29, 37),
    ]


def test_every_span_is_the_surface_text(world):
    text = "A  big\tDISK, three rhombuses;two squares!"
    found = parse_mentions(text, world)
    assert [m.category for m in found] == ["circle", "diamond", "square"]
    assert all(text[m.start:m.end] == m.text for m in found)
    assert [m.text for m in found] == ["DISK", "rhombuses", "squares"]


def test_duplicates_are_kept_in_text_order(world):
    assert mentioned_categories("a circle, a square and another circle", world) == ["circle", "square", "circle"]


def test_longest_name_wins():
    assert mentioned_categories("A hot dog next to a dog.", COCO) == ["hot dog", "dog"]
    assert mentioned_categories("Two teddy bears and a bear.", COCO) == ["teddy bear", "bear"]
    assert mentioned_categories("traffic lights, stop signs", COCO) == ["traffic light", "stop sign"]
    # Three words: one oven (the authors' code counts "stove" and "oven": see mentions.py).
    assert spans("a stove top oven", COCO) == [("oven", "stove top oven", 2, 16)]


def test_plural_inside_a_multi_word_name():
    assert spans("Wine glasses and sports balls", COCO) == [
        ("wine glass", "Wine glasses", 0, 12), ("sports ball", "sports balls", 17, 29),
    ]


def test_case_and_punctuation_do_not_matter():
    assert mentioned_categories("DOGS, cats; (Hot Dogs)! a man's bike.", COCO) == [
        "dog", "cat", "hot dog", "person", "bicycle",
    ]


def test_words_are_tried_as_written_before_singularising():
    # inflect (like pattern.en) turns "bus" into "bu"; the word as written is a name, so it counts.
    assert mentioned_categories("a bus and two buses", COCO) == ["bus", "bus"]
    assert mentioned_categories("people and children", COCO) == ["person", "person"]


def test_every_coco_category_name_is_found():
    for category in COCO.categories:
        assert mentioned_categories(f"There is a {category} here.", COCO) == [category], category


def test_hyphenated_words_stay_whole():
    # As in nltk.word_tokenize: "dog-friendly" is one word, not a dog.
    assert mentioned_categories("a dog-friendly park", COCO) == []


def test_no_mentions():
    assert parse_mentions("", COCO) == []
    assert parse_mentions("A sunny day in the park.", COCO) == []


# ---- the CHAIR authors' special cases ------------------------------------------------------


def test_baby_and_adult_animals_are_the_animal_not_a_person():
    assert spans("a baby elephant", COCO) == [("elephant", "baby elephant", 2, 15)]
    assert mentioned_categories("two adult giraffes and a baby", COCO) == ["giraffe", "person"]
    # "baby animal" names no COCO object, but it still hides "baby" (not a person).
    assert mentioned_categories("a baby animal", COCO) == []


def test_passenger_vehicles_are_not_people():
    assert spans("A passenger jet.", COCO) == [("airplane", "passenger jet", 2, 15)]
    assert mentioned_categories("a passenger train and a passenger", COCO) == ["train", "person"]


def test_toilet_seat_is_a_toilet_not_a_chair():
    assert spans("a toilet seat", COCO) == [("toilet", "toilet seat", 2, 13)]
    # Any "toilet" in the text drops every "seat" (the authors' rule), plural or not.
    assert mentioned_categories("the seat of the toilet and two seats", COCO) == ["toilet"]
    assert mentioned_categories("a seat by the window", COCO) == ["chair"]


def test_bow_tie_and_home_plate():
    assert spans("a bow tie", COCO) == [("tie", "bow tie", 2, 9)]
    assert mentioned_categories("home plate", COCO) == []


def test_count_words_ignores_punctuation():
    assert count_words("Two red circles, and a plus-sign!") == 6  # two red circles and a plus-sign


# ---- glued words: the reward's reading ---------------------------------------------------------

def test_glued_words_hide_a_mention_from_chair_but_not_from_the_reward_reading(world):
    # What policies wrote after a round (docs/method.md): an answer word glued onto the last object.
    text = "a red circle and a green squareNo. The redNo."
    assert mentioned_categories(text, world) == ["circle"]  # CHAIR's reading: "squareNo" is no word it knows
    # "a red circle and a green " is 25 characters: "square" is [25, 31), its glued "No" [31, 33).
    assert parse_mentions(text, world, split_glued=True) == [Mention("circle", "circle", 6, 12),
                                                              Mention("square", "square", 25, 31)]
    assert glued_words(text) == ["squareNo", "redNo"]


def test_glue_points_are_case_changes_and_digits_only(world):
    # A capital after a lowercase letter, or digits against letters, split a word; nothing else does.
    assert [m.text for m in parse_mentions("two Squares, disk2 and 3crescents", world, split_glued=True)] == [
        "Squares", "disk", "crescents"]
    assert [m.text for m in parse_mentions("plus signYes", world, split_glued=True)] == ["plus sign"]
    for text in ("A Circle, SQUARES and plus-signs.", "two circles", ""):
        assert glued_words(text) == []
        assert parse_mentions(text, world, split_glued=True) == parse_mentions(text, world)
    assert glued_words("moonYesNo circle star2") == ["moonYesNo", "star2"]
