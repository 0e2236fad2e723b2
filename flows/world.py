"""Flow: bring the world under data/ to the version in data.dvc (verify, pull or regenerate it)."""
from __future__ import annotations

from pathlib import Path

from prefect import flow

from fisao.config import load_config
from fisao.localstate import use_project
from tasks.world import prepare_world


@flow(name="fisao-world")
def build_world(config_path: str | None = None, project: str = ".") -> dict:
    """The world of `config_path`'s `world` section, checked against data.dvc; returns path, md5, action."""
    project = str(Path(project).resolve())
    use_project(project)
    cfg = load_config(config_path)
    return prepare_world(project, cfg.data_dir, cfg.world)
