"""Tasks: build the base CLIP and LLaVA, each in a directory keyed on data md5, config and code version
(tasks/common.py)."""
from __future__ import annotations

from pathlib import Path

from fisao import io
from fisao.config import ClipBuildConfig, LlavaBuildConfig, config_hash
from fisao.models.files import TRAIN_LOG
from tasks.common import build_once, key_of, library, stage_task
from tasks.refs import DataRef, ModelRef, StageContext


def _ref(out: Path, built: bool) -> dict:
    log = io.read_json(out / TRAIN_LOG)
    figures = {k: v for k, v in log.items() if not isinstance(v, list)}
    return {"path": str(out), "sha256": io.tree_digest(out), "figures": figures, "cached": not built}


@stage_task(name="build-clip")
def build_clip(data: DataRef, cfg: ClipBuildConfig, ctx: StageContext) -> dict:
    """Train the tokenizer and the CLIP on the world; returns path, sha256, figures and `cached`."""
    out = Path(ctx.outputs) / "models" / f"clip-{key_of(data.md5, config_hash(cfg), ctx.code)}"
    return _ref(out, build_once(out, TRAIN_LOG, lambda: library("fisao.models.build:build_clip")(data.path, cfg, out)))


@stage_task(name="build-llava")
def build_llava(data: DataRef, clip: ModelRef, cfg: LlavaBuildConfig, ctx: StageContext) -> dict:
    """Fine-tune the LLaVA on the CLIP's vision tower; returns path, sha256, figures and `cached`."""
    out = Path(ctx.outputs) / "models" / f"llava-{key_of(data.md5, clip.sha256, config_hash(cfg), ctx.code)}"
    return _ref(out, build_once(out, TRAIN_LOG,
                                lambda: library("fisao.models.build:build_llava")(data.path, clip.path, cfg, out)))
