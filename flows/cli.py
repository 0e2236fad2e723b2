"""The `fisao` command line.

It lives with the flows because some commands start them; commands that need only the library
(`world build`, `eval chair`, `eval pope`) never import Prefect or MLflow, so they start fast.
Project-local state (Prefect home, MLflow store) is set up before anything imports Prefect.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

from fisao.dvcdata import DataMismatch
from fisao.localstate import apply_local_state
from fisao.locks import CampaignLocked
from fisao.progress import quiet_library_bars


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


def _eval_chair(args: argparse.Namespace) -> int:
    from fisao.benchmarks.chair import chair_from_files

    metrics = chair_from_files(args.captions, args.annotations, args.references, args.vocab, args.details)
    print(json.dumps(metrics))
    if metrics["n_unknown_image"]:
        total = metrics["n_captions"] + metrics["n_unknown_image"] + metrics["n_empty"]
        print(f"fisao: warning: {metrics['n_unknown_image']} of {total} captions name image ids that "
              f"{args.annotations} does not have; they are left out of every figure", file=sys.stderr)
    return 0


def _eval_pope(args: argparse.Namespace) -> int:
    from fisao.benchmarks.pope import check_unclear, pope_from_files

    metrics = pope_from_files(args.questions, args.answers)
    print(json.dumps(metrics))
    print(f"unclear answers (neither yes nor no, scored as yes): {metrics['n_unclear']} of {metrics['n']}",
          file=sys.stderr)
    if not args.allow_unclear:
        check_unclear(metrics)
    return 0


def _registered(uri: str) -> Path:
    """The local checkpoint of a registered model's URI (models:/demo@best), said on stderr."""
    from tasks.records import checkpoint_dir

    path = checkpoint_dir(uri)
    print(f"{uri}: {path}", file=sys.stderr)
    return path


def _eval_model(args: argparse.Namespace) -> int:
    from fisao.models.source import check_model_source

    out_name = Path(args.model).name
    if args.model.startswith("models:/"):
        args.model = str(_registered(args.model))
    check_model_source(args.model)  # before torch and transformers load: a wrong path is said at once
    from fisao.config import load_config
    from fisao.evaluate import evaluate_model
    from flows.report import table

    overrides = {f"eval.{k}": v for k, v in (("limit", args.limit), ("split", args.split)) if v is not None}
    cfg = load_config(args.config, overrides).eval
    benchmarks = tuple(b.strip() for b in args.benchmarks.split(",") if b.strip())
    out = Path(args.out or Path("outputs") / "eval-cli" / out_name)
    metrics = evaluate_model(args.model, args.data, benchmarks, cfg, out, trust_remote_code=args.trust_remote_code)
    print(table(["metric", "value"], [[k, v] for k, v in metrics.items()]))
    print(f"\nanswers, details and metrics.json in {out}")
    return 0


def _estimate(args: argparse.Namespace) -> int:
    from fisao.config import load_config
    from fisao.memory import available_memory, campaign_estimate, check_fits, report
    from fisao.runtime import runtime_device

    cfg = load_config(args.config)
    if cfg.model is None:
        raise ValueError(f"{args.config} has no model section: the estimate is for real checkpoints")
    est = campaign_estimate(cfg)
    if args.memory_gib or cfg.model.memory_gib:
        gib = args.memory_gib or cfg.model.memory_gib
        available, where = int(gib * 1024 ** 3), f"the given budget ({gib} GiB)"
    else:
        available, where = available_memory(runtime_device(cfg.model))
    print(report(est, where, available))
    check_fits(est, available, where)
    return 0


def _convert_eva_clip(args: argparse.Namespace) -> int:
    from fisao.models.eva_clip import convert_open_clip_checkpoint

    out = convert_open_clip_checkpoint(args.state_dict, args.tokenizer, args.image_processor, args.out,
                                       (args.vision_heads, args.text_heads), args.image_size)
    print(f"EVA-CLIP verifier written to {out}: set model.verifier: {out}")
    return 0


def _campaign(args: argparse.Namespace, config: str | None, overrides: dict, name: str) -> int:
    """Start the campaign flow under the campaign's lock (taken here first, to refuse before Prefect starts)."""
    from fisao.config import load_config
    from fisao.localstate import campaign_dir
    from fisao.locks import RunLock

    project = str(Path(args.project).resolve())
    cfg = load_config(config, {**overrides, "name": name})
    from flows.shutdown import CampaignStop

    with RunLock(campaign_dir(project, cfg.outputs_dir, name) / ".lock", name) as lock, \
            CampaignStop(name, lock.path) as stop:  # Ctrl-C/SIGTERM: recorded, released, ends in seconds
        if lock.took_over:
            print(f"fisao: took over the lock of campaign {name!r} from {lock.took_over.describe()}, which is no "
                  "longer running", file=sys.stderr)
        from flows.campaign import campaign
        from flows.ephemeral import start_api
        from flows.report import print_summary

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
    from tasks.records import campaign_parent, recorded_inputs

    inputs = recorded_inputs(args.name)
    if inputs is None:
        raise ValueError(f"no campaign {args.name!r} in MLflow ({os.environ['MLFLOW_TRACKING_URI']}); start it with "
                         f"`fisao run --config CONFIG --run-name {args.name}`, or list campaigns with `fisao runs`")
    if args.rounds is None and args.more_rounds is None:
        args.rounds = int(campaign_parent(args.name).data.tags.get("fisao.target_rounds", inputs["resolved"]["ppo"]["rounds"]))
    return _campaign(args, None, inputs["resolved"], args.name)


def _sweep(args: argparse.Namespace) -> int:
    """One campaign per world seed × training seed, one table (flows/sweep.py); the lock is taken before Prefect
    starts, and Ctrl-C/SIGTERM stop it as they stop a campaign (flows/shutdown.py)."""
    from fisao.config import load_config
    from fisao.localstate import campaign_dir
    from fisao.sweep import default_name, parse_seeds, plan, sweep_lock

    worlds, seeds = parse_seeds(args.worlds, "--worlds"), parse_seeds(args.seeds, "--seeds")
    project, cfg = str(Path(args.project).resolve()), load_config(args.config)
    name = args.name or default_name(cfg)
    runs = plan(cfg, name, worlds, seeds)
    locks = {run.name: campaign_dir(project, cfg.outputs_dir, run.name) / ".lock" for run in runs}
    from flows.shutdown import SweepStop

    with sweep_lock(project, cfg.outputs_dir, name) as lock, \
            SweepStop(name, lock.path, locks, sweep_command(args, name)) as stop:
        from flows.ephemeral import start_api
        from flows.report import print_sweep
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


def _runs(args: argparse.Namespace) -> int:
    from flows.inspect import campaign_detail, runs_overview
    from tasks.records import all_campaigns

    if args.name:
        print(campaign_detail(args.name, args.metric))
        return 0
    parents = all_campaigns()
    print(runs_overview(parents, args.metric) if parents else "no campaigns yet (`fisao run` starts one)")
    return 0


def _audit(args: argparse.Namespace) -> int:
    from flows.inspect import audit, registered_round

    name, k = args.name, args.round
    if name.startswith("models:/"):
        _registered(name)
        name, k = registered_round(name, k)
    elif k is None:
        raise ValueError(f"give the round to audit: `fisao audit {name} --round K`, or a registered model's URI "
                         f"(`fisao audit models:/{name}@best`)")
    print(audit(name, k, args.export, args.show))
    return 0


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fisao", description="Fine-grained self-alignment (FiSAO) campaigns.")
    p.add_argument("--project", default=".", help="project directory holding data/, outputs/, mlflow.db (default: .)")
    sub = p.add_subparsers(dest="command", required=True)

    world = sub.add_parser("world", help="the synthetic shapes world").add_subparsers(dest="world_command", required=True)
    wb = world.add_parser("build", help="generate the world (deterministic for a seed)")
    wb.add_argument("--out", default="data/world")
    wb.add_argument("--seed", type=int, default=None, help="overrides world.seed of the config")
    wb.add_argument("--config", default=None, help="campaign YAML whose `world` section to use (default: built-in)")
    wb.add_argument("--track", action="store_true", help="then `dvc add` the data directory and write its manifest")
    wb.add_argument("--force", action="store_true",
                    help="replace a previous world of another config in --out (never a folder holding other files)")
    wb.set_defaults(func=_world_build)

    ev = sub.add_parser("eval", help="benchmarks: score files, or run a model").add_subparsers(dest="eval_command", required=True)
    ch = ev.add_parser("chair", help="CHAIR of captions against COCO-format instances")
    ch.add_argument("--captions", required=True, help='JSONL of {"image_id": ..., "caption": ...}')
    ch.add_argument("--annotations", required=True, help="COCO instances JSON")
    ch.add_argument("--references", default=None, help="reference captions (JSONL or COCO captions JSON)")
    ch.add_argument("--vocab", default=None, help="synonyms file (default: COCO-80 of the CHAIR authors)")
    ch.add_argument("--details", default=None, help="write each caption's mentioned/hallucinated/missed objects here")
    ch.set_defaults(func=_eval_chair)
    po = ev.add_parser("pope", help="POPE figures of answers, paired to questions by question_id")
    po.add_argument("--questions", required=True)
    po.add_argument("--answers", required=True, help='JSONL of {"question_id": ..., "text": ...}')
    po.add_argument("--allow-unclear", action="store_true",
                    help="accept more than 10%% unclear answers (neither yes nor no; POPE scores them as yes)")
    po.set_defaults(func=_eval_pope)
    mo = ev.add_parser("model", help="run a model on CHAIR/POPE/MME and print a table")
    mo.add_argument("--model", required=True, help="model directory (save_pretrained layout), hub id, or registered "
                                                   "model: models:/NAME@ALIAS (models:/demo@best), models:/NAME/VERSION")
    mo.add_argument("--data", default="data/world", help="a world directory or COCO-layout directory")
    mo.add_argument("--benchmarks", default="chair,pope")
    mo.add_argument("--limit", type=int, default=None, help="evaluate on N images")
    mo.add_argument("--split", default=None, help="world split (default: the config's, test)")
    mo.add_argument("--config", default=None, help="campaign YAML whose `eval` section to use")
    mo.add_argument("--out", default=None, help="where answers and details go")
    mo.add_argument("--trust-remote-code", action="store_true", help="allow model code from the checkpoint")
    mo.set_defaults(func=_eval_model)

    es = sub.add_parser("estimate", help="parameters and memory a real-model campaign needs; refuses what cannot fit")
    es.add_argument("--config", required=True)
    es.add_argument("--memory-gib", type=float, default=None, help="check against this budget instead of the device")
    es.set_defaults(func=_estimate)

    cv = sub.add_parser("convert", help="make a verifier directory").add_subparsers(dest="convert_command", required=True)
    eva = cv.add_parser("eva-clip", help="an open_clip EVA01 checkpoint -> InstructBLIP's verifier (fisao/models/eva_clip.py)")
    eva.add_argument("--state-dict", required=True, help="open_clip state dict (.bin/.pt or .safetensors)")
    eva.add_argument("--tokenizer", required=True, help="CLIP tokenizer, e.g. openai/clip-vit-large-patch14-336")
    eva.add_argument("--image-processor", required=True, help="the policy's, e.g. Salesforce/instructblip-vicuna-7b")
    eva.add_argument("--out", required=True)
    eva.add_argument("--vision-heads", type=int, default=16, help="EVA01-g-14: 16")
    eva.add_argument("--text-heads", type=int, default=12, help="EVA01-g-14: 12")
    eva.add_argument("--image-size", type=int, default=224)
    eva.set_defaults(func=_convert_eva_clip)

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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
