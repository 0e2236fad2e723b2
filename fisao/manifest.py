"""A round's manifest: the sha256 and size of every file of its artifacts, to verify them later.

A manifest maps group names ("model", "adapter", "rollouts", ...) to a local root (a directory
or a file) and the files under it. It is written when a round completes, logged with the round,
and checked on resume: a checkpoint that was truncated, edited or deleted since is named file
by file, so the round is recomputed instead of loaded.

    {"groups": {"model": {"root": "/abs/path", "stage_dir": "/abs/path/..", "files": {"config.json":
     {"sha256": "...", "size": 123}, ...}}, ...}}

`stage_dir` is the directory that was written atomically as one unit (for the merged model, the
update stage's directory that also holds the adapter): what has to go for it to be rebuilt.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from fisao import io


def _files(root: Path) -> dict[str, Path]:
    if root.is_file():
        return {root.name: root}
    if not root.is_dir():
        raise FileNotFoundError(f"manifest: {root} does not exist")
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}


def group_entry(root: str | Path, stage_dir: str | Path | None = None) -> dict:
    """The manifest entry of one artifact: every file under `root` with its sha256 and size."""
    root = Path(root).resolve()
    files = {rel: {"sha256": io.file_digest(p), "size": p.stat().st_size} for rel, p in _files(root).items()}
    return {"root": str(root), "stage_dir": str(Path(stage_dir or root).resolve()), "files": files}


def build_manifest(groups: dict[str, str | Path | tuple[str | Path, str | Path]]) -> dict:
    """Manifest of named artifacts: name -> root, or name -> (root, stage directory)."""
    out = {}
    for name, spec in groups.items():
        root, stage = spec if isinstance(spec, tuple) else (spec, None)
        out[name] = group_entry(root, stage)
    return {"groups": out}


@dataclass(frozen=True)
class Problem:
    group: str
    path: str  # the file (or root) that is wrong
    what: str  # "missing", "truncated", "modified", "unexpected"
    stage_dir: str

    def describe(self) -> str:
        return f"{self.path}: {self.what}"


def verify_files(entry: dict, root: str | Path, group: str = "") -> list[Problem]:
    """Compare the files under `root` with a manifest entry's; [] when they match exactly."""
    root = Path(root)
    stage = entry.get("stage_dir", str(root))
    if not root.exists():
        return [Problem(group, str(root), "missing", stage)]
    actual = _files(root)
    problems = []
    for rel, want in sorted(entry["files"].items()):
        path = actual.get(rel)
        if path is None:
            problems.append(Problem(group, str(root / rel) if root.is_dir() else str(root), "missing", stage))
            continue
        size = path.stat().st_size
        if size < want["size"]:
            problems.append(Problem(group, str(path), f"truncated ({size} of {want['size']} bytes)", stage))
        elif size != want["size"] or io.file_digest(path) != want["sha256"]:
            problems.append(Problem(group, str(path), "modified (sha256 differs from the manifest)", stage))
    for rel in sorted(set(actual) - set(entry["files"])):
        problems.append(Problem(group, str(actual[rel]), "unexpected (not in the manifest)", stage))
    return problems


def verify_manifest(manifest: dict, groups: tuple[str, ...] | None = None) -> list[Problem]:
    """Check the local artifacts a manifest names (all groups, or `groups`) where they were written."""
    problems = []
    for name, entry in manifest["groups"].items():
        if groups is None or name in groups:
            problems += verify_files(entry, entry["root"], name)
    return problems


def group_digest(entry: dict) -> str:
    """One sha256 over a group's files, equal to `io.tree_digest` of a directory root."""
    h = hashlib.sha256()
    for rel, f in sorted(entry["files"].items()):
        h.update(rel.encode() + b"\0" + f["sha256"].encode() + b"\n")
    return h.hexdigest()
