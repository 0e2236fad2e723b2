"""Code versions for cache keys.

Prefect's TASK_SOURCE policy sees a task's own source, not the library code it calls, so each
cached task also takes the version of the library parts it depends on: a hash of those source
files plus the versions of the numerical packages that change results.
"""
from __future__ import annotations

import hashlib
import subprocess
from importlib.metadata import version
from pathlib import Path

import fisao

PACKAGE_ROOT = Path(fisao.__file__).parent
RESULT_PACKAGES = ("torch", "transformers", "tokenizers", "peft", "pillow", "numpy")


def code_version(*parts: str) -> str:
    """Short hash of the named files/directories of `fisao/` (e.g. "world", "config.py")."""
    h = hashlib.sha256()
    for part in sorted(parts):
        path = PACKAGE_ROOT / part
        if not path.exists():
            raise ValueError(f"code_version: {path} does not exist")
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        for f in files:
            h.update(f.relative_to(PACKAGE_ROOT).as_posix().encode() + b"\0" + f.read_bytes())
    for pkg in RESULT_PACKAGES:
        h.update(f"{pkg}=={version(pkg)}".encode())
    return h.hexdigest()[:16]


def package_versions() -> dict[str, str]:
    return {pkg: version(pkg) for pkg in (*RESULT_PACKAGES, "prefect", "mlflow", "dvc", "accelerate", "fisao")}


def git_state(path: str | Path = PACKAGE_ROOT) -> tuple[str, bool]:
    """(commit, dirty) of the git checkout holding `path` (fisao's own code by default).

    Dirty means tracked files differ from the commit (untracked files do not count); outside a
    checkout, or without git, ("unknown", False).
    """
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return "unknown", False
        status = git("status", "--porcelain", "--untracked-files=no")
    except FileNotFoundError:  # no git on PATH
        return "unknown", False
    return head.stdout.strip(), bool(status.stdout.strip())
