"""Find the objects a text mentions: the parser CHAIR counts with and the verifier rewards.

`parse_mentions(text, vocab)` returns every mention in text order (an object named twice is two
mentions), each with its canonical category and the character span of its words in the original
text, so later code can map a mention onto tokenizer offsets.

`parse_mentions(text, vocab, split_glued=True)` is the reward's reading: a word is also split
where a token was glued onto it ("a green starNo": "star" + "No", see `GLUE_RE`), which CHAIR's
reading (and the authors' tokenizer) takes as one unknown word. One PPO update can put an answer
word where a name or a full stop belongs (measured: 166 of 200 greedy descriptions after one
round, the rollouts' KL to the reference at 15-20 nats); read the CHAIR way, the glued names
then escaped the verifier's reward, hallucinated or not, so the next update could not push them
down (docs/method.md, "Glued words"). `glued_words(text)` lists such words, so an evaluation can
report how often a policy writes them.

How a text is read, following the CHAIR authors' `caption_to_words` (LisaAnne/Hallucination,
utils/chair.py):
1. Split into words (letters/digits, inner hyphens kept: `vocab.WORD_RE`), lowercased; all
   punctuation separates words and is otherwise ignored.
2. Left to right, at each word take the longest phrase that is a vocabulary name or one of the
   authors' two-word rules (`CHAIR_PHRASES`); a rule wins a tie. Each word may match as written
   or singularised ("hot dogs" -> "hot dog"). Matched words are consumed.
3. The rules: "baby <animal>" / "adult <animal>" count as the animal, not as a person;
   "passenger jet" / "passenger train" as the vehicle; "toilet seat" as a toilet; "bow tie" as a
   tie; "home plate" as nothing (it hides "plate"). If the text contains the word "toilet",
   every "seat" is dropped (a toilet's seat is not a chair).
4. Names map to their category through the vocabulary.

Where we cannot match the authors' code exactly, and why:
- Singularising. They call pattern.en.singularize on every word; pattern is unmaintained and
  does not install here, so we use inflect (pinned, no data download). To make the difference
  harmless we first try a word as written and only then singularised. pattern strips a final
  "s" from singular words ("bus" -> "bu", "glass" -> "glas") and mangles a few plurals ("ties"
  -> "ty", "canoes" -> "cano"), so their code never counts a singular "bus"/"minibus"/"airbus",
  nor "ties" or "canoes"; ours does. Their 'wine glas' rule exists only to undo pattern's
  "glass" -> "glas"; we need no such rule.
- Longest match. Their pass joins only the pairs on a fixed list of COCO double words; we
  match every multi-word name of the vocabulary ("plus sign" in the world), longest first.
  On COCO the results differ in two places: "dining table" is one mention either way (they
  count its word "table"), and "stove top oven" is one oven for us, two for them ("stove",
  "oven"). The list's entries that are not COCO names ("home plate") are kept as rules.
- Tokens. nltk.word_tokenize and our word pattern agree on ordinary prose (both split "dog's"
  into "dog" + a suffix, both keep "hot-dog" whole); rare punctuation (slashes, odd quotes) may
  split differently.
- The rules apply with any vocabulary; they only ever change what a text mentions when the
  vocabulary has the words involved (baby, adult, passenger, seat, plate, ...).
- Later variants (Maxlinn/CHAIR-metric-standalone, OPERA) add "train track" to the double
  words, so "train tracks" is not a train there; we follow the original, where it is.
"""
from __future__ import annotations

import functools
import itertools
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fisao.benchmarks.vocab import WORD_RE, Vocabulary, words

if TYPE_CHECKING:
    import inflect

_ANIMALS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal", "cub")

# The CHAIR authors' two-word rules: phrase -> the name it counts as (looked up in the vocabulary;
# a name the vocabulary lacks means the phrase mentions nothing but still consumes its words).
CHAIR_PHRASES: dict[tuple[str, ...], str] = {
    **{("baby", a): a for a in _ANIMALS},
    **{("adult", a): a for a in _ANIMALS},
    ("passenger", "jet"): "jet",
    ("passenger", "train"): "train",
    ("toilet", "seat"): "toilet",
    ("bow", "tie"): "tie",
    ("home", "plate"): "home plate",
}


@dataclass(frozen=True)
class Mention:
    """One object mention: `text[start:end] == self.text` in the parsed text (end exclusive)."""

    category: str  # canonical category ("cross" for "plus signs")
    text: str  # the words as written ("plus signs")
    start: int
    end: int


@functools.lru_cache(maxsize=1)
def _engine() -> "inflect.engine":
    import inflect  # imported on first use: importing inflect takes seconds

    return inflect.engine()


@functools.lru_cache(maxsize=200_000)
def singular(word: str) -> str:
    """The singular of a lowercased word ("circles" -> "circle"); the word itself if none."""
    if not any(ch.isalpha() for ch in word):
        return word
    result = _engine().singular_noun(word)
    return result if result else word  # inflect answers False for singulars, "" for "s"


def _forms(word: str) -> tuple[str, ...]:
    """A word as written, then singularised (when that differs)."""
    s = singular(word)
    return (word,) if s == word else (word, s)


def _match(forms: list[tuple[str, ...]], i: int, vocab: Vocabulary) -> tuple[int, str | None, str]:
    """The longest phrase starting at word `i`: (number of words, category or None, name it counts as).

    (0, None, "") when nothing matches.
    """
    longest = min(max(vocab.max_words, 2), len(forms) - i)
    for n in range(longest, 0, -1):
        # Forms as written come first in the product, so "glasses" prefers a name "glasses".
        candidates = list(itertools.product(*forms[i : i + n]))
        if n == 2:
            for key in candidates:
                if key in CHAIR_PHRASES:
                    name = CHAIR_PHRASES[key]
                    return n, vocab.phrases.get(words(name)), name
        for key in candidates:
            category = vocab.phrases.get(key)
            if category is not None:
                return n, category, " ".join(key)
    return 0, None, ""


# Where a word holds two glued together: a lowercase letter followed by a capital ("starNo"), or
# letters next to digits ("star2"). Neither occurs inside an English word of a caption.
GLUE_RE = re.compile(r"(?<=[a-z])(?=[A-Z])|(?<=[A-Za-z])(?=[0-9])|(?<=[0-9])(?=[A-Za-z])")


def _word_spans(text: str, split_glued: bool) -> list[tuple[int, int]]:
    """(start, end) of every word of `text`; with `split_glued`, glued words in their parts."""
    spans = []
    for m in WORD_RE.finditer(text):
        if not split_glued:
            spans.append((m.start(), m.end()))
            continue
        cuts = [m.start()] + [m.start() + g.start() for g in GLUE_RE.finditer(m.group()) if g.start()] + [m.end()]
        spans.extend((a, b) for a, b in zip(cuts, cuts[1:]) if a < b)
    return spans


def word_loops(text: str, times: int = 4) -> list[str]:
    """The words that `text` writes `times` times or more in a row ("a yellow yellow yellow yellow"),
    case-insensitive, once per run, in order: the policy looping on one word where a name belongs."""
    words = [m.group().lower() for m in WORD_RE.finditer(text)]
    out, run = [], 1
    for i in range(1, len(words) + 1):
        if i < len(words) and words[i] == words[i - 1]:
            run += 1
            continue
        if run >= times:
            out.append(words[i - 1])
        run = 1
    return out


def glued_words(text: str) -> list[str]:
    """The words of `text` (as CHAIR reads them) that hold a glue point (`GLUE_RE`), in order."""
    return [m.group() for m in WORD_RE.finditer(text) if any(g.start() for g in GLUE_RE.finditer(m.group()))]


def parse_mentions(text: str, vocab: Vocabulary, split_glued: bool = False) -> list[Mention]:
    """Every object mention in `text`, in order, duplicates kept (see the module docstring).

    `split_glued`: also split words at glue points (the reward's reading); False is CHAIR's.
    """
    spans = _word_spans(text, split_glued)
    forms = [_forms(text[a:b].lower()) for a, b in spans]
    found: list[tuple[Mention, str]] = []  # (mention, the name it counts as)
    unit_words: set[str] = set()  # what each word or phrase counts as, for the toilet rule
    i = 0
    while i < len(spans):
        n, category, name = _match(forms, i, vocab)
        if n == 0:
            unit_words.add(forms[i][-1])
            i += 1
            continue
        unit_words.add(name)
        if category is not None:
            start, end = spans[i][0], spans[i + n - 1][1]
            found.append((Mention(category, text[start:end], start, end), name))
        i += n
    if "toilet" in unit_words:
        found = [(m, name) for m, name in found if name != "seat"]
    return [m for m, _ in found]


def mentioned_categories(text: str, vocab: Vocabulary) -> list[str]:
    """The categories of `parse_mentions(text, vocab)`, in order, duplicates kept."""
    return [m.category for m in parse_mentions(text, vocab)]


def count_words(text: str) -> int:
    """Number of words in `text`, as the parser splits them (punctuation is not a word)."""
    return sum(1 for _ in WORD_RE.finditer(text))
