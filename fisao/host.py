"""What this machine has free for a job: RAM (Linux's MemAvailable) and disk space under a path."""
from __future__ import annotations

import os
import shutil
from pathlib import Path


def available_ram() -> int:
    """Bytes of RAM available to a new job without swapping (/proc/meminfo MemAvailable; elsewhere
    the free physical pages, which undercount what the page cache would give back)."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info["MemAvailable"]
    except (OSError, KeyError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def free_disk(path: str | Path) -> int:
    """Bytes free on the filesystem that holds `path` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free
