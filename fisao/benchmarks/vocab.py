"""Object vocabularies: canonical categories and the names that refer to them.

A vocabulary file has the format of the CHAIR authors' COCO synonyms (LisaAnne/Hallucination,
`data/synonyms.txt`): one category per line, `category, synonym, synonym, ...`; the first name
is the canonical category. Names may have several words ("traffic light", "plus sign"). The
COCO-80 file ships with the package (`Vocabulary.coco()`); the shapes world writes its own
(`data/world/vocab.txt`), so one loader serves both.

Departures from the authors' reader (`s.strip().split(', ')`), all deliberate:
- names are split on ',' and stripped, and runs of spaces inside a name collapse to one. The
  authors' split keeps a stray leading space (" motor bike", " cheesecake" in their file), so
  their code can never match those two names; we match them (as motorcycle and cake).
- names are lowercased. The authors lowercase captions but not the file, so their "iPhone" can
  never match; ours matches "iphone" as cell phone.
- blank lines and lines starting with '#' are skipped (our shipped copy carries a NOTICE
  header); an empty name (",,", a trailing comma) or a name listed under two categories is an
  error naming the file and line, where the authors' dictionary would let the last line win.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Iterable, Mapping

# A word: a run of letters or digits, joined across inner hyphens ("hot-dog" stays one word, as
# in nltk.word_tokenize, which the CHAIR authors use). Everything else separates words.
WORD_RE = re.compile(r"[^\W_]+(?:-[^\W_]+)*")

COCO_FILE = "coco_synonyms.txt"


def words(text: str) -> tuple[str, ...]:
    """The lowercased words of `text` ("Traffic  Light!" -> ("traffic", "light"))."""
    return tuple(m.group().lower() for m in WORD_RE.finditer(text))


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: usable as a cache key
class Vocabulary:
    """Canonical categories (file order) and every name, as a tuple of words, mapped to its category.

    Build one with `from_file`, `from_lines` or `coco()`; the constructor takes the already
    normalised tables.
    """

    categories: tuple[str, ...]
    phrases: Mapping[tuple[str, ...], str] = field(repr=False)  # ("plus", "sign") -> "cross"
    source: str = "<memory>"

    @functools.cached_property
    def max_words(self) -> int:
        """The most words any name has (the parser never looks further ahead)."""
        return max(len(p) for p in self.phrases)

    def names_of(self, category: str) -> tuple[str, ...]:
        """Every name of `category`, the canonical one first."""
        if category not in self.categories:
            raise ValueError(f"{category!r} is not a category of {self.source}")
        return tuple(" ".join(p) for p, c in self.phrases.items() if c == category)

    def category_of(self, name: str) -> str | None:
        """The category `name` refers to (case and spacing ignored, no singularising), or None."""
        return self.phrases.get(words(name))

    def canonical(self, name: str) -> str:
        """Like `category_of`, but an unknown name is a ValueError naming the vocabulary."""
        category = self.category_of(name)
        if category is None:
            raise ValueError(
                f"{name!r} is not a name in the vocabulary {self.source}; add it to that file "
                "(as a category line or as a synonym on its category's line)"
            )
        return category

    @classmethod
    def from_lines(cls, lines: Iterable[str], source: str = "<memory>") -> "Vocabulary":
        """Parse `category, synonym, ...` lines; errors name `source` and the line number."""
        categories: list[str] = []
        phrases: dict[tuple[str, ...], str] = {}
        where: dict[tuple[str, ...], int] = {}  # phrase -> line that defined it
        for lineno, line in enumerate(lines, start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            names = [words(part) for part in line.split(",")]
            empty = [i for i, n in enumerate(names) if not n]
            if empty:
                raise ValueError(
                    f"{source}:{lineno}: name #{empty[0] + 1} of {line.strip()!r} is empty or has no "
                    "letters; write `category, synonym, ...` with a name between every two commas"
                )
            category = " ".join(names[0])
            for name in names:
                owner = phrases.get(name)
                if owner is not None and owner != category:
                    raise ValueError(
                        f"{source}:{lineno}: {' '.join(name)!r} is already a name of {owner!r} "
                        f"(line {where[name]}); a name may belong to one category only"
                    )
                phrases[name] = category
                where.setdefault(name, lineno)
            if category not in categories:
                categories.append(category)
        if not categories:
            raise ValueError(f"{source} defines no category; expected lines like `cross, plus sign`")
        return cls(tuple(categories), MappingProxyType(phrases), source)

    @classmethod
    def from_file(cls, path: str | Path) -> "Vocabulary":
        """Load a vocabulary file (`category, synonym, ...` per line)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"vocabulary file {path} does not exist; pass a `category, synonym, ...` file "
                "(the world writes data/world/vocab.txt) or use Vocabulary.coco()"
            )
        return cls.from_lines(path.read_text(encoding="utf-8").splitlines(), source=str(path))

    @classmethod
    def coco(cls) -> "Vocabulary":
        """The 80 COCO categories with the CHAIR authors' synonyms (shipped with the package)."""
        return _coco()


@functools.lru_cache(maxsize=1)
def _coco() -> Vocabulary:
    text = resources.files("fisao.benchmarks").joinpath("data", COCO_FILE).read_text(encoding="utf-8")
    return Vocabulary.from_lines(text.splitlines(), source=f"fisao/benchmarks/data/{COCO_FILE}")
