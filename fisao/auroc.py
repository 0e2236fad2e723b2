"""Area under the ROC curve, the verifier's quality figure."""
from __future__ import annotations

import numpy as np


def auroc(scores, labels) -> float:
    """P(score of a random positive > score of a random negative), ties counting one half.

    scores: (N,) floats; labels: (N,) bools (True = positive). Computed from average ranks
    (the Mann-Whitney U statistic), O(N log N). Raises ValueError without both classes or on
    a NaN or infinite score.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.shape} vs {y.shape}")
    if not np.isfinite(s).all():
        bad = np.flatnonzero(~np.isfinite(s))
        raise ValueError(f"AUROC needs finite scores; {len(bad)} are not (first at index {bad[0]}: {s[bad[0]]})")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUROC needs positives and negatives, got {n_pos} and {n_neg}")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    # Tied scores share the mean of their ranks: run r holds 1-based ranks starts[r] + 1 .. ends[r].
    new_run = np.r_[True, sorted_s[1:] != sorted_s[:-1]]
    starts = np.flatnonzero(new_run)
    ends = np.r_[starts[1:], len(s)]
    ranks = np.empty(len(s), dtype=np.float64)
    ranks[order] = ((starts + ends + 1) / 2.0)[np.cumsum(new_run) - 1]
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))
