"""What every cached task shares: the cache policy and JSON (never pickle) results."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE

from fisao import io, locks

# Inputs + the task's source; callers pass a `code` version for the library code it calls.
CACHE = INPUTS + TASK_SOURCE


def cached_task(**kwargs):
    """`@task` with the project's cache policy and persisted JSON results."""
    return task(cache_policy=CACHE, persist_result=True, result_serializer="json", **kwargs)


def key_of(*parts) -> str:
    """A short content key for output directory names (stable across processes)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def is_complete(directory: str | Path, marker: str) -> bool:
    """A directory is finished when its marker file exists (written last, atomically)."""
    return (Path(directory) / marker).is_file()


def build_once(out: str | Path, marker: str, build) -> bool:
    """Call `build()` unless `out` is complete; returns whether it was called.

    One process at a time per directory (an flock beside it, released even if the holder is
    killed): a second campaign that needs the same content-addressed output waits, then finds it
    complete. Leftovers of an interrupted write of `out` are removed first.
    """
    out = Path(out)
    if is_complete(out, marker):
        return False
    with locks.exclusive(out.with_name(f".{out.name}.lock")):
        if is_complete(out, marker):
            return False
        io.remove_temp_siblings(out)
        build()
    return True
