"""Task: a round's audit directory (per-token rollouts, reward histogram, metric curves, HTML report)."""
from __future__ import annotations

from prefect import task

from tasks.common import build_once
from tasks.refs import StageRef


@task(name="round-report")
def round_report(rollouts: StageRef, scores: StageRef, tokenizer_dir: str, rounds: list[dict], facts: dict[str, str],
                 title: str, out: str, repeats: str = "first") -> str:
    """Write the report of one round into `out` (unless complete); returns `out`."""
    from fisao.audit.report import REPORT, write_round_report  # reads tokens with torch and transformers

    build_once(out, REPORT, lambda: write_round_report(rollouts.path, scores.path, tokenizer_dir, rounds, facts,
                                                       title, out, repeats=repeats))
    return out
