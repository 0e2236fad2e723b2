"""Make `data/world` exist and match `data.dvc`: verify it, pull it, or regenerate it.

On a clean clone `data/` is absent (DVC keeps it out of git). The world is deterministic, so
it can be regenerated from the config and checked against the md5 that `data.dvc` records;
when a DVC remote is configured, `dvc pull` is tried first. The first build of a project
records the version (`dvc add data`) and asks the user to commit it.

A config whose world is not the one `<data_dir>.dvc` records never touches the recorded world:
it gets its own data directory, `<data_dir>-world-<hash of its world section>` (see
`world_data_dir`), recorded by its own `.dvc` file. So worlds of other seeds or sizes (a tiny
trial, a sweep over seeds) live side by side with the recorded one.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fisao import dvcdata, io
from fisao.config import config_hash
from fisao.world.build import build_world, world_json_bytes, world_record
from fisao.world.config import WorldConfig

Action = Literal["verified", "pulled", "rebuilt", "created"]


@dataclass(frozen=True)
class WorldStatus:
    path: str  # the world directory, <project>/<data_dir>/world
    data_dir: str  # the DVC-tracked directory that holds it, relative to the project
    md5: str  # DVC md5 of the whole data directory
    action: Action
    # Why a world on disk was not trusted (what differed), when it was regenerated; else "".
    note: str = ""


def _same_config(world_dir: Path, cfg: WorldConfig) -> bool:
    try:
        return io.read_json(world_dir / "world.json")["config"] == world_record(cfg)
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return False


def world_data_dir(project: str | Path, data_dir: str, cfg: WorldConfig) -> str:
    """The data directory (relative to `project`) that holds the world of `cfg`, as `<dir>/world`.

    `data_dir` itself when nothing is recorded there yet (no `<data_dir>.dvc`) or when its record
    is this world (the md5 of the world.json that `cfg` gives is the one `<data_dir>.md5` lists;
    without that manifest, when the world on disk has this config); else
    `<data_dir>-world-<first 12 hex digits of the world section's hash>`, so a world that is not
    the recorded one is never written over it.
    """
    project = Path(project)
    if not (project / f"{data_dir}.dvc").is_file():
        return data_dir
    manifest = project / f"{data_dir}.md5"
    if manifest.is_file():
        recorded = dvcdata.read_file_md5s(manifest).get("world/world.json")
        same = recorded == hashlib.md5(world_json_bytes(cfg)).hexdigest()
    else:
        same = _same_config(project / data_dir / "world", cfg)
    return data_dir if same else f"{data_dir}-world-{config_hash(cfg)[:12]}"


def ensure_world(project: str | Path, data_dir: str, cfg: WorldConfig, progress: bool = True) -> WorldStatus:
    """Bring the world of `cfg` to the version its `.dvc` file records (see module doc); it lives in
    `<project>/<data_dir>/world` if that is where `<data_dir>.dvc` records this world, else in a
    directory of its own (`world_data_dir`)."""
    project = Path(project).resolve()
    if not (project / ".dvc").is_dir():
        raise FileNotFoundError(f"{project} is not a DVC project: run `dvc init` there (or `dvc init --no-scm`)")
    data_dir = world_data_dir(project, data_dir, cfg)
    world_dir = project / data_dir / "world"
    dvc_file = project / f"{data_dir}.dvc"
    if not dvc_file.is_file():
        if not _same_config(world_dir, cfg):
            build_world(world_dir, cfg, progress=progress)
        return WorldStatus(str(world_dir), data_dir, dvcdata.track(project, data_dir), "created")
    note = ""
    if _same_config(world_dir, cfg):
        try:
            return WorldStatus(str(world_dir), data_dir, dvcdata.verify(project, data_dir), "verified")
        except dvcdata.DataMismatch as e:  # corrupt or edited: regenerate below, then check again
            note = f"the world on disk did not match {dvc_file.name}, so it was regenerated: {e}"
    elif world_dir.exists():
        note = f"{world_dir / 'world.json'} was built with another world config; regenerated"
    elif not world_dir.exists() and dvcdata.has_remote(project):
        if dvcdata.dvc(project, "pull", dvc_file.name).returncode == 0 and _same_config(world_dir, cfg):
            return WorldStatus(str(world_dir), data_dir, dvcdata.verify(project, data_dir), "pulled")
    build_world(world_dir, cfg, progress=progress)
    return WorldStatus(str(world_dir), data_dir, dvcdata.verify(project, data_dir), "rebuilt", note)
