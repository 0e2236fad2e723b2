"""Chaos: SIGKILL a tiny campaign at several points, resume it each time, and compare with an
uninterrupted run of the same seed.

One project, two campaigns: `ref` runs uninterrupted; `chaos` is killed by the testing hook
`FISAO_CRASH_AT` (fisao/crashpoints.py) mid-rollout, mid-update, mid-checkpoint-write and
mid-MLflow-logging of round 1 and then mid-rollout of round 2, each kill followed by a resume that
runs into the next kill, and a last resume without one. `ref` and the first `chaos` run run at
the same time, sharing the world and base models but never each other's files. The base models
are built once (the `base_project` fixture), so the children spend their time on Prefect's start
and on the rounds.
"""
from __future__ import annotations

import json
import time

import pytest

from fisao import io

from tests.campaign_process import (
    alive, curve_steps, kill_group, mlflow_rounds, results, run_fisao, start_fisao, wait_fisao,
)
from tests.conftest import TINY, copy_project

pytestmark = pytest.mark.e2e

ROUNDS = TINY["ppo.rounds"]
KILLS = ("rollout:mid@1", "update:mid@1", "checkpoint:mid@1", "log:mid@1", "rollout:mid@2")


def leftovers(root) -> list[str]:
    return sorted(str(p) for p in root.rglob("*") if ".tmp-" in p.name or ".old-" in p.name)


def test_sigkill_anywhere_then_resume_ends_like_an_uninterrupted_run(base_project, tmp_path):
    project = copy_project(base_project, tmp_path / "project")
    ref_dir = project / "outputs" / "campaigns" / "ref"
    chaos_dir = project / "outputs" / "campaigns" / "chaos"
    # Two campaigns at once in one project: the uninterrupted one and the first killed one.
    ref_run = start_fisao(project, "run", "--config", "tiny.yaml", "--run-name", "ref")

    outcomes, orphans, groups = [], [], [ref_run[0].pid]
    try:
        for i, point in enumerate(KILLS):
            args = ("run", "--config", "tiny.yaml", "--run-name", "chaos") if i == 0 else ("resume", "chaos")
            rc, out, seconds, pid = run_fisao(project, *args, reap=False, FISAO_CRASH_AT=point)
            groups.append(pid)
            if i == 0:
                ref_rc, ref_out, _, _ = wait_fisao(ref_run)
                assert ref_rc == 0, ref_out
                ref_digest = io.tree_digest(ref_dir)
            assert rc == -9, f"{point}: expected a SIGKILL, got exit {rc}:\n{out[-3000:]}"
            assert not any(alive(p) for p in orphans), "the resume did not stop the server a killed run left"
            orphans = json.loads((chaos_dir / ".lock").read_text())["prefect_servers"]
            assert orphans and all(alive(p) for p in orphans)  # SIGKILL leaves Prefect's ephemeral server behind
            outcomes.append((point, round(seconds, 1)))
            check_after_kill(project, chaos_dir, point)
        started = time.time()
        rc, out, seconds, _ = run_fisao(project, "resume", "chaos")
        assert rc == 0, out
        assert not any(alive(p) for p in orphans)
    finally:
        for pgid in groups + orphans:  # a server is its own process group
            kill_group(pgid)
    outcomes.append(("(none)", round(seconds, 1)))
    print("kill point, seconds until killed / finished:", outcomes)

    # Every round exactly once in MLflow, complete, with the results of the uninterrupted run.
    ref, chaos = mlflow_rounds(project, "ref"), mlflow_rounds(project, "chaos")
    assert sorted(chaos) == sorted(ref) == list(range(ROUNDS + 1))
    for k in range(ROUNDS + 1):
        assert len(chaos[k]) == 1 and chaos[k][0].data.tags["fisao.complete"] == "true", k
        assert results(chaos[k][0].data.metrics) == results(ref[k][0].data.metrics), k
        assert chaos[k][0].data.tags["fisao.model_sha256"] == ref[k][0].data.tags["fisao.model_sha256"], k
    assert curve_steps(project, "chaos", "eval/chair_i") == list(range(ROUNDS + 1))
    assert curve_steps(project, "chaos", "update/kl") == list(range(1, ROUNDS + 1))
    summary = io.read_json(chaos_dir / "summary.json")
    ref_summary = io.read_json(ref_dir / "summary.json")
    assert [results(m) for m in summary["rounds"]] == [results(m) for m in ref_summary["rounds"]]
    assert summary["resume"]["verified_rounds"] == [1]  # round 1 was finished; round 2 was not
    resume = summary["resume"]
    print(f"resume overhead: first new stage {resume['flow_started_at'] + resume['first_new_stage_at'] - started:.1f}s "
          f"after `fisao resume` started, {resume['first_new_stage_at']}s after the flow started")

    # Nothing half-written survives, and the other campaign's files were never touched.
    assert leftovers(project / "outputs") == []
    assert io.tree_digest(ref_dir) == ref_digest
    assert not (chaos_dir / ".lock").read_text().strip()  # released cleanly by the last run


def check_after_kill(project, chaos_dir, point: str) -> None:
    rounds = mlflow_rounds(project, "chaos")
    complete = {k for k, runs in rounds.items() for r in runs if r.data.tags.get("fisao.complete") == "true"}
    if point == "checkpoint:mid@1":
        # Killed inside the atomic directory: its temporary copy exists, the round's directory does not.
        assert any(".tmp-" in p.name for p in (chaos_dir / "rounds").iterdir()), leftovers(chaos_dir)
        assert not any((p / "figures.json").exists() for p in (chaos_dir / "rounds").iterdir())
    if point == "log:mid@1":
        assert [r.data.tags["fisao.complete"] for r in rounds[1]] == ["false"]  # half-logged, not trusted
        assert complete == {0}
        rc, out, _, _ = run_fisao(project, "runs")
        assert rc == 0 and any(l.startswith("chaos ") and "interrupted" in l for l in out.splitlines()), out
    if point == "rollout:mid@2":
        assert complete == {0, 1}
