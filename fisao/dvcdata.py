"""`data/` under DVC: compute DVC's hash of a directory, compare with `data.dvc`, explain mismatches.

DVC 3 hashes a directory as md5 of the JSON list of its files' {"md5", "relpath"} (sorted by
path) plus ".dir"; we compute the same value without DVC's cache, so a clean clone can check a
regenerated world against the committed `data.dvc`. To say *which* files differ without the
cache, the per-file hashes are committed next to it in `data.md5` (the format of `md5sum`, so
`cd data && md5sum -c ../data.md5` checks it by hand too).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from fisao import io


def _is_temporary(rel: str) -> bool:
    """Whether a relpath lies in a file or directory that fisao.io is still writing (`.name.tmp-*`)."""
    return any(part.startswith(".") and ".tmp-" in part for part in rel.split("/"))


def file_md5s(root: str | Path) -> dict[str, str]:
    """relpath (posix) -> md5 of every file under `root`, skipping hidden temp files."""
    root = Path(root)
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and not _is_temporary(rel):
            out[rel] = io.file_digest(p, "md5")
    return out


def dir_md5(entries: dict[str, str]) -> str:
    """DVC 3's hash of a directory whose files have the md5s `entries` (relpath -> md5)."""
    listing = [{"md5": md5, "relpath": rel} for rel, md5 in sorted(entries.items())]
    return hashlib.md5(json.dumps(listing, sort_keys=True).encode("utf-8")).hexdigest() + ".dir"


@dataclass(frozen=True)
class DvcOut:
    md5: str
    nfiles: int | None
    path: str


def read_dvc_file(path: str | Path) -> DvcOut:
    """The (single) output recorded in a .dvc file."""
    path = Path(path)
    try:
        out = yaml.safe_load(path.read_text())["outs"][0]
        return DvcOut(str(out["md5"]), out.get("nfiles"), str(out["path"]))
    except FileNotFoundError:
        raise
    except (yaml.YAMLError, KeyError, IndexError, TypeError) as e:
        raise ValueError(f"{path} is not a DVC file with an output md5 ({e}); restore it with `git checkout {path.name}`") from e


def read_file_md5s(path: str | Path) -> dict[str, str]:
    """path -> md5 of each file of a data directory, from its `<data_dir>.md5` list (not a round's
    manifest.json, which tasks/resume.py writes)."""
    entries = {}
    for lineno, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        md5, sep, rel = line.partition("  ")
        if not sep or len(md5) != 32:
            raise ValueError(f"{path}:{lineno}: expected '<md5>  <path>', got {line!r}")
        entries[rel] = md5
    return entries


def write_file_md5s(path: str | Path, entries: dict[str, str]) -> None:
    io.atomic_write_text(path, "".join(f"{md5}  {rel}\n" for rel, md5 in sorted(entries.items())))


def describe_difference(expected: dict[str, str], actual: dict[str, str], show: int = 8) -> str:
    """A few lines naming added, missing and changed files."""
    added = sorted(set(actual) - set(expected))
    missing = sorted(set(expected) - set(actual))
    changed = sorted(k for k in set(actual) & set(expected) if actual[k] != expected[k])
    lines = []
    for label, names in (("changed", changed), ("missing", missing), ("not in data.dvc", added)):
        if names:
            more = f" (and {len(names) - show} more)" if len(names) > show else ""
            lines.append(f"  {label}: {', '.join(names[:show])}{more}")
    return "\n".join(lines)


class DataMismatch(RuntimeError):
    """`data/` does not hash to the md5 that `data.dvc` records."""


def dvc(project: Path, *args: str) -> subprocess.CompletedProcess:
    """Run the DVC command line in `project` (analytics and update checks off)."""
    # The dvc installed with fisao (beside this Python) first: another one on PATH may hash differently.
    beside = Path(sys.executable).with_name("dvc")
    exe = str(beside) if beside.is_file() else shutil.which("dvc")
    if exe is None:
        raise FileNotFoundError(f"no `dvc` beside {sys.executable} or on PATH; install it (pip install dvc)")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "DO_NOT_TRACK": "true"}
    return subprocess.run([exe, *args], cwd=project, env=env, capture_output=True, text=True)


def init_project(path: str | Path) -> Path:
    """Make `path` a fresh git + DVC project, as a clone of fisao is, with DVC's analytics and
    update checks off in its config; returns it. RuntimeError naming the command if one fails."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["git", "init", "-q"], cwd=path, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"git init failed in {path}: {done.stderr.strip()}")
    for args in (("init", "-q"), ("config", "core.analytics", "false"), ("config", "core.check_update", "false")):
        done = dvc(path, *args)
        if done.returncode:
            raise RuntimeError(f"dvc {' '.join(args)} failed in {path}: {done.stderr.strip()}")
    return path


def has_remote(project: Path) -> bool:
    res = dvc(project, "remote", "list")
    return res.returncode == 0 and bool(res.stdout.strip())


def track(project: Path, data_dir: str = "data") -> str:
    """`dvc add` the data directory and write its per-file md5 list (`<data_dir>.md5`); returns the md5 now in `<data_dir>.dvc`.

    Refuses to record what `verify` could never match: leftovers of an interrupted write (which
    DVC would hash and `file_md5s` skips), or a DVC that hashes the files differently from
    `dir_md5` (a .dvcignore that hides some of them, another DVC major version).
    """
    root = project / data_dir
    temporary = [p.relative_to(root).as_posix() for p in root.rglob(".*") if ".tmp-" in p.name]
    leftovers = sorted(rel for rel in temporary if not _is_temporary(rel.rpartition("/")[0]))  # outermost
    if leftovers:
        raise RuntimeError(
            f"{data_dir}/ holds temporary files of an interrupted write: {', '.join(f'{data_dir}/{r}' for r in leftovers)}; "
            f"delete them (they start with '.' and contain '.tmp-'), then record the data again"
        )
    res = dvc(project, "add", data_dir)
    if res.returncode != 0:
        raise RuntimeError(f"`dvc add {data_dir}` failed in {project}:\n{res.stderr or res.stdout}")
    entries = file_md5s(root)
    recorded = read_dvc_file(project / f"{data_dir}.dvc").md5
    if recorded != dir_md5(entries):
        raise RuntimeError(
            f"`dvc add {data_dir}` recorded {recorded}, but the same {len(entries)} files hash to "
            f"{dir_md5(entries)} here, so `verify` could never pass: check .dvcignore for patterns that hide "
            f"files under {data_dir}/, and that DVC is 3.x (`dvc --version`)"
        )
    write_file_md5s(project / f"{data_dir}.md5", entries)
    return recorded


def verify(project: Path, data_dir: str = "data") -> str:
    """Check `data_dir` against `<data_dir>.dvc`; return its md5 or raise DataMismatch naming the files."""
    dvc_file = project / f"{data_dir}.dvc"
    expected = read_dvc_file(dvc_file)
    entries = file_md5s(project / data_dir)
    actual = dir_md5(entries)
    if actual == expected.md5:
        return actual
    manifest = project / f"{data_dir}.md5"
    detail = (describe_difference(read_file_md5s(manifest), entries) if manifest.is_file()
              else f"  ({manifest.name} is missing, so the differing files cannot be named)")
    raise DataMismatch(
        f"{data_dir}/ hashes to {actual}, but {dvc_file.name} records {expected.md5}:\n{detail}\n"
        f"If you changed the world on purpose, record the new version: `dvc add {data_dir}` then commit "
        f"{dvc_file.name} and {manifest.name} (or run `fisao world build --track`). Otherwise restore the "
        f"recorded version: `git checkout {dvc_file.name} {manifest.name}` and `dvc pull` (or `dvc checkout`)."
    )
