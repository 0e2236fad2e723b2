"""`fisao runs` and `fisao audit`: what MLflow holds about campaigns (cli/inspect.py reads and prints it).

MLflow is imported only when one of these commands runs, so the other commands start without it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def registered_checkpoint(uri: str) -> Path:
    """The local checkpoint of a registered model's URI (models:/demo@best), said on stderr."""
    from tasks.mlflow_store import checkpoint_dir

    path = checkpoint_dir(uri)
    print(f"{uri}: {path}", file=sys.stderr)
    return path


def _runs(args: argparse.Namespace) -> int:
    from cli.inspect import campaign_detail, runs_overview
    from tasks.mlflow_store import all_campaigns

    if args.name:
        print(campaign_detail(args.name, args.metric))
        return 0
    parents = all_campaigns()
    print(runs_overview(parents, args.metric) if parents else "no campaigns yet (`fisao run` starts one)")
    return 0


def _audit(args: argparse.Namespace) -> int:
    from cli.inspect import audit, registered_round

    name, k = args.name, args.round
    if name.startswith("models:/"):
        registered_checkpoint(name)
        name, k = registered_round(name, k)
    elif k is None:
        raise ValueError(f"give the round to audit: `fisao audit {name} --round K`, or a registered model's URI "
                         f"(`fisao audit models:/{name}@best`)")
    print(audit(name, k, args.export, args.show))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    runs = sub.add_parser("runs", help="list campaigns (rounds, status, best round), or show one")
    runs.add_argument("name", nargs="?")
    runs.add_argument("--metric", default="chair_i", help="metric that picks the best round (default: chair_i, lower is better)")
    runs.set_defaults(func=_runs)
    au = sub.add_parser("audit", help="what trained a round: rollouts with per-token rewards, calibration, parent checkpoint")
    au.add_argument("name", help="a campaign (with --round), or a registered round: models:/NAME@ALIAS, models:/NAME/VERSION")
    au.add_argument("--round", type=int, default=None, help="the round of campaign NAME")
    au.add_argument("--export", default=None, help="also write the round's audit files into this directory")
    au.add_argument("--show", type=int, default=3, help="rollouts to print (default: 3)")
    au.set_defaults(func=_audit)
