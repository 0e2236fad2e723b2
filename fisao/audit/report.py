"""Write a round's audit directory: per-token rollouts, figures and the HTML report.

    out/tokens.jsonl   every rollout with per-token rewards (fisao.audit.tokens)
    out/rewards.png    histogram of the round's mention rewards
    out/curves.png     metrics across rounds 0..k
    out/report.html    a few rollouts coloured by reward, the facts and both figures
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from fisao import io
from fisao.audit.html import render_report
from fisao.audit.plots import metric_curves_png, reward_histogram_png
from fisao.audit.tokens import pick_examples, token_rows

TOKENS = "tokens.jsonl"
HISTOGRAM = "rewards.png"
CURVES = "curves.png"
REPORT = "report.html"


def write_round_report(rollouts_dir: str | Path, scores_dir: str | Path, tokenizer_dir: str | Path,
                       rounds: Sequence[dict], facts: dict[str, str], title: str, out: str | Path,
                       examples: int = 6) -> Path:
    """Build the audit directory `out` atomically; `rounds` are the metrics of rounds 0..k."""
    rows = token_rows(rollouts_dir, scores_dir, tokenizer_dir)
    mentions = [m for r in rows for m in r["mentions"]]
    with io.atomic_dir(out) as tmp:
        io.write_jsonl(tmp / TOKENS, rows)
        reward_histogram_png([m["reward"] for m in mentions], [m["hallucinated"] for m in mentions], tmp / HISTOGRAM,
                             title=f"{title}: mention rewards")
        metric_curves_png(rounds, tmp / CURVES, title=f"{title}: metrics across rounds")
        page = render_report(title, facts, rounds[-1], pick_examples(rows, examples),
                             {"mention rewards": tmp / HISTOGRAM, "metrics across rounds": tmp / CURVES})
        io.atomic_write_text(tmp / REPORT, page)
    return Path(out)
