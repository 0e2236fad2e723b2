"""`fisao runs` and `fisao audit` (cli/runs.py): what MLflow holds about campaigns, printed (and exported).

Read-only, and without Prefect: only MLflow's store and the files its runs point to.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from fisao import io
from fisao.locks import lock_holder
from fisao.summary import table
from tasks.mlflow_store import (HEADLINE_METRICS, MANIFEST, best_round, campaign_parent, download, mlflow_key,
                                model_version, read_json_artifact, round_runs, summary_key)


def status(parent: Run) -> str:
    """running / interrupted / finished / failed (running with nobody holding the lock = interrupted)."""
    tag = parent.data.tags.get("fisao.status", "running")
    if tag == "running":
        holder = lock_holder(parent.data.tags["fisao.lock"]) if parent.data.tags.get("fisao.lock") else None
        return f"running (pid {holder.pid})" if holder else "interrupted"
    return tag


def runs_overview(parents: list[Run], metric: str) -> str:
    rows = []
    for parent in parents:
        name = parent.data.tags["fisao.campaign"]
        rounds = round_runs(name)
        best = best_round(rounds, mlflow_key(metric))
        done = sum(1 for k in rounds if k > 0)
        rows.append([name, f"{done}/{parent.data.tags.get('fisao.target_rounds', '?')}", status(parent),
                     f"{best[0]} ({best[1]:.3f})" if best else "-", parent.data.tags.get("fisao.data_md5", "-")[:12],
                     parent.info.run_id[:12]])
    return table(["campaign", "rounds", "status", f"best round ({metric})", "data md5", "MLflow run"], rows)


def campaign_detail(name: str, metric: str) -> str:
    parent = campaign_parent(name)
    if parent is None:
        raise ValueError(f"no campaign {name!r} in MLflow ({_store()}); `fisao runs` lists the campaigns there")
    rounds = round_runs(name)
    tags = parent.data.tags
    best = best_round(rounds, mlflow_key(metric))
    head = [f"campaign {name}: {status(parent)}, {sum(1 for k in rounds if k > 0)} of {tags.get('fisao.target_rounds', '?')} "
            f"rounds, best round {best[0] if best else '-'} by {metric}",
            f"MLflow run {parent.info.run_id} (experiment {name}); data md5 {tags.get('fisao.data_md5')}; "
            f"config {tags.get('fisao.config_hash')}; git {tags.get('fisao.git_commit', '?')[:12]}"
            f"{' (dirty)' if tags.get('fisao.git_dirty') == 'true' else ''}"]
    head += [f"inputs changed at {k.rsplit('.', 1)[-1]}: {v}" for k, v in tags.items() if k.startswith("fisao.inputs_changed.")]
    if tags.get("fisao.error"):
        head.append(f"error: {tags['fisao.error']}")
    rows = [["base" if k == 0 else k, *[r.data.metrics.get(mlflow_key(c), "-") for c in HEADLINE_METRICS],
             r.data.tags.get("fisao.model_sha256", "")[:12], r.info.run_id[:12]] for k, r in rounds.items()]
    return "\n".join(head) + "\n\n" + table(["round", *HEADLINE_METRICS, "model sha256", "MLflow run"], rows)


def _store() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


def registered_round(uri: str, k: int | None = None) -> tuple[str, int]:
    """(campaign, round) of the registered model version `uri` (models:/demo@best); `k`, when given,
    must be that round."""
    version = model_version(uri)
    tags = MlflowClient().get_run(version.run_id).data.tags
    name, registered = tags["fisao.campaign"], int(tags["fisao.round"])
    if k is not None and k != registered:
        raise ValueError(f"{uri} is round {registered} of campaign {name!r} (version {version.version}), not round {k}: "
                         f"drop --round, or give `fisao audit {name} --round {k}`")
    return name, registered


def audit(name: str, k: int, export: str | None, show: int = 3) -> str:
    """Lineage, calibration, rollouts with per-token rewards and metrics of round k; optionally exported."""
    rounds = round_runs(name)
    if k not in rounds or k == 0:
        done = [r for r in rounds if r > 0]
        raise ValueError(f"campaign {name!r} has no complete round {k} in MLflow ({_store()}); its complete rounds: "
                         f"{done or 'none'} (`fisao runs {name}`)")
    run = rounds[k]
    tags, run_id = run.data.tags, run.info.run_id
    with tempfile.TemporaryDirectory() as tmp:
        audit_dir = download(run_id, "audit", tmp)
        calibration = io.read_json(download(run_id, "calibration/calibration.json", tmp))
        rows = io.read_jsonl(audit_dir / "tokens.jsonl")
        lines = _audit_lines(name, k, run, calibration, rows, show)
        if export:
            out = Path(export)
            out.mkdir(parents=True, exist_ok=True)
            for f in audit_dir.iterdir():
                shutil.copy2(f, out / f.name)
            io.write_json(out / "calibration.json", calibration)
            io.write_json(out / MANIFEST, read_json_artifact(run_id, MANIFEST))
            io.write_json(out / "lineage.json", {"campaign": name, "round": k, "mlflow_run": run_id,
                                                 "tags": dict(tags), "metrics": dict(run.data.metrics),
                                                 "params": dict(run.data.params)})
            lines.append(f"\nexported to {out}: tokens.jsonl (every rollout, per-token rewards), report.html, "
                         "rewards.png, curves.png, calibration.json, manifest.json, lineage.json")
    return "\n".join(lines)


def _audit_lines(name: str, k: int, run: Run, calibration: dict, rows: list[dict], show: int) -> list[str]:
    tags, m = run.data.tags, {summary_key(key): v for key, v in run.data.metrics.items()}
    mention = calibration["mention"]
    mentions = [x for r in rows for x in r["mentions"]]
    negative = sum(x["reward"] < 0 for x in mentions)
    lines = [
        f"campaign {name}, round {k}: MLflow run {run.info.run_id}",
        f"  checkpoint  {tags.get('fisao.model_path')}  sha256 {tags.get('fisao.model_sha256')}",
        f"  parent      {tags.get('fisao.parent_path')}  sha256 {tags.get('fisao.parent_sha256')}",
        f"  inputs      data md5 {tags.get('fisao.data_md5')}, config {tags.get('fisao.config_hash')}, git "
        f"{tags.get('fisao.git_commit', '?')[:12]}{' (dirty)' if tags.get('fisao.git_dirty') == 'true' else ''}",
        f"  calibration baseline b {mention['baseline']:.4f}, width w {mention['width']:.4f}, AUROC {mention['auroc']:.3f} "
        f"({mention['n_correct']} correct, {mention['n_hallucinated']} hallucinated mentions)"
        + (f", per class: {mention['per_class']}" if mention.get("per_class") else ""),
        f"  rollouts    {len(rows)} answers on {len({r['image_id'] for r in rows})} images; {len(mentions)} mentions, "
        f"{negative} with a negative reward",
        *_question_lines(m),
        "  metrics     " + ", ".join(f"{c} {m[c]:.3f}" for c in HEADLINE_METRICS if c in m),
        "",
        f"first {min(show, len(rows))} rollouts, tokens with a non-zero reward marked [reward]:",
    ]
    for r in rows[:show]:
        text = "".join(t["text"] + (f"[{t['reward']:+.2f}]" if t["reward"] else "") for t in r["tokens"])
        lines.append(f"  #{r['row']} image {r['image_id']}: {text}")
    return lines



def _question_lines(m: dict[str, float]) -> list[str]:
    """The round's yes/no questions, from the scoring stage's figures (none when it asked none)."""
    if not m.get("score/questions"):
        return []
    return [f"  questions   {int(m['score/questions'])} yes/no answers, yes share {m['score/question_yes_share']:.3f}, "
            f"mean reward {m['score/question_reward_mean']:+.3f}, right by ground truth {m['score/question_accuracy']:.3f}"]
