"""What this machine has free for a job: RAM (Linux's MemAvailable) and disk space under a path;
and what this process holds (`rss_mb`, `PeakRSS`)."""
from __future__ import annotations

import gc
import os
import resource
import shutil
import threading
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


class PeakRSS:
    """The peak resident memory (MB) of this process while a block runs, sampled by a thread."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.peak = interval, 0.0
        self._stop = threading.Event()

    def __enter__(self) -> "PeakRSS":
        gc.collect()
        self.peak = rss_mb()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_mb())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())


def rss_mb() -> float:
    """This process's resident memory now (MB); its peak so far where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
