"""Code versions for cache keys.

Prefect's TASK_SOURCE policy sees a task's own source, not the library code it calls, so each
cached task also takes the version of the library parts it depends on: a hash of those source
files plus the versions of the numerical packages that change results.
"""
from __future__ import annotations

import hashlib
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
