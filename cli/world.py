"""`fisao world build`: generate the synthetic shapes world (library only, no Prefect or MLflow)."""
from __future__ import annotations

import argparse
import time
from pathlib import Path


def _world_build(args: argparse.Namespace) -> int:
    from fisao.config import load_config
    from fisao.world.build import build_world
    from fisao.world.target import check_target

    overrides = {"world.seed": args.seed} if args.seed is not None else {}
    cfg = load_config(args.config, overrides)
    project = Path(args.project).resolve()
    if args.track:  # checked before building: the data directory is the first part of --out
        inside = Path(args.out).resolve()
        if not inside.is_relative_to(project) or inside == project:
            raise ValueError(f"--track needs --out inside the project {project} (e.g. data/world), got {args.out}")
    out = check_target(args.out, project, cfg.world, args.force)
    t = time.time()
    try:
        build_world(out, cfg.world)
    except OSError as e:  # read-only folder, full disk: nothing is left half-written (atomic_dir)
        raise OSError(e.errno, f"cannot write the world: {e.strerror or e}", str(out)) from e
    print(f"built the world (seed {cfg.world.seed}) in {args.out} in {time.time() - t:.1f}s")
    if args.track:
        from fisao import dvcdata

        data_dir = out.relative_to(project).parts[0]
        md5 = dvcdata.track(project, data_dir)
        print(f"recorded {data_dir}/ as {md5} in {data_dir}.dvc and {data_dir}.md5: commit both")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    world = sub.add_parser("world", help="the synthetic shapes world").add_subparsers(dest="world_command", required=True)
    wb = world.add_parser("build", help="generate the world (deterministic for a seed)")
    wb.add_argument("--out", default="data/world")
    wb.add_argument("--seed", type=int, default=None, help="overrides world.seed of the config")
    wb.add_argument("--config", default=None, help="campaign YAML whose `world` section to use (default: built-in)")
    wb.add_argument("--track", action="store_true", help="then `dvc add` the data directory and write its manifest")
    wb.add_argument("--force", action="store_true",
                    help="replace a previous world of another config in --out (never a folder holding other files)")
    wb.set_defaults(func=_world_build)
