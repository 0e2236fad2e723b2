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
from fisao.audit.files import REPORT
from fisao.audit.html import render_report
from fisao.audit.plots import metric_curves_png, reward_histogram_png
from fisao.audit.tokens import pick_examples, token_rows

TOKENS = "tokens.jsonl"
HISTOGRAM = "rewards.png"
CURVES = "curves.png"


def histogram_caption(repeats: str) -> str:
    """The reward histogram's caption: what a mention reward is and, under the "first" repeat rule,
    why so many sit at exactly 0."""
    text = ("Every mention in this round's rollouts by its reward, clamp((s - b) / w, -1, 1) of the verifier's "
            "score s with the calibration's b and w; green if ground truth says the object is in the image, red if "
            "it is hallucinated (the audit's view, never used in the reward).")
    if repeats == "first":
        text += (" The spike at 0: a repeated mention of an object keeps min(reward, 0), so every correct repeat "
                 "lands at exactly 0.")
    return text


def write_round_report(rollouts_dir: str | Path, scores_dir: str | Path, tokenizer_dir: str | Path,
                       rounds: Sequence[dict], facts: dict[str, str], title: str, out: str | Path,
                       examples: int = 6, repeats: str = "first") -> Path:
    """Build the audit directory `out` atomically; `rounds` are the metrics of rounds 0..k (0 the base
    model), `repeats` the campaign's `reward.repeats` (the report explains what it does to repeats)."""
    rows = token_rows(rollouts_dir, scores_dir, tokenizer_dir)
    mentions = [m for r in rows for m in r["mentions"]]
    with io.atomic_dir(out) as tmp:
        io.write_jsonl(tmp / TOKENS, rows)
        reward_histogram_png([m["reward"] for m in mentions], [m["hallucinated"] for m in mentions], tmp / HISTOGRAM,
                             title=f"{title}: mention rewards")
        metric_curves_png(rounds, tmp / CURVES, title=f"{title}: metrics across rounds")
        captions = {"mention rewards": histogram_caption(repeats),
                    "metrics across rounds": "The headline benchmarks and the round's reward and KL; round 0 is "
                                             "the base model."}
        page = render_report(title, facts, rounds[-1], pick_examples(rows, examples),
                             {"mention rewards": tmp / HISTOGRAM, "metrics across rounds": tmp / CURVES},
                             base=rounds[0] if len(rounds) > 1 else None, captions=captions, repeats=repeats)
        io.atomic_write_text(tmp / REPORT, page)
    return Path(out)
