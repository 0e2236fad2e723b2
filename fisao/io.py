"""File helpers used everywhere: atomic writes, JSON/JSONL with precise errors, hashing.

Nothing is ever half-written: files go to a temporary name in the same directory, are
fsync'ed, then renamed over the target; directories are built beside the target, every file
and folder in them fsync'ed, then renamed into place (and the parent fsync'ed), so neither a
killed process nor a power cut leaves a target that looks complete but is not. Parse errors
name the file and line.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def fsync_tree(root: str | Path) -> None:
    """fsync every file and directory under `root` (libraries such as safetensors do not)."""
    root = Path(root)
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            fd = os.open(Path(dirpath) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def temp_siblings(target: str | Path) -> list[Path]:
    """Leftovers of interrupted `atomic_dir`/`atomic_write_bytes` calls for `target`."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    return sorted(p for p in target.parent.glob(f".{target.name}.*") if ".tmp-" in p.name or ".old-" in p.name)


def remove_temp_siblings(target: str | Path) -> list[Path]:
    """Delete what interrupted writes of `target` left beside it; returns what was removed.

    Only safe while no other process writes `target` (callers hold its lock)."""
    removed = temp_siblings(target)
    for p in removed:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
    return removed


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a fresh sibling directory; on success it replaces `target`, on error it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(target, old)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def require_file(path: str | Path) -> Path:
    """`path` if it is a file; else FileNotFoundError saying it is a directory or does not exist."""
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(f"{path} is a directory, not a file: give the file inside it")
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    return path


def check_writable(path: str | Path) -> Path:
    """`path` if a file can be written there now (its folder is made if missing); else an OSError
    naming `path` and the cause (read-only, permission, full disk), before any work is done."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a directory, not a file", str(path))
    existing = next(p for p in path.absolute().parents if p.exists())
    if not existing.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"cannot write there: {existing} is a file, not a folder", str(path))
    probe = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"\0")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise OSError(e.errno, f"cannot write there: {e.strerror}", str(path)) from e
    finally:
        with contextlib.suppress(OSError):  # never made, or its folder is not one
            probe.unlink()
    return path


def read_json(path: str | Path) -> Any:
    path = require_file(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from e


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) per non-blank line of a JSON-lines file, so callers can name the line
    of a row whose content is wrong; a malformed line stops with the file name and line number."""
    path = require_file(path)
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            yield lineno, row


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a JSON-lines file; a malformed line stops with the file name and line number."""
    return [row for _, row in iter_jsonl(path)]


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tree_digest(root: str | Path) -> str:
    """sha256 over every file's relative path and content under `root` (a checkpoint's identity)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + file_digest(p).encode() + b"\n")
    return h.hexdigest()
