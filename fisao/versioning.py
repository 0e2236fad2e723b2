"""Code versions for the stages' output keys (tasks/common.py says how a key is made).

Each stage's key takes the version of the library parts it depends on: a hash of those source
files plus the versions of the numerical packages that change results.

Which files a stage depends on is derived, not listed by hand: `stage_files(entry modules)` is
every `fisao` file the entries import, directly or through each other (every import statement,
those inside functions included, and the packages' `__init__.py` that importing runs), read from
the source with `ast`. A module added to a stage's imports joins its key by itself. `NEUTRAL`
names the few files a stage imports whose edits cannot change its results, each with the reason;
they are neither hashed nor followed.
"""
from __future__ import annotations

import ast
import hashlib
import subprocess
from importlib.metadata import version
from pathlib import Path
from typing import Iterable

import fisao

PACKAGE_ROOT = Path(fisao.__file__).parent
RESULT_PACKAGES = ("torch", "transformers", "tokenizers", "peft", "pillow", "numpy")


# Files of fisao/ that stages import but whose edits cannot change a stage's output.
NEUTRAL = {
    "config.py": "the settings enter each key as the hash of their config sections (defaults included), so a "
                 "new option in another section does not rebuild a world's models",
    "progress.py": "progress bars on stderr",
    "host.py": "the machine's figures (cores, memory) for messages and benchmarks",
}


def _module_file(module: str, root: Path) -> Path | None:
    """fisao/a/b.py or fisao/a/b/__init__.py of `fisao.a.b` under `root` (the fisao/ folder), else None."""
    parts = module.split(".")
    if parts[0] != "fisao":
        return None
    path = root.joinpath(*parts[1:])
    if len(parts) > 1 and path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    return path / "__init__.py" if (path / "__init__.py").is_file() else None


def _imports(path: Path, module: str) -> set[str]:
    """The `fisao` modules the file `path` (module `module`) names in any import statement, relative
    imports resolved; `from fisao.a import b` names both fisao.a and fisao.a.b (b may be a module)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_bytes(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            names.add(source)
            names.update(f"{source}.{alias.name}" for alias in node.names)
    return {n for n in names if n.split(".")[0] == "fisao"}


def stage_files(*entries: str, neutral: Iterable[str] = tuple(NEUTRAL), root: Path | None = None) -> tuple[str, ...]:
    """The files of fisao/ (relative paths, sorted) that the modules `entries` (e.g. "fisao.evaluate")
    import, transitively, with the packages' __init__.py; the `neutral` files are left out and not
    followed. A ValueError for an entry that is no module of fisao."""
    root = PACKAGE_ROOT if root is None else Path(root)
    neutral = set(neutral)
    files: dict[str, str] = {}
    todo = list(entries)
    for entry in entries:
        if _module_file(entry, root) is None:
            raise ValueError(f"stage_files: {entry!r} is no module of fisao (under {root})")
    while todo:
        module = todo.pop()
        path = _module_file(module, root)
        if path is None or module in files:
            continue
        rel = path.relative_to(root).as_posix()
        if rel in neutral:
            continue
        files[module] = rel
        parts = module.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # importing fisao.a.b runs fisao/a/__init__
        todo.extend(sorted(_imports(path, module)))
    return tuple(sorted(set(files.values())))


def code_version(*parts: str, root: Path | None = None) -> str:
    """Short hash of the named files/directories of `fisao/` (e.g. "world", "config.py"): their
    paths and bytes, with the versions of `RESULT_PACKAGES`."""
    root = PACKAGE_ROOT if root is None else Path(root)
    h = hashlib.sha256()
    for part in sorted(parts):
        path = root / part
        if not path.exists():
            raise ValueError(f"code_version: {path} does not exist")
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        for f in files:
            h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
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
