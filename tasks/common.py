"""What every stage task shares: its output directory, named by a content key, is its only cache.

How a stage's key is made. Each stage task (tasks/models.py, tasks/align.py, tasks/evaluate.py)
writes into `<outputs>/<kind>/<key>` (the base models: `models/clip-<key>`), where `<key>` is
`key_of` over:

- its inputs' content hashes: the data's md5 (`DataRef.md5`, the data version), the sha256 of each
  checkpoint or earlier stage it reads (`ModelRef.sha256`, `StageRef.sha256`), never their paths;
- the hash of each config section it reads (`fisao.config.config_hash`, defaults included), and the
  plain values that change its output (the round index, the benchmarks, the rollout shards);
- the code version of the library it runs (`StageContext.code`: `fisao.versioning.code_version`
  of the `fisao/` files its entry modules import, `stage_files`, and the numerical packages'
  versions), then the real-model runtime's config hash when there is one (`StageContext.key_parts`).

A change to any of these is another key, hence another directory, built from scratch; nothing else
invalidates a stage (not the task's own wrapper code, not the path the outputs were read from, not
`scale.processes`, which gives the same output). A stage is done when its directory is complete
(`build_once`: the marker file written last); a missing or half-written directory is (re)built, so
deleting outputs/ or one stage's directory (tasks/resume.py removes a damaged round's) simply
redoes that work. Prefect's own result cache is off for these tasks (`stage_task`): the directory
is the one place that says what is done, and each task's result says whether it found it so
(`"cached": True`), which the campaign's `stages` in summary.json report.
"""
from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from fisao import io, locks


def stage_task(**kwargs):
    """`@task` for a stage: no Prefect result cache and no persisted results (the stage's
    content-addressed directory is its cache; see above)."""
    return task(cache_policy=NO_CACHE, persist_result=False, **kwargs)


def library(target: str):
    """The library function `target` ("module:function"), imported when it is called: the stages
    load torch and transformers, which a stage whose directory is complete never needs (a fully
    cached `fisao run` then never imports them)."""
    def call(*args, **kwargs):
        module, name = target.split(":")
        return getattr(importlib.import_module(module), name)(*args, **kwargs)
    call.__name__ = target
    return call


def key_of(*parts) -> str:
    """A short content key for output directory names (stable across processes): the first 12 hex
    digits of the sha256 of `parts` as JSON."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def is_complete(directory: str | Path, marker: str) -> bool:
    """A directory is finished when its marker file exists (written last, atomically)."""
    return (Path(directory) / marker).is_file()


def build_once(out: str | Path, marker: str, build) -> bool:
    """Call `build()` unless `out` is complete; returns whether it was called (False: a cache hit).

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
