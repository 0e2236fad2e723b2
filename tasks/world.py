"""Task: the world under data/, checked against data.dvc."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from prefect import get_run_logger, task

from fisao.config import WorldConfig
from fisao.locks import exclusive
from fisao.world.store import ensure_world


@task(name="world")
def prepare_world(project: str, data_dir: str, world: WorldConfig) -> dict:
    """Verify, pull or regenerate the world; returns its path, the data md5 and what was done.

    One process at a time per project: two campaigns starting together must not both regenerate
    data/ and `dvc add` it."""
    with exclusive(Path(project) / f".fisao-{data_dir}.lock"):
        status = ensure_world(project, data_dir, world)
    log = get_run_logger()
    log.info("world %s: %s (data md5 %s)", status.action, status.path, status.md5)
    if status.note:
        log.warning("%s", status.note)
    if status.action == "created":
        log.warning("recorded a new data version: commit %s.dvc and %s.md5", data_dir, data_dir)
    return asdict(status)
