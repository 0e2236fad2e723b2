"""The round report as one self-contained HTML page: rollouts with each mention coloured by its reward.

Green for a positive reward, red for a negative one, the stronger the larger |reward| (solid
colours mixed with white, so a screenshot shows exactly these values); a dotted underline marks
mentions that ground truth says are hallucinated (the audit's view: never used in the reward).
Figures are embedded as base64 PNGs, so the page renders the same from MLflow's artifact viewer,
a browser or an e-mail attachment.
"""
from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Sequence

POSITIVE = (22, 163, 74)  # reward +1
NEGATIVE = (220, 38, 38)  # reward -1


def reward_colour(reward: float) -> str:
    """Hex colour for a reward in [-1, 1]: white at 0, POSITIVE at +1, NEGATIVE at -1."""
    r = max(-1.0, min(1.0, float(reward)))
    target = POSITIVE if r >= 0 else NEGATIVE
    mixed = [round(255 + (c - 255) * abs(r)) for c in target]
    return "#" + "".join(f"{c:02x}" for c in mixed)


def mention_html(text: str, mentions: Sequence[dict]) -> str:
    """`text` with each mention (character spans, non-overlapping) wrapped in a coloured span."""
    parts, pos = [], 0
    for m in sorted(mentions, key=lambda m: m["start"]):
        if m["start"] < pos:  # overlapping spans cannot be nested: keep the first
            continue
        parts.append(html.escape(text[pos:m["start"]]))
        ink = "#ffffff" if abs(m["reward"]) > 0.6 else "#111111"
        cls = "mention hallucinated" if m.get("hallucinated") else "mention"
        tip = f"{m['category']}: score {m['score']:.4f}, reward {m['reward']:+.3f}" + (
            ", hallucinated (ground truth)" if m.get("hallucinated") else "")
        parts.append(f'<span class="{cls}" style="background:{reward_colour(m["reward"])};color:{ink}" '
                     f'data-reward="{m["reward"]:.5f}" title="{html.escape(tip)}">'
                     f'{html.escape(text[m["start"]:m["end"]])}<sub>{m["reward"]:+.2f}</sub></span>')
        pos = m["end"]
    parts.append(html.escape(text[pos:]))
    return "".join(parts)


def _png(path: str | Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table(rows: Sequence[Sequence], headers: Sequence[str] | None = None) -> str:
    """An HTML table; without `headers` no header row (a key-value list needs none)."""
    head = "" if headers is None else "<thead><tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in headers) + "</tr></thead>"
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table>{head}<tbody>{body}</tbody></table>"


def _fmt(v) -> str:
    if v is None:
        return ""
    return f"{v:.4f}" if isinstance(v, float) else str(v)


# The report's headline: the benchmarks a campaign is judged by, in this order.
HEADLINE = (("chair_i", "CHAIR_i (lower is better)"), ("chair_s", "CHAIR_s (lower is better)"), ("recall", "recall"),
            ("pope_adversarial_f1", "POPE adversarial F1"), ("pope_popular_f1", "POPE popular F1"),
            ("pope_random_f1", "POPE random F1"), ("pope_adversarial_yes_ratio", "POPE adversarial yes-ratio"))

# What the reward's repeat rule (`reward.repeats`) does to a mention that names an object again.
REPEAT_RULES = {
    "first": "only the first mention of an object in an answer can earn a positive reward; a repeat keeps "
             "min(reward, 0), so a correct repeat shows +0.00",
    "each": "every mention keeps its own reward, repeats included",
}


def headline_rows(metrics: dict[str, float], base: dict[str, float] | None) -> list[list]:
    """[label, base, this round, change] for each metric of HEADLINE that `metrics` has."""
    rows = []
    for key, label in HEADLINE:
        if key not in metrics:
            continue
        was = None if base is None else base.get(key)
        change = None if was is None else f"{metrics[key] - was:+.4f}"
        rows.append([label, was, metrics[key], change])
    return rows


STYLE = """
body { font-family: sans-serif; margin: 24px; color: #111; max-width: 1000px; }
.answer { font-size: 18px; line-height: 2.2; margin: 6px 0 18px; padding: 8px 12px; border: 1px solid #ddd; }
.mention { padding: 4px 6px; border-radius: 4px; }
.mention sub { font-size: 11px; margin-left: 2px; }
.hallucinated { text-decoration: underline dotted 2px; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 13px; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
figure { margin: 8px 0 16px; }
figcaption { font-size: 13px; color: #444; max-width: 900px; }
.legend span { padding: 3px 8px; margin-right: 6px; border-radius: 4px; }
"""


def _figure(path: str | Path, name: str, caption: str) -> str:
    return f"<figure>{_png(path, name)}<figcaption>{html.escape(caption)}</figcaption></figure>"


def render_report(title: str, facts: dict[str, str], metrics: dict[str, float], examples: Sequence[dict],
                  figures: dict[str, str | Path], base: dict[str, float] | None = None,
                  captions: dict[str, str] | None = None, repeats: str = "first") -> str:
    """The page, picture first: headline metrics (base -> this round), the figures, a few rollouts
    (rows of `fisao.audit.tokens`) coloured by reward, every metric, then the provenance `facts`."""
    if repeats not in REPEAT_RULES:
        raise ValueError(f"repeats must be one of {sorted(REPEAT_RULES)}, not {repeats!r}")
    captions = captions or {}
    legend = "".join(f'<span style="background:{reward_colour(r)};color:{"#fff" if abs(r) > 0.6 else "#111"}">'
                     f"{r:+.1f}</span>" for r in (-1.0, -0.5, 0.0, 0.5, 1.0))
    answers = []
    for row in examples:
        mentions = _table([[m["text"], m["category"], m["score"], m["reward"], "yes" if m.get("hallucinated") else "no"]
                           for m in row["mentions"]], ["mention", "object", "score", "reward", "hallucinated"])
        answers.append(f'<h3>rollout {row["row"]} (image {row["image_id"]}, answer reward {row["answer_reward"]:+.3f})</h3>'
                       f'<div class="answer">{mention_html(row["text"], row["mentions"])}</div>{mentions}')
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            + _table(headline_rows(metrics, base), ["benchmark", "base model", "this round", "change"])
            + "".join(_figure(p, name, captions.get(name, name)) for name, p in figures.items())
            + f'<h2>rollouts</h2><p class="legend">reward: {legend} dotted underline: hallucinated (ground truth, '
              f"never used in the reward). Repeats: {html.escape(REPEAT_RULES[repeats])}.</p>"
            + "".join(answers)
            + "<h2>all metrics of this round</h2>" + _table(sorted(metrics.items()), ["metric", "value"])
            + "<h2>provenance</h2>" + _table(list(facts.items()))
            + "</body></html>\n")
