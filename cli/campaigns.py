"""`fisao run`, `fisao resume` and `fisao sweep`: start the campaign or sweep flow under its lock.

The lock is taken here first, to refuse before Prefect starts; Ctrl-C/SIGTERM stop the command as
runner/shutdown.py says, and the temporary Prefect API is started in a session of its own
(runner/ephemeral.py).
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path


def _campaign(args: argparse.Namespace, config: str | None, overrides: dict, name: str) -> int:
    """Start the campaign flow under the campaign's lock (taken here first, to refuse before Prefect starts)."""
    from fisao.config import load_config
    from fisao.localstate import campaign_dir
    from fisao.locks import RunLock

    project = str(Path(args.project).resolve())
    cfg = load_config(config, {**overrides, "name": name})
    from runner.shutdown import CampaignStop

    with RunLock(campaign_dir(project, cfg.outputs_dir, name) / ".lock", name) as lock, \
            CampaignStop(name, lock.path) as stop:  # Ctrl-C/SIGTERM: recorded, released, ends in seconds
        if lock.took_over:
            print(f"fisao: took over the lock of campaign {name!r} from {lock.took_over.describe()}, which is no "
                  "longer running", file=sys.stderr)
        from fisao.summary import print_summary
        from flows.campaign import campaign
        from runner.ephemeral import start_api

        stop.watch(start_api(project))

        summary = campaign(config_path=config, project=project, overrides=overrides, run_name=name,
                           rounds=args.rounds, add_rounds=args.more_rounds, allow_changed_data=args.allow_changed_data)
    if stop.code is not None:
        stop.finish()  # exits
    print_summary(summary)
    return 0


def _run(args: argparse.Namespace) -> int:
    from fisao.config import load_config, parse_settings

    overrides = parse_settings(args.set)
    name = args.run_name if args.run_name is not None else load_config(args.config, overrides).name
    return _campaign(args, args.config, overrides, name)


def _resume(args: argparse.Namespace) -> int:
    from tasks.resume import recorded_campaign

    recorded = recorded_campaign(args.name)  # the config it started with and its round target
    if args.rounds is None and args.more_rounds is None:
        args.rounds = recorded["target_rounds"]
    return _campaign(args, None, recorded["config"], args.name)


def _sweep(args: argparse.Namespace) -> int:
    """One campaign per world seed × training seed, one table (flows/sweep.py); the lock is taken before Prefect
    starts, and Ctrl-C/SIGTERM stop it as they stop a campaign (runner/shutdown.py)."""
    from fisao.config import load_config
    from fisao.localstate import campaign_dir
    from fisao.sweep import default_name, parse_seeds, plan, sweep_lock

    worlds, seeds = parse_seeds(args.worlds, "--worlds"), parse_seeds(args.seeds, "--seeds")
    project, cfg = str(Path(args.project).resolve()), load_config(args.config)
    name = args.name or default_name(cfg)
    runs = plan(cfg, name, worlds, seeds)
    locks = {run.name: campaign_dir(project, cfg.outputs_dir, run.name) / ".lock" for run in runs}
    from runner.shutdown import SweepStop

    with sweep_lock(project, cfg.outputs_dir, name) as lock, \
            SweepStop(name, lock.path, locks, sweep_command(args, name)) as stop:
        from fisao.summary import print_sweep
        from runner.ephemeral import start_api
        from flows.sweep import sweep

        stop.watch(start_api(project))
        result = sweep(config_path=args.config, worlds=list(worlds), seeds=list(seeds), project=project,
                       rounds=args.rounds, name=name)
    if stop.code is not None:
        stop.finish()  # exits
    print_sweep(result)
    return 1 if result["failed"] else 0


def sweep_command(args: argparse.Namespace, name: str) -> str:
    """The `fisao sweep` command line that continues this sweep (what a stopped sweep's last line shows)."""
    project = ["--project", args.project] if args.project != "." else []
    rounds = ["--rounds", str(args.rounds)] if args.rounds is not None else []
    return shlex.join(["fisao", *project, "sweep", "--config", args.config, "--worlds", args.worlds,
                       "--seeds", args.seeds, *rounds, "--name", name])


def _count(text: str) -> int:
    """argparse type: a whole number >= 0."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 0")
    return value


def _add_round_options(p: argparse.ArgumentParser) -> None:
    rounds = p.add_mutually_exclusive_group()
    rounds.add_argument("--rounds", type=_count, default=None,
                        help="FiSAO rounds in all (default: the config's ppo.rounds; 0: the base model and calibration only)")
    rounds.add_argument("--more-rounds", type=_count, default=None,
                        help="run this many rounds more than the campaign has finished (a schedule's 'one more round')")
    p.add_argument("--allow-changed-data", action="store_true",
                   help="continue a campaign although data/ or the config changed since it started (recorded per round)")


def add_commands(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser("run", help="run a campaign (or resume the campaign of that name): world, base models, "
                                      "calibration, FiSAO rounds, evaluation")
    run.add_argument("--config", default="configs/demo.yaml")
    run.add_argument("--run-name", default=None, help="name of the campaign (default: the config's name)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="change one setting of the config, as in the YAML (repeatable): --set ppo.rounds=1")
    _add_round_options(run)
    run.set_defaults(func=_run)
    res = sub.add_parser("resume", help="continue an interrupted campaign with the config it was started with")
    res.add_argument("name")
    _add_round_options(res)
    res.set_defaults(func=_resume)
    sw = sub.add_parser("sweep", help="run a config on several world seeds x training seeds; one table of base and "
                                      "final figures with mean and std (rerun to continue an interrupted sweep)")
    sw.add_argument("--config", default="configs/demo.yaml")
    sw.add_argument("--worlds", required=True, help="world seeds, e.g. 10,11,12 (each its own data-sweep-w<seed>-*/)")
    sw.add_argument("--seeds", default="0", help="training seeds (rollout.seed and ppo.seed), e.g. 0,1 (default: 0)")
    sw.add_argument("--rounds", type=_count, default=None,
                    help="FiSAO rounds per campaign (default: the config's ppo.rounds; 0: check the worlds and base models only)")
    sw.add_argument("--name", default=None, help="the sweep's name (default: the config's name + '-sweep'); "
                                                "its campaigns are NAME-w<world>-s<seed>")
    sw.set_defaults(func=_sweep)
