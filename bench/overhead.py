"""What orchestration costs: one campaign as plain library calls, then through `fisao run`, with where the difference goes.

    python bench/overhead.py [--config configs/demo.yaml] [--rounds N] [--set KEY=VALUE ...] [--workdir DIR]
    python bench/overhead.py --tiny [--rounds 1]      # configs/tiny.yaml, the test suite's tiny world and models

Both runs do the same campaign from scratch (the world, CLIP and LLaVA builds, the base model's
evaluation, the verifier's calibration, then per round rollouts, scores, the update and its
evaluation), each in a fresh child process of its own and a fresh temp project (git + DVC, as a
clone is), one after the other:
- plain: the `fisao/` functions the tasks call (`ensure_world`, `build_clip`, `build_llava`,
  `evaluate_model`, `calibration_stage`, `rollout_stage`, `score_stage`, `update_stage`) with the
  tasks' arguments, in the flow's order; no Prefect, no MLflow, no content hashes or manifests;
- flow: `fisao --project P run --config C --rounds N` (`cli.main.main`, what the `fisao` command
  runs): the ephemeral Prefect API, the campaign flow and its stage tasks, MLflow logging and
  the model registry, the round reports and manifests, the summary.
`plain_s` and `flow_s` are each child's wall time, from spawning it to its exit; `ratio` is
flow_s / plain_s (the issue's target: at most 1.05 for the demo from scratch). `cpu` has each
child's CPU seconds (its own, its finished children's, and in the flow the Prefect server's),
their totals and ratio: less noisy than wall time on a shared machine, and it shows what the
server's process takes from the cores the library computes on.

Where the time goes, per child (each span below is measured; together they are the child's
wall time, so `where`, the flow's spans less the plain run's, adds up to flow_s − plain_s):
- `process_start`: spawn to the script's first line (the interpreter's start);
- `imports`: the modules each run needs (torch and transformers in both; Prefect, MLflow and the
  flows' modules in the flow);
- `cli_setup`: `fisao run`'s parsing, campaign lock and signal handling before the server starts;
- `server_start`: `runner.ephemeral.start_api` (the temporary Prefect API, its database migrated);
- `flow_run_start`: from calling the flow to its body running (Prefect creates the flow run);
- inside the flow's body, the time of these calls, each without the calls timed inside it:
  `library` (the functions the plain run calls: the same work, so its difference is noise),
  `sha256` (`fisao.io.tree_digest`: checkpoint and stage identities for the stages' keys),
  `manifests` (`write_manifest`), `mlflow` (the bodies of the tracking tasks, `init_store` and
  the registry), `report` (the round report, `round_report`), `prefect_artifacts` (tables and
  summary published to Prefect's UI, flow-run tags);
- `task_bookkeeping`: the rest of the flow's body. Inferred, not timed one by one: Prefect's task
  and subflow runs (state changes through the API, results persisted),
  locks, lineage tags (git state, package versions), logging;
- `flow_run_end`: from the body's return to `fisao run` returning (the flow run's final state,
  the printed summary);
- `exit`: from `main` returning to the process's end (the exit handlers: the Prefect server
  stopped; both runs end as the `fisao` command does, without the interpreter's teardown).
The plain run has `process_start`, `imports`, `library` (its whole campaign), `task_bookkeeping`
(its body less the library calls: config, paths) and `exit`.

The flow child times these calls by wrapping the functions (and the tracking tasks' `fn`)
before `main` runs; the stages' keys are unchanged. `same_metrics`:
whether the flow's rounds hold every figure of the plain run's evaluations (CHAIR, POPE), equal,
round by round (the same work, seeded the same). The last line printed is one JSON object; nothing is
asserted: speed is reported, never tested.
"""
from __future__ import annotations

import time

STARTED = time.time()  # a child's first line: where its process start ends and its imports begin

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINY = ROOT / "configs" / "tiny.yaml"  # the test suite's tiny settings (tests/test_config.py checks they agree)
# The spans of a child in time order; the first and last are seen from the parent.
SPANS = ("process_start", "imports", "cli_setup", "server_start", "flow_run_start", "library", "sha256", "manifests",
         "mlflow", "report", "prefect_artifacts", "task_bookkeeping", "flow_run_end", "exit")
BODY = ("library", "sha256", "manifests", "mlflow", "report", "prefect_artifacts")


class Timers:
    """Exclusive time per category: a timed call nested in another is charged to its own
    category only (a stack per thread), so the categories never count a second twice."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.local = threading.local()
        self.lock = threading.Lock()

    def wrap(self, category: str, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            stack = self.local.__dict__.setdefault("stack", [])
            now = time.perf_counter()
            if stack:
                self._charge(stack[-1][0], now - stack[-1][1])
            stack.append([category, now])
            try:
                return fn(*args, **kwargs)
            finally:
                now = time.perf_counter()
                name, since = stack.pop()
                self._charge(name, now - since)
                with self.lock:
                    self.calls[name] += 1
                if stack:
                    stack[-1][1] = now

        return timed

    def _charge(self, category: str, seconds: float) -> None:
        with self.lock:
            self.seconds[category] += seconds


def plain_campaign(cfg, project: Path, rounds: int, lib) -> list[dict]:
    """The campaign as the tasks call the library, without them; `lib(fn)` times a call. Returns
    each evaluated model's metrics (round 0 = the base model)."""
    from fisao.align.sample import rollout_stage
    from fisao.align.score import calibration_stage, score_stage
    from fisao.align.train import update_stage
    from fisao.evaluate import evaluate_model
    from fisao.models.build import build_clip, build_llava
    from fisao.world.store import ensure_world

    world = lib(ensure_world)(project, cfg.data_dir, cfg.world).path
    out = project / cfg.outputs_dir / "plain"
    clip, llava = out / "clip", out / "llava"
    lib(build_clip)(world, cfg.clip, clip)
    lib(build_llava)(world, clip, cfg.llava, llava)
    metrics = [lib(evaluate_model)(llava, world, ("chair", "pope"), cfg.eval, out / "eval-0")]
    lib(calibration_stage)(llava, clip, world, cfg.reward, cfg.rollout, out / "calibration")
    policy, adapter = llava, None
    ppo = cfg.ppo.model_copy(update={"rounds": 1})  # as the flow passes it
    for k in range(1, rounds + 1):
        r = out / f"round-{k}"
        lib(rollout_stage)(policy, world, cfg.rollout, k, r / "rollouts")
        lib(score_stage)(r / "rollouts", policy, clip, out / "calibration", world, cfg.reward, r / "scores")
        lib(update_stage)(llava, adapter, r / "rollouts", r / "scores", world, cfg.lora, ppo, k, r / "update")
        policy, adapter = r / "update" / "model", r / "update" / "adapter"
        metrics.append(lib(evaluate_model)(policy, world, ("chair", "pope"), cfg.eval, out / f"eval-{k}"))
    return metrics


def instrument_flow(timers: Timers, marks: dict) -> None:
    """Wrap what `fisao run` calls with `timers` (categories of the module doc) and record the
    server start and the flow body's span in `marks`."""
    import fisao.align.sample
    import fisao.align.score
    import fisao.align.train
    import fisao.evaluate
    import fisao.io
    import fisao.models.build
    import flows.campaign
    import runner.ephemeral
    import tasks.audit
    import tasks.publish
    import tasks.resume
    import tasks.world
    from tasks import campaigns, registry, tracking

    # The tasks import the library's stages where they call them: wrapped in their own modules.
    for module, names in ((tasks.world, ["ensure_world"]), (fisao.models.build, ["build_clip", "build_llava"]),
                          (fisao.align.score, ["calibration_stage", "score_stage"]),
                          (fisao.align.sample, ["rollout_stage"]), (fisao.align.train, ["update_stage"]),
                          (fisao.evaluate, ["evaluate_model"])):
        for name in names:
            setattr(module, name, timers.wrap("library", getattr(module, name)))
    fisao.io.tree_digest = timers.wrap("sha256", fisao.io.tree_digest)
    flows.campaign.init_store = timers.wrap("mlflow", flows.campaign.init_store)
    flows.campaign.tag_this_flow_run = timers.wrap("prefect_artifacts", flows.campaign.tag_this_flow_run)
    tracked = {"manifests": [tasks.resume.write_manifest], "report": [tasks.audit.round_report],
               "prefect_artifacts": [tasks.publish.publish_round, tasks.publish.publish_summary],
               "mlflow": [campaigns.open_campaign, campaigns.campaign_state, tracking.describe, tracking.log_build,
                          tracking.log_round, tracking.log_curve, registry.register_round]}
    for category, prefect_tasks in tracked.items():
        for task in prefect_tasks:  # the body only: Prefect's own work around it stays bookkeeping
            task.fn = timers.wrap(category, task.fn)

    def spanned(key, fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            marks[f"{key}_start"] = time.time()
            try:
                return fn(*args, **kwargs)
            finally:
                marks[f"{key}_end"] = time.time()
        return run

    def server_pid(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            server = fn(*args, **kwargs)
            marks["server_pid"] = server.pid if server is not None else None
            return server
        return run

    runner.ephemeral.start_api = spanned("server", server_pid(runner.ephemeral.start_api))
    flows.campaign.campaign.fn = spanned("body", flows.campaign.campaign.fn)


def workdir(path: str | None, prefix: str) -> Path:
    """`path` (created; it must be new or empty), or a new temp folder."""
    if path is None:
        return Path(tempfile.mkdtemp(prefix=prefix))
    work = Path(path)
    if work.exists() and (not work.is_dir() or any(work.iterdir())):
        raise ValueError(f"--workdir {path} is not an empty folder: give a new or empty one")
    work.mkdir(parents=True, exist_ok=True)
    return work


def settings_argv(settings: list[str]) -> list[str]:
    """`--set KEY=VALUE` once per setting, as `fisao run` and this script take them."""
    return [arg for setting in settings for arg in ("--set", setting)]


def child(args: argparse.Namespace) -> int:
    """One run, in this process; writes its marks and timers to `args.times`."""
    project = Path(args.project)
    timers, marks = Timers(), {"started": STARTED}
    if args.child == "flow":
        from fisao.localstate import apply_local_state

        apply_local_state(project)  # before Prefect is imported, as `fisao` does
        import cli.main

        instrument_flow(timers, marks)
        marks["imported"] = marks["main_start"] = time.time()
        argv = ["--project", str(project), "run", "--config", args.config, "--rounds", str(args.rounds)]
        code = cli.main.main(argv + settings_argv(args.set))
        marks["main_end"] = time.time()
        if code:
            return code
        from fisao.config import load_config, parse_settings
        from fisao.localstate import campaign_dir

        cfg = load_config(args.config, parse_settings(args.set))
        metrics = json.loads((campaign_dir(project, cfg.outputs_dir, cfg.name) / "summary.json").read_text())["rounds"]
    else:
        from fisao.config import load_config, parse_settings

        import fisao.align.train  # noqa: F401  the library's heavy imports (torch, transformers, peft)
        import fisao.evaluate  # noqa: F401
        marks["imported"] = marks["body_start"] = time.time()
        cfg = load_config(args.config, parse_settings(args.set))
        metrics = plain_campaign(cfg, project, args.rounds, lambda fn: timers.wrap("library", fn))
        marks["body_end"] = marks["main_end"] = time.time()
    Path(args.times).write_text(json.dumps({"marks": marks, "seconds": dict(timers.seconds),
                                            "calls": dict(timers.calls), "cpu": cpu_seconds(marks.get("server_pid")),
                                            "metrics": metrics}))
    from runner.exit import exit_without_teardown

    exit_without_teardown(0)  # both runs end as the `fisao` command does (runner/exit.py)


def cpu_seconds(server_pid: int | None) -> dict[str, float]:
    """CPU seconds (user + system) so far: this process, its finished children (git, DVC), and the
    Prefect server (still running: read from /proc; 0 without one)."""
    import resource

    from runner.ephemeral import stat_fields

    own, children = (resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    server = 0.0
    if server_pid is not None:
        try:
            fields = stat_fields(server_pid)
            server = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
        except (OSError, IndexError, ValueError):
            server = float("nan")
    return {"process": own.ru_utime + own.ru_stime, "children": children.ru_utime + children.ru_stime,
            "server": server}


def spans(times: dict, spawned: float, ended: float) -> dict[str, float]:
    """A child's wall time cut into SPANS (seconds; absent spans 0) from its marks and timers."""
    m, s = times["marks"], times["seconds"]
    out = dict.fromkeys(SPANS, 0.0)
    out["process_start"] = m["started"] - spawned
    out["imports"] = m["imported"] - m["started"]
    if "server_start" in m:  # the flow
        out["cli_setup"] = m["server_start"] - m["main_start"]
        out["server_start"] = m["server_end"] - m["server_start"]
        out["flow_run_start"] = m["body_start"] - m["server_end"]
        out["flow_run_end"] = m["main_end"] - m["body_end"]
    for name in BODY:
        out[name] = s.get(name, 0.0)
    out["task_bookkeeping"] = (m["body_end"] - m["body_start"]) - sum(s.get(name, 0.0) for name in BODY)
    out["exit"] = ended - m["main_end"]
    return out


def run_child(kind: str, project: Path, config: str, rounds: int, settings: list[str], work: Path) -> tuple[float, dict]:
    """(wall seconds, spans) of one run in a child process; its output goes to `work/<kind>.log`."""
    times, log = work / f"{kind}-times.json", work / f"{kind}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "FISAO_"))}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--project", str(project), "--config",
           config, "--rounds", str(rounds), "--times", str(times), *settings_argv(settings)]
    with open(log, "w") as out:
        spawned = time.time()
        done = subprocess.run(cmd, cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT)
        ended = time.time()
    if done.returncode:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"the {kind} run failed (exit {done.returncode}); the end of {log}:\n{tail}")
    recorded = json.loads(times.read_text())
    return ended - spawned, {**recorded, "spans": spans(recorded, spawned, ended)}


def compare(args: argparse.Namespace) -> int:
    """Both runs, one after the other, then the comparison (the JSON on the last line)."""
    from fisao import dvcdata
    from fisao.config import load_config, parse_settings

    config = str(TINY if args.tiny else Path(args.config).resolve())
    cfg = load_config(config, parse_settings(args.set))
    if cfg.model is not None:
        raise ValueError(f"{config} names real checkpoints (a `model` section): bench/overhead.py runs shapes-world "
                         "campaigns; give a config without `model` (configs/demo.yaml, --tiny)")
    if (cfg.scale.shards, cfg.scale.processes, cfg.scale.rollout_backend) != (1, 1, "hf"):
        raise ValueError("bench/overhead.py's plain run samples and trains in one process: set scale.shards 1, "
                         "scale.processes 1 and scale.rollout_backend hf")
    rounds = cfg.ppo.rounds if args.rounds is None else args.rounds
    if rounds < 0:
        raise ValueError(f"--rounds {rounds}: give 0 or more")
    work = workdir(args.workdir, "fisao-overhead-")
    print(f"config {config}, {rounds} round(s), work in {work}", flush=True)
    runs = {}
    for kind in ("plain", "flow"):
        runs[kind] = run_child(kind, dvcdata.init_project(work / kind), config, rounds, args.set, work)
        print(f"{kind} run: {runs[kind][0]:.2f} s", flush=True)
    out = summarise(runs)
    print(f"{'span':<18} {'plain s':>9} {'flow s':>9} {'flow - plain':>13}")
    for name in SPANS:
        print(f"{name:<18} {out['plain'][name]:9.2f} {out['flow'][name]:9.2f} {out['where'][name]:13.2f}")
    print(f"{'total':<18} {out['plain_s']:9.2f} {out['flow_s']:9.2f} {out['difference_s']:13.2f}   "
          f"ratio {out['ratio']:.3f}")
    print(f"CPU seconds (process + finished children + Prefect server): plain {out['cpu']['plain_s']:.2f}, "
          f"flow {out['cpu']['flow_s']:.2f} (server {out['cpu']['flow']['server']:.2f}), ratio {out['cpu']['ratio']:.3f}")
    print(f"CHAIR_i per round: plain {out['chair_i']['plain']}, flow {out['chair_i']['flow']}")
    print(json.dumps({**out, "config": config, "rounds": rounds, "workdir": str(work)}))
    return 0


def summarise(runs: dict[str, tuple[float, dict]]) -> dict:
    """The figures of both runs: wall seconds and their ratio, each run's spans (rounded) and the flow's
    less the plain run's (`where`), the flow's timed calls, and whether both evaluated alike."""
    plain, flow = ({k: round(v, 2) for k, v in runs[kind][1]["spans"].items()} for kind in ("plain", "flow"))
    plain_s, flow_s = round(runs["plain"][0], 2), round(runs["flow"][0], 2)
    metrics = {kind: runs[kind][1]["metrics"] for kind in runs}
    cpu = {kind: {k: round(v, 2) for k, v in runs[kind][1]["cpu"].items()} for kind in ("plain", "flow")}
    total = {kind: round(sum(cpu[kind].values()), 2) for kind in cpu}
    return {"plain_s": plain_s, "flow_s": flow_s, "ratio": round(flow_s / plain_s, 3),
            "cpu": {**cpu, "plain_s": total["plain"], "flow_s": total["flow"],
                    "ratio": round(total["flow"] / total["plain"], 3)},
            "difference_s": round(flow_s - plain_s, 2), "where": {k: round(flow[k] - plain[k], 2) for k in SPANS},
            "plain": plain, "flow": flow, "flow_calls": runs["flow"][1]["calls"],
            "chair_i": {kind: [m["chair_i"] for m in metrics[kind]] for kind in metrics},
            "same_metrics": len(metrics["plain"]) == len(metrics["flow"]) and all(
                flow_round.get(key) == value for plain_round, flow_round in zip(metrics["plain"], metrics["flow"])
                for key, value in plain_round.items())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--tiny", action="store_true", help=f"run {TINY.relative_to(ROOT)} (the tests' tiny world and models)")
    p.add_argument("--rounds", type=int, default=None, help="FiSAO rounds (default: the config's ppo.rounds)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="change one setting, as `fisao run --set` (repeatable)")
    p.add_argument("--workdir", default=None, help="a new or empty folder for both runs' projects and logs "
                   "(default: a new temp folder)")
    p.add_argument("--child", choices=("plain", "flow"), help=argparse.SUPPRESS)
    p.add_argument("--project", help=argparse.SUPPRESS)
    p.add_argument("--times", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    from fisao.localstate import OFFLINE

    os.environ.update(OFFLINE)
    if args.child:
        return child(args)
    try:
        return compare(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"bench/overhead.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
