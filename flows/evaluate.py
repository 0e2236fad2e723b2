"""Flow: evaluate one checkpoint (any round's, or any save_pretrained directory) on the benchmarks.

For a deployment that re-checks a model on demand or on a schedule; the evaluation's directory is
keyed on the checkpoint's sha256, the data md5 and the eval config (tasks/common.py), so a second
call reads it back; each call is logged as an MLflow run.
"""
from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from fisao import io
from fisao.config import load_config
from fisao.localstate import use_project
from fisao.versioning import code_version
from flows.rounds import EVAL_CODE
from tasks.evaluate import evaluate
from tasks.realdata import real_data
from tasks.refs import DataRef, ModelRef, StageContext
from tasks.mlflow_store import checkpoint_dir
from tasks.tracking import log_checkpoint_eval
from tasks.world import prepare_world


@flow(name="fisao-evaluate")
def evaluate_checkpoint(model: str, config_path: str | None = None, project: str = ".",
                        benchmarks: tuple[str, ...] = ("chair", "pope"), overrides: dict | None = None) -> dict:
    """CHAIR/POPE of the checkpoint directory (or registered model: models:/NAME@ALIAS) `model` on the
    project's world (or the config's COCO directory, with the config's runtime, for a real-model
    config); returns the metrics."""
    project = str(Path(project).resolve())
    use_project(project)
    cfg = load_config(config_path, overrides)
    if model.startswith("models:/"):  # a registered round: models:/demo@best
        model = str(checkpoint_dir(model))
    path = Path(model) if Path(model).is_absolute() else Path(project) / model
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} is not a directory; `fisao runs NAME` and summary.json list them")
    world = prepare_world(project, cfg.data_dir, cfg.world) if cfg.model is None else real_data(cfg)
    ref = {"path": str(path), "sha256": io.tree_digest(path)}
    ctx = StageContext(code=code_version(*EVAL_CODE), outputs=str(Path(project) / cfg.outputs_dir), runtime=cfg.model)
    result = evaluate(model=ModelRef.of(ref), data=DataRef.of(world), benchmarks=tuple(benchmarks), cfg=cfg.eval,
                      ctx=ctx)
    cached = result.pop("cached")
    run_id = log_checkpoint_eval(cfg.name, ref, world["md5"], result, cfg.eval.model_dump())
    get_run_logger().info("%s: %s%s (MLflow run %s)", path, result["metrics"], " (cache hit)" if cached else "",
                          run_id)
    return {"model": ref, "metrics": result["metrics"], "path": result["path"], "cached": cached, "run_id": run_id}
