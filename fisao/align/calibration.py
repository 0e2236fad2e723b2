"""Calibration: the "baseline score" that turns verifier scores into rewards.

On a split with ground truth, the policy's own answers are parsed into mentions (the parser
CHAIR uses) and each mention is labelled correct (its object is in the image) or hallucinated.
With s̄c and s̄h the mean verifier scores of each, the baseline is b = (s̄c + s̄h) / 2 and the
width w = (s̄c − s̄h) / 2, so a score at the mean of correct mentions earns +1 and one at the
mean of hallucinated mentions −1. Optionally per class, falling back to the global figures for
a class that lacks either label. AUROC (correct = positive) is the verifier's quality.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from fisao.auroc import auroc
from fisao.benchmarks.mentions import Mention, parse_mentions
from fisao.benchmarks.vocab import Vocabulary


@dataclass(frozen=True)
class Calibration:
    mean_correct: float
    mean_hallucinated: float
    baseline: float
    width: float
    auroc: float
    n_correct: int
    n_hallucinated: int
    per_class: dict[str, tuple[float, float]] = field(default_factory=dict)  # category -> (b, w)

    def thresholds(self, category: str) -> tuple[float, float]:
        """(b, w) for mentions of `category` (its own when calibrated per class, else global)."""
        return self.per_class.get(category, (self.baseline, self.width))

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Calibration":
        data = dict(data)
        data["per_class"] = {k: tuple(v) for k, v in data.get("per_class", {}).items()}
        return cls(**data)


def _baseline(scores: np.ndarray, hallucinated: np.ndarray) -> tuple[float, float, float, float]:
    s_c, s_h = float(scores[~hallucinated].mean()), float(scores[hallucinated].mean())
    return s_c, s_h, (s_c + s_h) / 2, (s_c - s_h) / 2


def calibrate(scores: Sequence[float], hallucinated: Sequence[bool], categories: Sequence[str] | None = None,
              per_class: bool = False) -> Calibration:
    """Baseline and width from labelled mention scores (M,); see the module docstring."""
    s = np.asarray(scores, dtype=np.float64)
    h = np.asarray(hallucinated, dtype=bool)
    if s.shape != h.shape:
        raise ValueError(f"{len(s)} scores but {len(h)} labels")
    n_h = int(h.sum())
    n_c = len(h) - n_h
    if n_c == 0 or n_h == 0:
        raise ValueError(f"calibration needs correct and hallucinated mentions, got {n_c} and {n_h}: "
                         "sample more answers (reward.calibration_images) or use a split with hallucinations")
    s_c, s_h, b, w = _baseline(s, h)
    if w <= 0:
        raise ValueError(f"the verifier scores hallucinated mentions ({s_h:.4f}) no lower than correct ones "
                         f"({s_c:.4f}): it cannot tell them apart, so its rewards would be noise")
    classes: dict[str, tuple[float, float]] = {}
    if per_class:
        if categories is None or len(categories) != len(s):
            raise ValueError("per-class calibration needs one category per score")
        cats = np.asarray(categories)
        for c in sorted(set(categories)):
            sel = cats == c
            if h[sel].all() or not h[sel].any():
                continue  # one label only: the global figures apply
            _, _, bc, wc = _baseline(s[sel], h[sel])
            if wc > 0:
                classes[c] = (bc, wc)
    return Calibration(s_c, s_h, b, w, auroc(s, ~h), n_c, n_h, classes)


def label_mentions(texts: Sequence[str], image_objects: Sequence[set[str]], vocab: Vocabulary,
                   split_glued: bool = False) -> list[tuple[int, Mention, bool]]:
    """(answer index, mention, hallucinated) for every mention of every answer (`parse_mentions`'s,
    glued words split with `split_glued`)."""
    if len(texts) != len(image_objects):
        raise ValueError(f"{len(texts)} answers but ground truth for {len(image_objects)}")
    return [(i, m, m.category not in truth) for i, (text, truth) in enumerate(zip(texts, image_objects))
            for m in parse_mentions(text, vocab, split_glued)]


def histogram_png(scores: Sequence[float], hallucinated: Sequence[bool], calibration: Calibration, path: str | Path,
                  title: str = "verifier scores of the policy's mentions") -> Path:
    """A PNG of both score distributions with the baseline and the ±1 reward points marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = np.asarray(scores, dtype=np.float64)
    h = np.asarray(hallucinated, dtype=bool)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    bins = np.linspace(s.min(), s.max(), 40) if len(s) and s.max() > s.min() else 20
    ax.hist(s[~h], bins=bins, alpha=0.6, color="tab:green", label=f"correct (n={int((~h).sum())})")
    ax.hist(s[h], bins=bins, alpha=0.6, color="tab:red", label=f"hallucinated (n={int(h.sum())})")
    ax.axvline(calibration.baseline, color="black", lw=1.5, label=f"baseline b={calibration.baseline:.3f}")
    for x in (calibration.mean_correct, calibration.mean_hallucinated):
        ax.axvline(x, color="grey", lw=1, ls="--")
    ax.set_xlabel("cos(image, 'a photo of a {object}.')")
    ax.set_ylabel("mentions")
    ax.set_title(f"{title}\nAUROC {calibration.auroc:.3f}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path
