"""Tasks: what a resumed campaign can take as done, and the manifest that makes that checkable.

A round is done when MLflow has its complete run and every file its manifest lists is still
there, byte for byte. A file that is missing, truncated or modified is reported by name and the
directory its stage wrote is removed, so the round is recomputed (the cached stages see their
output gone) instead of loading a damaged checkpoint.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from prefect import get_run_logger, task

from fisao import io
from fisao.manifest import build_manifest, group_digest, verify_manifest
from tasks.mlflow_store import MANIFEST, has_artifact, read_json_artifact, round_runs, summary_key


@task(name="write-manifest")
def write_manifest(groups: dict[str, list[str] | str], path: str) -> dict:
    """sha256 of every file of a round's artifacts (name -> root or [root, stage dir]), written to `path`."""
    manifest = build_manifest({k: tuple(v) if isinstance(v, list) else v for k, v in groups.items()})
    io.write_json(path, manifest)
    return manifest


@task(name="verify-rounds")
def verify_finished_rounds(campaign: str) -> dict[str, dict]:
    """Round (as a string) -> {"ok", "run_id", "metrics", "parent_sha256", "policy"} for each complete round.

    Damaged rounds come back with "ok": False after their damaged stage directories were removed.
    """
    log = get_run_logger()
    out: dict[str, dict] = {}
    for k, run in round_runs(campaign).items():
        if k == 0:
            continue
        tags = run.data.tags
        if not has_artifact(run.info.run_id, MANIFEST):
            log.warning("round %d of %s (MLflow run %s) has lost its manifest from the artifact store: it is "
                        "recomputed from the cache and logged again", k, campaign, run.info.run_id)
            out[str(k)] = {"ok": False, "run_id": run.info.run_id}
            continue
        manifest = read_json_artifact(run.info.run_id, MANIFEST)
        problems = verify_manifest(manifest)
        metrics = {summary_key(key): v for key, v in run.data.metrics.items()}  # as summary.json names them
        entry = {"ok": not problems, "run_id": run.info.run_id, "metrics": metrics,
                 "parent_sha256": tags.get("fisao.parent_sha256"), "model_sha256": tags.get("fisao.model_sha256")}
        if problems:
            log.warning("round %d of %s (MLflow run %s) is damaged on disk, so it is recomputed, not loaded:\n  %s",
                        k, campaign, run.info.run_id, "\n  ".join(p.describe() for p in problems[:10]))
            for stage_dir in sorted({p.stage_dir for p in problems}):
                if Path(stage_dir).is_dir():
                    shutil.rmtree(stage_dir)
                elif Path(stage_dir).exists():
                    Path(stage_dir).unlink()
                    log.warning("removed %s (it is rebuilt from its inputs)", stage_dir)
        else:
            model, adapter = manifest["groups"]["model"], manifest["groups"]["adapter"]
            entry["policy"] = {"path": model["root"], "sha256": group_digest(model), "adapter": adapter["root"]}
            assert entry["policy"]["sha256"] == entry["model_sha256"], "manifest and run tags disagree"
        out[str(k)] = entry
    return out
