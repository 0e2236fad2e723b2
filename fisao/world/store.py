"""Make `data/world` exist and match `data.dvc`: verify it, pull it, or regenerate it.

On a clean clone `data/` is absent (DVC keeps it out of git). The world is deterministic, so
it can be regenerated from the config and checked against the md5 that `data.dvc` records;
when a DVC remote is configured, `dvc pull` is tried first. The first build of a project
records the version (`dvc add data`) and asks the user to commit it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fisao import dvcdata, io
from fisao.config import WorldConfig
from fisao.world.build import build_world

Action = Literal["verified", "pulled", "rebuilt", "created"]


@dataclass(frozen=True)
class WorldStatus:
    path: str  # the world directory
    md5: str  # DVC md5 of the whole data directory
    action: Action
    # Why a world on disk was not trusted (what differed), when it was regenerated; else "".
    note: str = ""


def _same_config(world_dir: Path, cfg: WorldConfig) -> bool:
    try:
        return io.read_json(world_dir / "world.json")["config"] == cfg.model_dump(mode="json")
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return False


def ensure_world(project: str | Path, data_dir: str, cfg: WorldConfig, progress: bool = True) -> WorldStatus:
    """Bring `<project>/<data_dir>/world` to the version in `<data_dir>.dvc` (see module doc)."""
    project = Path(project).resolve()
    if not (project / ".dvc").is_dir():
        raise FileNotFoundError(f"{project} is not a DVC project: run `dvc init` there (or `dvc init --no-scm`)")
    world_dir = project / data_dir / "world"
    dvc_file = project / f"{data_dir}.dvc"
    if not dvc_file.is_file():
        if not _same_config(world_dir, cfg):
            build_world(world_dir, cfg, progress=progress)
        return WorldStatus(str(world_dir), dvcdata.track(project, data_dir), "created")
    note = ""
    if _same_config(world_dir, cfg):
        try:
            return WorldStatus(str(world_dir), dvcdata.verify(project, data_dir), "verified")
        except dvcdata.DataMismatch as e:  # corrupt or edited: regenerate below, then check again
            note = f"the world on disk did not match {dvc_file.name}, so it was regenerated: {e}"
    elif world_dir.exists():
        note = f"{world_dir / 'world.json'} was built with another world config; regenerated"
    elif not world_dir.exists() and dvcdata.has_remote(project):
        if dvcdata.dvc(project, "pull", dvc_file.name).returncode == 0 and _same_config(world_dir, cfg):
            return WorldStatus(str(world_dir), dvcdata.verify(project, data_dir), "pulled")
    build_world(world_dir, cfg, progress=progress)
    return WorldStatus(str(world_dir), dvcdata.verify(project, data_dir), "rebuilt", note)
