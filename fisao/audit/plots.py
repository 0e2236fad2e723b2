"""The report's figures as PNG files (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def reward_histogram_png(rewards: Sequence[float], hallucinated: Sequence[bool], path: str | Path,
                         title: str = "mention rewards") -> Path:
    """Histogram of the round's mention rewards, split by what ground truth says (audit only)."""
    plt = _pyplot()
    r = np.asarray(rewards, dtype=np.float64)
    h = np.asarray(hallucinated, dtype=bool)
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    bins = np.linspace(-1, 1, 21)
    ax.hist([r[~h], r[h]], bins=bins, stacked=True, color=["tab:green", "tab:red"],
            label=[f"correct (n={int((~h).sum())})", f"hallucinated (n={int(h.sum())})"])
    ax.set_xlabel("mention reward")
    ax.set_ylabel("mentions")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, plt, path)


CURVES = (("chair_i", "CHAIR_i"), ("chair_s", "CHAIR_s"), ("recall", "recall"),
          ("pope_adversarial_f1", "POPE adv. F1"), ("score/reward_mean", "mean reward"), ("update/kl", "KL"))


def metric_curves_png(rounds: Sequence[dict], path: str | Path, title: str = "metrics across rounds") -> Path:
    """One small panel per metric of `CURVES`, rounds on x (round 0 is the base model)."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(9, 4.8), dpi=100)
    for ax, (key, label) in zip(axes.flat, CURVES):
        points = [(k, m[key]) for k, m in enumerate(rounds) if key in m]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", color="tab:blue")
        ax.set_title(label, fontsize=9)
        ax.set_xticks(range(len(rounds)))
        ax.set_xlabel("round", fontsize=8)
        ax.tick_params(labelsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, plt, path)


def _save(fig, plt, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path
