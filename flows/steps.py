"""Running a task inside a flow: report whether it was served from cache, and heal stale caches.

A cached result is a path; if that path has since been deleted (say, `make clean` removed
outputs/ but not .prefect/), the task is run again with its cache refreshed.
"""
from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger


def run_step(task, *args, **kwargs) -> tuple[dict, bool]:
    """Call `task`; return (result, served_from_cache)."""
    state = task(*args, return_state=True, **kwargs)
    result = state.result()
    cached = state.name == "Cached"
    if cached and isinstance(result, dict) and "path" in result and not Path(result["path"]).exists():
        get_run_logger().warning("%s: cached output %s is gone; recomputing", task.name, result["path"])
        state = task.with_options(refresh_cache=True)(*args, return_state=True, **kwargs)
        result, cached = state.result(), False
    get_run_logger().info("%s: %s", task.name, "cache hit, skipped" if cached else "done")
    return result, cached
