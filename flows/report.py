"""Print a campaign's summary as a table people can read at a glance."""
from __future__ import annotations


def table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(h) for h in headers]] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def print_summary(summary: dict) -> None:
    stages = summary["stages"]
    print()
    print(table(["stage", "seconds", "cached"], [[k, v["seconds"], "yes" if v["cached"] else "no"] for k, v in stages.items()]))
    print()
    print(f"world: {summary['world']['path']} ({summary['world']['action']}, data md5 {summary['world']['md5']})")
    clip = summary["clip"].get("figures")
    if clip is not None:  # the world's built CLIP (a real verifier comes as it is)
        print(f"CLIP object-name AUROC: val {clip.get('val_auroc', float('nan')):.3f}, test {clip.get('test_auroc', float('nan')):.3f}")
    print(f"base LLaVA: {summary['llava']['path']}")
    cal = summary.get("calibration")
    if cal:
        f = cal["figures"]
        print(f"verifier on the base model's own mentions: AUROC {f['auroc']:.3f} "
              f"({f['mentions']} mentions, {f['hallucinated_share']:.0%} hallucinated); histogram {cal['path']}/scores.png")
    print()
    print(rounds_table(summary["rounds"]))
    print()
    for k, path in enumerate(summary.get("checkpoints", [])):
        print(f"{'base' if k == 0 else f'round {k}'} checkpoint: {path}")
    if "summary_path" in summary:
        print(f"summary (machine-readable): {summary['summary_path']}   total {summary['seconds']:.0f}s")
    print()
    print("Compare runs: make mlflow-ui  (or: mlflow ui --backend-store-uri sqlite:///mlflow.db), then open http://127.0.0.1:5000")


ROUND_COLUMNS = ("chair_s", "chair_i", "recall", "len", "pope_random_f1", "pope_popular_f1", "pope_adversarial_f1",
                 "score/reward_mean", "update/kl", "seconds/round")
HEADERS = {"score/reward_mean": "reward", "update/kl": "kl", "seconds/round": "train_s"}


def rounds_table(rounds: list[dict]) -> str:
    rows = [["base" if k == 0 else f"round {k}", *[m.get(c, "-") for c in ROUND_COLUMNS]] for k, m in enumerate(rounds)]
    return table(["model", *[HEADERS.get(c, c) for c in ROUND_COLUMNS]], rows)
