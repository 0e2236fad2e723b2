"""What every cached task shares: the cache policy and JSON (never pickle) results."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE

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
