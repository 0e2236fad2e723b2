"""Task: evaluate a model checkpoint on the benchmarks, in a directory keyed on the checkpoint's hash,
the data, the benchmarks, the eval config and the code (tasks/common.py)."""
from __future__ import annotations

import time
from pathlib import Path

from fisao import io
from fisao.config import EvalConfig, ModelConfig, config_hash
from tasks.common import build_once, key_of, library, stage_task
from tasks.refs import DataRef, ModelRef, StageContext

METRICS = "metrics.json"
TIMING = "timing.json"  # {"seconds": the evaluation's wall time}: its MLflow run's span (tasks/tracking.py)


@stage_task(name="evaluate")
def evaluate(model: ModelRef, data: DataRef, benchmarks: tuple[str, ...], cfg: EvalConfig, ctx: StageContext) -> dict:
    """CHAIR/POPE(/MME) figures of `model`; answers saved beside them. Returns path, metrics and `cached`."""
    out = Path(ctx.outputs) / "eval" / key_of(model.sha256, data.md5, list(benchmarks), config_hash(cfg), *ctx.key_parts)
    built = build_once(out, METRICS, lambda: _evaluate_into(out, model.path, data.path, benchmarks, cfg,
                                                             ctx.runtime))
    return {"path": str(out), "metrics": io.read_json(out / METRICS)["metrics"], "cached": not built}


def _evaluate_into(out: Path, model_dir: str, data_dir: str, benchmarks: tuple[str, ...], cfg: EvalConfig,
                   runtime: ModelConfig | None) -> None:
    t0 = time.time()
    with io.atomic_dir(out) as tmp:
        library("fisao.evaluate:evaluate_model")(model_dir, data_dir, benchmarks, cfg, tmp, runtime=runtime)
        io.write_json(tmp / TIMING, {"seconds": round(time.time() - t0, 2)})
