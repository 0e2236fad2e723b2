"""Where a world may be written, and whether it fits, checked before anything is built.

`build_world` replaces its target directory whole (atomically): right for a previous world, a
loss for anything else. `check_target` refuses, before building, a folder that holds anything
but a world `fisao world build` wrote (naming what is there), a previous world of another config
unless `force`, and folders whose replacement would take the project with it (`.`, `..`, `~`,
`/`, any folder that contains the project or the working directory). `check_fits` refuses
split sizes whose images cannot fit the free disk or memory, from a per-image estimate.
"""
from __future__ import annotations

import os
from pathlib import Path

from fisao import io
from fisao.host import available_ram, free_disk
from fisao.world.config import WorldConfig, config_of_record

# What a world directory holds at its top level (fisao/world/build.py; mme/ may be added by hand).
WORLD_ENTRIES = frozenset({"world.json", "vocab.txt", "train", "val", "test", "pretrain", "mme"})
GIB = 1024 ** 3


def _listing(entries: list[Path], show: int = 5) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in entries)
    more = f" and {len(names) - show} more" if len(names) > show else ""
    return ", ".join(names[:show]) + more


def _previous_world(out: Path) -> WorldConfig | None:
    """The config of the world in `out`, or None when `out` holds no world.json of ours."""
    try:
        meta = io.read_json(out / "world.json")
        return config_of_record(meta["config"]) if meta.get("format") == 1 else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def check_target(out: str | Path, project: str | Path, cfg: WorldConfig, force: bool = False) -> Path:
    """The resolved `out` if a world may be written there, else a ValueError saying why and what to do."""
    given = str(out)
    out = Path(os.path.expanduser(given)).resolve()
    project, cwd = Path(project).resolve(), Path.cwd().resolve()
    for what, place in (("the project", project), ("the working directory", cwd), ("your home directory", Path.home())):
        if place.is_relative_to(out):
            raise ValueError(f"--out {given} ({out}) would replace {what} {place}: give the world a folder of its own, "
                             "e.g. --out data/world")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {given} is a file, not a folder: give a new or empty folder for the world")
    entries = list(out.iterdir()) if out.is_dir() else []
    if not entries:
        return out
    previous = _previous_world(out)
    foreign = [p for p in entries if p.name not in WORLD_ENTRIES]
    if previous is None or foreign:
        shown = foreign if previous is not None else entries
        raise ValueError(f"--out {given} is not empty and is not only a world that `fisao world build` wrote: it holds "
                         f"{_listing(shown)}. Nothing was written. Choose a new or empty folder (e.g. {given.rstrip('/')}"
                         "/world), or move those files away first; --force replaces only a previous world")
    if previous != cfg and not force:
        raise ValueError(f"--out {given} holds a world built with another config (seed {previous.seed}, sizes "
                         f"{dict(previous.sizes)}): pass --force to replace it, or choose another folder")
    return out


def estimate_bytes(cfg: WorldConfig) -> tuple[int, int]:
    """(disk, memory) bytes that building `cfg` takes, roughly and on the high side.

    Disk: per image one file block (4 KiB) plus its PNG (~canvas² / 8 bytes at most; measured 308
    bytes at 64 px, 2.1 KB at 512 px) and its text rows. Memory: every scene is sampled first
    (measured 0.54 KB each) and a split's captions and questions are written from memory: 2 KiB
    per image."""
    images = sum(cfg.sizes.values()) + cfg.pretrain_size
    return images * (4096 + cfg.canvas ** 2 // 8 + 1024), images * 2048


def check_fits(out: str | Path, cfg: WorldConfig) -> None:
    """ValueError when the world of `cfg` would not fit the disk under `out` or the available memory."""
    disk, memory = estimate_bytes(cfg)
    free, ram = free_disk(out), available_ram()
    images = sum(cfg.sizes.values()) + cfg.pretrain_size
    for need, have, where in ((disk, free, f"free on the disk of {out}"), (memory, ram, "of memory available")):
        if need > have:
            raise ValueError(
                f"world.sizes {dict(cfg.sizes)} and world.pretrain_size {cfg.pretrain_size} make {images:,} images: "
                f"about {need / GIB:,.1f} GiB, but {have / GIB:,.1f} GiB are {where}. Nothing was written; lower "
                "world.sizes or world.pretrain_size (the demo has 8,700 images, 15 MB)")
