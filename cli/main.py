"""`fisao`: the parser of every command (one module per command group) and the entry point.

Project-local state (Prefect home, MLflow store) is set up before anything imports Prefect, and
user errors end in one line `fisao: error: ...` with exit status 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

from cli import campaigns, convert, estimate, evaluate, runs, world
from fisao.dvcdata import DataMismatch
from fisao.localstate import apply_local_state
from fisao.locks import CampaignLocked
from fisao.progress import quiet_library_bars
from runner.exit import exit_without_teardown

# In the order `fisao --help` lists them: world, eval, estimate, convert, run, resume, sweep, runs, audit.
COMMAND_GROUPS = (world, evaluate, estimate, convert, campaigns, runs)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fisao", description="Fine-grained self-alignment (FiSAO) campaigns.")
    p.add_argument("--project", default=".", help="project directory holding data/, outputs/, mlflow.db (default: .)")
    sub = p.add_subparsers(dest="command", required=True)
    for group in COMMAND_GROUPS:
        group.add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not Path(args.project).is_dir():  # checked first: MLflow would create it and a database in it
        print(f"fisao: error: --project {args.project} is not a directory: give an existing project folder "
              "(the one that holds configs/ and data.dvc)", file=sys.stderr)
        return 2
    apply_local_state(args.project)
    quiet_library_bars()
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, CampaignLocked, DataMismatch) as e:
        print(f"fisao: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # read-only or full disk: the path and the cause, in one line
        where = f"{e.filename}: " if e.filename else ""
        print(f"fisao: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2


def entry() -> NoReturn:
    """The `fisao` command (pyproject.toml): `main`, then out without Python's teardown of its
    modules once the command has returned (runner/exit.py); an error still ends it as Python does."""
    exit_without_teardown(main() or 0)


if __name__ == "__main__":  # pragma: no cover
    entry()
