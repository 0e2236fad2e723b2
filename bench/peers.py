"""FiSAO beside what users run instead (issue 14): four methods from the same bytes, one table.

    python bench/peers.py --world 0 --seeds 0,1,2 [--rounds 3] [--config configs/demo.yaml] --out outputs/peers
    python bench/peers.py --world data --seeds 0 --rounds 1 --config tiny.yaml --out outputs/peers-tiny [--tune]

`--world` is a world seed (the world `fisao sweep --worlds SEED` uses, in `data-sweep-w<seed>-*/`)
or the project's data directory (`data`, or its `data/world`). For each training seed s
(`rollout.seed` = `ppo.seed` = s, as `fisao sweep` sets them):
1. `fisao`: the config's campaign, run through the project's own campaign flow (Prefect-cached, in
   MLflow), named `peers-<world>-fisao-s<s>`;
2. `fisao-sentence`: the same with `reward.level: sentence` (configs/ablation-sentence.yaml);
3. `trl-grpo` (`fisao.peers.grpo.grpo_round`) and 4. `csr-dpo` (`fisao.peers.csr.csr_round`), each
   from the base LLaVA, the CLIP and the mention-level calibration that seed's `fisao` campaign used
   (its summary.json), on the same images per round (`fisao.align.sample.round_examples`), the same answers per
   image and the same LoRA; round k continues round k−1's adapters.
Every round's merged checkpoint is evaluated by the campaign's own evaluation task
(`flows.rounds.evaluate_model`, cached on the checkpoint's hash) on the config's `eval.split`, so
round 0 is one and the same evaluation for all four. The peers are logged to MLflow as campaigns
of their own (a parent run per method and seed, a nested run per round, round 0 the base model,
the campaigns' metric names and `round` param), so `make mlflow-ui` compares all four.

`--tune`: each method's learning rate picked from `--lrs` (default 5e-4, 1e-3, 2e-3) on the val
split (`eval.split: val`) with the first seed (`fisao.peers.compare.pick_lr`: the lowest last-round
CHAIR_i among the rates that keep recall within 2 points of the base's), then every seed runs on
the config's split with it; this triples the cost. `--lr fisao=1e-3,trl-grpo=5e-4,...` instead
gives methods their rates (e.g. those an earlier `--tune` picked; peers.json says so); without either
every method uses `ppo.lr`.

Writes `OUT/peers.json` (`seeds`, `methods` → each method's `chair_s`, `chair_i`, `recall`,
`pope_adversarial_f1` over rounds, index 0 the base model, means over seeds, the same keys with
`_std`, `answers`, `seconds_per_answer`, `peak_rss_mb`, `lr`, `campaigns`, `round_dirs`; `how` says
how each figure was measured) and `OUT/peers.png` (CHAIR_i, recall and POPE adversarial F1 per
round), prints the table, and the JSON as the last line of stdout. Running it again continues:
finished FiSAO rounds are taken from MLflow and their stages' directories, evaluations from theirs, and a
peer's round whose inputs (previous checkpoint, base models, calibration, config sections, code) are
unchanged from its content-addressed directory (`outputs/campaigns/<peer campaign>/rounds/<key>/`);
`stages_cached` then says the seconds are those of the process that ran it.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fisao.localstate import apply_local_state  # noqa: E402
from fisao.progress import quiet_library_bars  # noqa: E402

HOW = {
    "curves": "each round's merged checkpoint evaluated by the campaign's evaluation task on eval.split; "
              "index 0 is the base model; mean and sample std (n - 1, null for one seed) over the seeds",
    "answers": "sampled answers the method trained on, all rounds and seeds: fisao counts its yes/no question "
               "answers too (images x (rollout.n_per_image + rollout.questions_per_image)), the peers only the "
               "descriptions (images x rollout.n_per_image)",
    "seconds_per_answer": {
        "fisao": "the round stages' own `seconds` (rollouts + score + update, each from loading its model to "
                 "writing its output) summed over rounds and seeds, over the answers; a stage taken from Prefect's "
                 "cache reports the seconds of the process that ran it (`stages_cached` says so)",
        "peers": "each round's own `seconds` (from loading the model to writing adapter and merged checkpoint: "
                 "sampling, scoring and the update interleaved by TRL), summed over rounds and seeds, over the answers; "
                 "a round found finished on disk reports the seconds of the process that ran it (`stages_cached`)",
    },
    "peak_rss_mb": "the most resident memory this process held while the method ran (sampled every 50 ms from "
                   "/proc/self/status): it includes what earlier steps left allocated (Prefect, the imports)",
}


def world_overrides(cfg, project: Path, world: str) -> tuple[dict, str]:
    """(config overrides, label) of `--world`: a world seed, or a data directory inside the project."""
    from fisao.sweep import world_data_dir

    try:
        seed = int(world)
    except ValueError:
        seed = None
    if seed is not None:
        return {"world.seed": seed, "data_dir": world_data_dir(cfg, seed)}, f"w{seed}"
    path = Path(world) if Path(world).is_absolute() else project / world
    if (path / "world.json").is_file():  # the world directory itself: its data directory holds it
        path = path.parent
    if not path.is_dir():
        raise FileNotFoundError(f"--world {world}: no directory {path}; give a world seed (--world 0) or the "
                                "project's data directory (--world data)")
    try:
        rel = path.resolve().relative_to(project)
    except ValueError as e:
        raise ValueError(f"--world {world} is outside the project {project}: campaigns read their data from the "
                         "project (DVC records it there); give a world seed or a data directory inside it") from e
    return {"data_dir": rel.as_posix()}, rel.name


def parse_method_lrs(text: str, methods: tuple[str, ...]) -> dict[str, float]:
    """"fisao=1e-3,trl-grpo=5e-4" -> {method: learning rate}; methods left out keep the config's ppo.lr."""
    out: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        method, eq, value = part.partition("=")
        if not eq or method not in methods:
            raise ValueError(f"--lr takes METHOD=RATE pairs such as fisao=1e-3,trl-grpo=5e-4 with METHOD one of "
                             f"{', '.join(methods)}; got {part!r}")
        if method in out:
            raise ValueError(f"--lr names {method} twice: give each method once")
        try:
            out[method] = float(value)
        except ValueError as e:
            raise ValueError(f"--lr {part!r}: {value!r} is not a number") from e
        if not out[method] > 0:
            raise ValueError(f"--lr {part!r}: a learning rate must be positive")
    return out


def parse_lrs(text: str) -> tuple[float, ...]:
    try:
        lrs = tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError as e:
        raise ValueError(f"--lrs takes comma-separated learning rates such as 5e-4,1e-3,2e-3, got {text!r}") from e
    if not lrs or any(not lr > 0 for lr in lrs) or len(set(lrs)) != len(lrs):
        raise ValueError(f"--lrs {text!r}: give distinct positive learning rates, e.g. 5e-4,1e-3,2e-3")
    return lrs


# -- one method for one seed -----------------------------------------------------------------------

def run_fisao(ctx: dict, method: str, name: str, overrides: dict) -> dict:
    """A FiSAO campaign through the project's campaign flow; its rounds, seconds and answers."""
    from flows.campaign import campaign

    from fisao.config import load_config
    from fisao.peers.compare import FISAO_METHODS

    overrides = {**overrides, **FISAO_METHODS[method]}
    summary = campaign(config_path=ctx["config"], project=ctx["project"], overrides=overrides, run_name=name,
                       rounds=ctx["rounds"])
    cfg = load_config(ctx["config"], overrides)
    rounds = summary["rounds"]
    per_round = cfg.rollout.images_per_round * (cfg.rollout.n_per_image + cfg.rollout.questions_per_image)
    cached = any(s["cached"] for k, s in summary["stages"].items()
                 if k.split("-")[0] in ("rollouts", "score", "update", "round"))
    return {"name": name, "rounds": rounds, "seconds": sum(r["seconds/round"] for r in rounds[1:]),
            "answers": per_round * (len(rounds) - 1), "stages_cached": cached, "summary": summary,
            "round_dirs": [str(Path(summary["summary_path"]).parent / f"round-{k}") for k in range(1, len(rounds))]}


def peer_round(method: str, cfg, base: dict, adapter_in, examples, verifier, calibration, k: int, out: Path) -> dict:
    """One round of a peer from the base LLaVA (and the previous round's adapter); returns its figures."""
    if method == "trl-grpo":
        from fisao.peers.grpo import grpo_round

        return grpo_round(base["llava"]["path"], adapter_in, examples, verifier, calibration, rollout=cfg.rollout,
                          reward=cfg.reward, lora=cfg.lora, ppo=cfg.ppo, round_index=k, out=out)
    from fisao.peers.csr import CSRConfig, csr_round

    csr = CSRConfig(lr=cfg.ppo.lr, seed=cfg.ppo.seed)
    return csr_round(base["llava"]["path"], adapter_in, examples, verifier, cfg.rollout, cfg.lora, csr, k, out,
                     runtime=cfg.model)


PEER_MODULES = {"trl-grpo": "fisao.peers.grpo", "csr-dpo": "fisao.peers.csr"}  # what a peer's round runs


def run_peer(ctx: dict, method: str, name: str, overrides: dict, base: dict) -> dict:
    """A peer's rounds from `base` (the summary of the same seed's fisao campaign), logged as a campaign."""
    from prefect import tags as prefect_tags

    from fisao import io
    from fisao.align.files import FIGURES
    from fisao.align.sample import round_examples
    from fisao.align.score import load_verifier, read_calibration
    from fisao.config import config_hash, load_config
    from fisao.inputs import config_identity_hash, identity
    from fisao.localstate import campaign_dir
    from fisao.locks import RunLock
    from fisao.progress import bar
    from fisao.summary import headline
    from fisao.versioning import code_version, stage_files
    from flows.rounds import ALIGN_CODE, evaluate_model, round_params
    from tasks.campaigns import campaign_state, open_campaign
    from tasks.common import build_once, key_of
    from tasks.publish import run_tag
    from tasks.tracking import covering, describe, evaluation_span, log_round, span_of

    t0 = time.time()
    cfg = load_config(ctx["config"], {**overrides, "name": name})
    world, llava = base["world"], base["llava"]
    here = campaign_dir(ctx["project"], cfg.outputs_dir, name)
    peer = {"peer.method": method, "peer.lr": cfg.ppo.lr}  # the base campaign is a tag: its lr may differ, its bytes not
    tags = {"fisao.data_md5": world["md5"], "fisao.config_hash": config_identity_hash(cfg), "fisao.peer": method,
            "fisao.base_campaign": base["name"], "fisao.clip_sha256": base["clip"]["sha256"],
            "fisao.calibration_sha256": base["calibration"]["sha256"]}
    inputs = {"data_md5": world["md5"], "config_hash": tags["fisao.config_hash"], "config": {**identity(cfg), **peer},
              "resolved": cfg.model_dump(mode="json")}
    with RunLock(here / ".lock", name) as lock, prefect_tags(run_tag("campaign", name)):
        parent = open_campaign(name, inputs, tags, str(lock.path), started=t0)
        try:
            timings: dict = {}
            evaluation = evaluate_model(cfg, ctx["project"], 0, llava, world, timings, t0)
            rounds = [evaluation["metrics"]]
            log_round(name, name, 0, rounds[0], {**round_params(cfg, llava, 0), **peer},
                      {**tags, "fisao.model_sha256": llava["sha256"], "fisao.model_path": llava["path"]},
                      {"evaluation": evaluation["path"]}, span=evaluation_span(evaluation["path"]))
            verifier = load_verifier(base["clip"]["path"], world["path"], cfg.reward, cfg.model)
            calibration = read_calibration(base["calibration"]["path"])[0]
            policy, adapter, seconds, answers, dirs, cached = llava, None, 0.0, 0, [], False
            ppo = cfg.ppo.model_copy(update={"rounds": 1})  # the round count is not a round's input
            code = code_version(*sorted({*ALIGN_CODE, *stage_files(PEER_MODULES[method])}))
            for k in bar(range(1, ctx["rounds"] + 1), f"{name}: rounds"):
                # Content-addressed, as a FiSAO round's stages: the same inputs find the finished round.
                out = here / "rounds" / key_of(method, k, policy["sha256"], base["clip"]["sha256"],
                                               base["calibration"]["sha256"], world["md5"], config_hash(cfg.rollout),
                                               config_hash(cfg.reward), config_hash(cfg.lora), config_hash(ppo), code)
                examples = round_examples(world["path"], cfg.rollout, k)
                cached |= not build_once(out, FIGURES, functools.partial(
                    peer_round, method, cfg, base, adapter, examples, verifier, calibration, k, out))
                figures = io.read_json(out / FIGURES)
                model = {"path": str(out / "model"), "sha256": io.tree_digest(out / "model")}
                evaluation = evaluate_model(cfg, ctx["project"], k, model, world, timings, t0)
                scalars = {f"{method}/{key}": v for key, v in figures.items()
                           if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None}
                metrics = {**evaluation["metrics"], **scalars, "seconds/round": figures["seconds"]}
                rounds.append(metrics)
                artifacts = {"adapter": str(out / "adapter"), **{p.stem: str(p) for p in sorted(out.glob("*.json*"))},
                             "evaluation": evaluation["path"]}
                lineage = {**tags, "fisao.parent_sha256": policy["sha256"], "fisao.parent_path": policy["path"],
                           "fisao.model_sha256": model["sha256"], "fisao.model_path": model["path"]}
                log_round(name, name, k, metrics, {**round_params(cfg, model, k), **peer}, lineage, artifacts,
                          span=covering(span_of(out, FIGURES, figures["seconds"]),
                                        evaluation_span(evaluation["path"])))
                policy, adapter = model, out / "adapter"
                seconds += figures["seconds"]
                answers += figures["answers"]
                dirs.append(str(out))
            describe(parent["run_id"], f"{name} ({method}): {headline(rounds)}")
            campaign_state(parent["run_id"], {"fisao.rounds_done": str(ctx["rounds"])}, end="finished")
        except BaseException as e:  # the campaign's run says how it ended, then the error goes on
            end = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
            campaign_state(parent["run_id"], {"fisao.error": f"{type(e).__name__}: {e}"[:4000]}, end=end)
            raise
    io.write_json(here / "summary.json", {"name": name, "method": method, "base_campaign": base["name"],
                                          "rounds": rounds, "round_dirs": dirs})
    return {"name": name, "rounds": rounds, "seconds": seconds, "answers": answers, "stages_cached": cached,
            "round_dirs": dirs}


def run_method(ctx: dict, method: str, seed: int, lr: float, split: str) -> dict:
    """Method `method` with training seed `seed` and learning rate `lr`, evaluated on `split`."""
    from fisao.peers.compare import FISAO_METHODS, campaign_name, seed_overrides

    name = campaign_name(ctx["prefix"], method, seed, lr, ctx["default_lr"], split)
    overrides = {**ctx["world"], **seed_overrides(seed), "ppo.lr": lr, "eval.split": split}
    if method in FISAO_METHODS:
        result = run_fisao(ctx, method, name, overrides)
        if method == "fisao":
            ctx["bases"][(seed, split)] = {"name": name, **{k: result["summary"][k] for k in
                                                            ("world", "llava", "clip", "calibration")}}
        return result
    base = ctx["bases"].get((seed, split))
    assert base is not None, "the fisao campaign of a seed runs before its peers (METHODS order)"
    return run_peer(ctx, method, name, overrides, base)


# -- the flow --------------------------------------------------------------------------------------

def _flow():
    from prefect import flow

    @flow(name="fisao-peers", flow_run_name="peers")
    def peers(config: str, world: str, seeds: list[int], rounds: int, out: str, project: str, tune: bool = False,
              lrs: list[float] | None = None, given: dict[str, float] | None = None) -> dict:
        """Every method for every seed (after tuning the learning rates on val with `--tune`); writes peers.json/png."""
        import torch

        from fisao import io
        from fisao.config import load_config
        from fisao.localstate import use_project
        from fisao.host import PeakRSS
        from fisao.peers.compare import LRS, METHODS, curves, pick_lr, plot
        from fisao.progress import bar
        from fisao.summary import compare_link
        from tasks.mlflow_store import experiment_id, init_store

        use_project(project)
        init_store(project)
        cfg = load_config(config)
        overrides, label = world_overrides(cfg, Path(project), world)
        ctx = {"config": config, "project": project, "rounds": rounds, "world": overrides, "prefix": f"peers-{label}",
               "default_lr": cfg.ppo.lr, "bases": {}}
        lrs = tuple(lrs or LRS)
        chosen, tuning = {m: (given or {}).get(m, cfg.ppo.lr) for m in METHODS}, {}
        if tune:
            for method, lr in bar([(m, lr) for m in METHODS for lr in lrs], "peers: tuning on val"):
                tuning.setdefault(method, {})[lr] = run_method(ctx, method, seeds[0], lr, "val")["rounds"]
            chosen = {m: pick_lr(tuning[m]) for m in METHODS}
        runs = {m: [] for m in METHODS}
        peaks = {m: 0.0 for m in METHODS}
        for seed, method in bar([(s, m) for s in seeds for m in METHODS], "peers"):
            with PeakRSS() as rss:
                runs[method].append(run_method(ctx, method, seed, chosen[method], cfg.eval.split))
            peaks[method] = max(peaks[method], rss.peak)
        methods = {}
        for m in METHODS:
            answers = sum(r["answers"] for r in runs[m])
            methods[m] = {**curves([r["rounds"] for r in runs[m]]), "answers": answers,
                          "seconds_per_answer": sum(r["seconds"] for r in runs[m]) / answers,
                          "peak_rss_mb": round(peaks[m], 1), "lr": chosen[m],
                          "stages_cached": any(r["stages_cached"] for r in runs[m]),
                          "campaigns": [r["name"] for r in runs[m]], "round_dirs": [r["round_dirs"] for r in runs[m]]}
        names = [name for m in METHODS for name in methods[m]["campaigns"]]
        ids = [i for i in (experiment_id(name, create=False) for name in names) if i is not None]
        result = {"seeds": list(seeds), "methods": methods, "world": world, "config": config, "rounds": rounds,
                  "mlflow_compare": compare_link(ids) if ids else None,
                  "split": cfg.eval.split, "threads": torch.get_num_threads(),
                  "lr": {"tuned": tune, "values": list(lrs) if tune else [cfg.ppo.lr],
                         "how": ("picked per method on the val split with seed %d: the lowest last-round CHAIR_i among "
                                 "the rates keeping recall within 2 points of the base's" % seeds[0]) if tune else
                                (f"given with --lr ({', '.join(f'{m}={lr:g}' for m, lr in given.items())}); the others "
                                 "use the config's ppo.lr" if given else
                                 "not tuned: every method uses the config's ppo.lr (run with --tune to pick it on val)"),
                         "val": {m: {f"{lr:g}": {k: tuning[m][lr][-1].get(k) for k in ("chair_i", "recall")}
                                     for lr in lrs} for m in tuning}},
                  "how": HOW}
        out_dir = Path(out)
        io.write_json(out_dir / "peers.json", result)
        plot(result, out_dir / "peers.png")
        return result

    return peers


def table(result: dict) -> str:
    """One row per method: base and last-round figures (mean ± std over seeds), cost and learning rate."""
    from fisao.summary import table as text_table

    def cell(figures: dict, key: str, k: int) -> str:
        mean, std = figures[key][k], figures[f"{key}_std"][k]
        return f"{mean:.3f}" + ("" if std is None else f" ± {std:.3f}")

    rows = []
    for method, f in result["methods"].items():
        last = len(f["chair_i"]) - 1
        cut = f"{100 * (f['chair_i'][0] - f['chair_i'][last]) / f['chair_i'][0]:+.0f}%" if f["chair_i"][0] else "-"
        rows.append([method, *(cell(f, key, last) for key in ("chair_s", "chair_i", "recall", "pope_adversarial_f1")),
                     cut, f["answers"], f"{f['seconds_per_answer']:.3f}", f"{f['peak_rss_mb']:.0f}",
                     f"{f['lr']:g}"])
    base = next(iter(result["methods"].values()))
    rows.insert(0, ["base", *(cell(base, key, 0) for key in ("chair_s", "chair_i", "recall", "pope_adversarial_f1")),
                    "-", "-", "-", "-", "-"])
    return text_table(["method", "chair_s", "chair_i", "recall", "pope_adv_f1", "chair_i cut", "answers",
                       "s/answer", "peak RSS MB", "lr"], rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", required=True, help="a world seed (e.g. 0) or the project's data directory (e.g. data)")
    p.add_argument("--seeds", default="0", help="training seeds, e.g. 0,1,2 (default: 0)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per method (default: 3)")
    p.add_argument("--config", default="configs/demo.yaml", help="the campaign config (default: configs/demo.yaml)")
    p.add_argument("--out", required=True, help="directory for peers.json and peers.png")
    p.add_argument("--project", default=".", help="the project directory (default: .)")
    p.add_argument("--tune", action="store_true", help="pick each method's learning rate on val first (3x the cost)")
    p.add_argument("--lrs", default="5e-4,1e-3,2e-3", help="the learning rates --tune picks from")
    p.add_argument("--lr", default="", help="fixed rates instead of --tune, e.g. fisao=1e-3,trl-grpo=5e-4 (others: ppo.lr)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    project = Path(args.project).resolve()
    if not project.is_dir():
        print(f"peers: error: --project {args.project} is not a directory", file=sys.stderr)
        return 2
    apply_local_state(project)  # before Prefect and MLflow are imported
    quiet_library_bars()
    from fisao.sweep import parse_seeds

    try:
        seeds = parse_seeds(args.seeds, "--seeds")
        lrs = parse_lrs(args.lrs)
        from fisao.peers.compare import METHODS

        given = parse_method_lrs(args.lr, METHODS)
        if given and args.tune:
            raise ValueError("--lr gives the learning rates and --tune picks them: use one of the two")
        if args.rounds < 1:
            raise ValueError(f"--rounds is {args.rounds}: the comparison needs at least one round, e.g. --rounds 3")
        config = str(Path(args.config).resolve())
        if not Path(config).is_file():
            raise FileNotFoundError(f"--config {args.config}: no such file (e.g. configs/demo.yaml)")
        from runner.ephemeral import start_api

        start_api(project)
        result = _flow()(config=config, world=args.world, seeds=list(seeds), rounds=args.rounds,
                         out=str(Path(args.out).resolve()), project=str(project), tune=args.tune, lrs=list(lrs), given=given)
    except (ValueError, FileNotFoundError) as e:
        print(f"peers: error: {e}", file=sys.stderr)
        return 2
    print(table(result))
    print(f"wrote {Path(args.out) / 'peers.json'} and {Path(args.out) / 'peers.png'}")
    if result.get("mlflow_compare"):
        print(f"all campaigns in one MLflow view: make mlflow-ui, then open {result['mlflow_compare']}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
