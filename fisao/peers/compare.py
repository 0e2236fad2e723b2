"""The side-by-side's arithmetic (bench/peers.py): per-round curves over seeds, the learning rate
picked on val, what each method's campaign sets, and the curves' plot. No TRL, Prefect or MLflow
here.

Four methods from the same base models, verifier and calibration (issue 14):
- `fisao`: the config as it is (token-level rewards, PPO);
- `fisao-sentence`: the config with `reward.level: sentence` (configs/ablation-sentence.yaml);
- `trl-grpo`: `fisao.peers.grpo.grpo_round`; `csr-dpo`: `fisao.peers.csr.csr_round`.
A training seed s sets `rollout.seed` and `ppo.seed`, as `fisao sweep` does (fisao/sweep.py).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

METHODS = ("fisao", "fisao-sentence", "trl-grpo", "csr-dpo")
FISAO_METHODS = {"fisao": {}, "fisao-sentence": {"reward.level": "sentence"}}  # method -> its config overrides
PEER_METHODS = ("trl-grpo", "csr-dpo")
CURVES = ("chair_s", "chair_i", "recall", "pope_adversarial_f1")
LRS = (5e-4, 1e-3, 2e-3)
# A learning rate whose last round loses more recall than this against the base is not picked on val
# while another keeps it (the recall target: within 2 points).
RECALL_DROP = 0.02
PLOTTED = (("chair_i", "CHAIR_i (lower is better)"), ("recall", "recall"),
           ("pope_adversarial_f1", "POPE adversarial F1"))


def seed_overrides(seed: int) -> dict:
    """What training seed `seed` sets: rollout sampling (and calibration answers) and the update's order."""
    return {"rollout.seed": seed, "ppo.seed": seed}


def campaign_name(prefix: str, method: str, seed: int, lr: float, default_lr: float, split: str = "test") -> str:
    """`{prefix}-{method}-s{seed}`, with `-lr{lr}` when lr is not the config's and `-val` on the val split."""
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {', '.join(METHODS)}")
    name = f"{prefix}-{method}-s{seed}"
    if lr != default_lr:
        name += f"-lr{lr:g}"
    return name + ("-val" if split == "val" else "")


def curves(runs: Sequence[Sequence[dict]], keys: Sequence[str] = CURVES) -> dict[str, list]:
    """Per-round mean and sample std (n − 1) over seeds of each key.

    runs: one list per seed of round metrics (index 0 the base model), all of the same length.
    Returns {key: [mean per round], key_std: [std per round, None with fewer than two seeds]}.
    """
    if not runs:
        raise ValueError("no runs to average: give at least one seed's rounds")
    lengths = {len(r) for r in runs}
    if len(lengths) != 1:
        raise ValueError(f"the seeds have different numbers of rounds ({sorted(lengths)}): run them to the same count")
    out: dict[str, list] = {}
    for key in keys:
        means, stds = [], []
        for k in range(len(runs[0])):
            values = [float(r[k][key]) for r in runs]
            mean = sum(values) / len(values)
            means.append(mean)
            stds.append(math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None)
        out[key], out[f"{key}_std"] = means, stds
    return out


def pick_lr(results: dict[float, Sequence[dict]], recall_drop: float = RECALL_DROP) -> float:
    """The learning rate whose last round has the lowest CHAIR_i (on val), among those whose recall
    stays within `recall_drop` of the base's; when none does, the one that keeps the most recall.

    results: lr -> that run's round metrics (index 0 the base model, the same for every lr). Ties
    go to the smaller learning rate.
    """
    if not results:
        raise ValueError("no learning rates to pick from: give at least one run")
    kept = [lr for lr, rounds in results.items() if rounds[0]["recall"] - rounds[-1]["recall"] <= recall_drop]
    if kept:
        return min(kept, key=lambda lr: (results[lr][-1]["chair_i"], lr))
    return min(results, key=lambda lr: (-results[lr][-1]["recall"], lr))


def plot(result: dict, path: Path) -> Path:
    """Per-round curves of every method (mean over seeds, ± std when there are several) as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PLOTTED), figsize=(4.4 * len(PLOTTED), 3.8))
    for ax, (key, title) in zip(axes, PLOTTED):
        for (method, figures), marker, size in zip(result["methods"].items(), "osD^", (9, 7, 5, 4)):
            mean, std = figures[key], figures[f"{key}_std"]
            x = list(range(len(mean)))
            ax.plot(x, mean, marker=marker, markersize=size, label=method)  # sizes keep equal curves visible
            if all(s is not None for s in std):
                ax.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.15)
            ax.set_xticks(x)
        ax.set_xlabel("round (0 = base model)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"world {result['world']}, seeds {','.join(map(str, result['seeds']))}, {result['split']} split")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
