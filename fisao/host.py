"""What this machine has free for a job: RAM (Linux's MemAvailable) and disk space under a path."""
from __future__ import annotations

import shutil
from pathlib import Path


def available_ram() -> int:
    """Bytes of RAM available to a new job without swapping (/proc/meminfo MemAvailable)."""
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return info["MemAvailable"]


def free_disk(path: str | Path) -> int:
    """Bytes free on the filesystem that holds `path` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free
