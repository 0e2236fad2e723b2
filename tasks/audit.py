"""Task: a round's audit directory (per-token rollouts, reward histogram, metric curves, HTML report)."""
from __future__ import annotations

from prefect import task

from fisao.audit.files import REPORT
from tasks.common import build_once, library
from tasks.refs import StageRef


@task(name="round-report")
def round_report(rollouts: StageRef, scores: StageRef, tokenizer_dir: str, rounds: list[dict], facts: dict[str, str],
                 title: str, out: str, repeats: str = "first") -> str:
    """Write the report of one round into `out` (unless complete); returns `out`."""
    write = library("fisao.audit.report:write_round_report")
    build_once(out, REPORT, lambda: write(rollouts.path, scores.path, tokenizer_dir, rounds, facts, title, out,
                                          repeats=repeats))
    return out
