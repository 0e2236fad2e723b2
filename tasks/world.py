"""Task: the world under data/, checked against data.dvc."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from prefect import get_run_logger, task

from fisao.locks import exclusive
from fisao.world.config import WorldConfig
from fisao.world.store import ensure_world


@task(name="world")
def prepare_world(project: str, data_dir: str, world: WorldConfig) -> dict:
    """Verify, pull or regenerate the world; returns its path, the data md5 and what was done.

    A world that `<data_dir>.dvc` does not record goes to a data directory of its own
    (`world_data_dir`, decided under the lock). One process at a time per project data directory
    and the worlds beside it: two campaigns starting together must not both regenerate one and
    `dvc add` it."""
    with exclusive(Path(project) / f".fisao-{data_dir}.lock"):
        status = ensure_world(project, data_dir, world)
    log = get_run_logger()
    log.info("world %s: %s (data md5 %s)", status.action, status.path, status.md5)
    if status.note:
        log.warning("%s", status.note)
    if status.data_dir != data_dir:
        log.info("this world is not the one %s.dvc records, so it lives in %s/ (recorded by %s.dvc)", data_dir,
                 status.data_dir, status.data_dir)
    if status.action == "created":
        log.warning("recorded a new data version: commit %s.dvc and %s.md5", status.data_dir, status.data_dir)
    return asdict(status)
