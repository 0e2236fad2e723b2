"""The sweep flow: one config, one campaign per (world seed × training seed), one table.

The campaigns run one after another as subflows of this flow run, in this process: Prefect's
ephemeral API starts once (~12 s) for the whole sweep, not once per campaign. Each campaign is
an ordinary campaign (fisao/sweep.py says what its seeds and data directory are), so running the
sweep again continues it: a finished campaign is taken (its rounds verified against their
manifests and read from MLflow, its stages cache hits), an unfinished one resumed where it
stopped, a missing one started. The sweep then writes `outputs/sweeps/NAME/sweep.json` and logs
its parent run to MLflow (tasks/sweeps.py). A campaign that fails (say, a world whose verifier
cannot tell correct from hallucinated mentions) is reported and the others still run; the mean
and std are over the finished runs, and the sweep's run ends failed, naming it.
"""
from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.exceptions import TerminationSignal
from prefect.runtime import flow_run

from fisao import io
from fisao.config import load_config
from fisao.inputs import config_identity_hash, identity
from fisao.localstate import use_project
from fisao.summary import sweep_headline
from fisao.sweep import aggregate, default_name, plan, run_record, sweep_dir, sweep_lock
from flows.campaign import campaign
from tasks.campaigns import campaign_state
from tasks.publish import flow_run_tags, run_tag, tag_this_flow_run
from tasks.mlflow_store import init_store
from tasks.sweeps import close_sweep, open_sweep, tag_campaign
from tasks.tracking import describe


def sweep_run_name() -> str:
    """The sweep flow run's name in Prefect's UI: the sweep's."""
    params = flow_run.parameters
    return params.get("name") or default_name(load_config(params.get("config_path")))


@flow(name="fisao-sweep", flow_run_name=sweep_run_name)
def sweep(config_path: str | None, worlds: list[int], seeds: list[int], project: str = ".",
          rounds: int | None = None, name: str | None = None) -> dict:
    """Run (or continue) the sweep of `config_path` over `worlds` × `seeds`; returns sweep.json's
    content plus `path` and, per campaign, how long it took and which rounds it took as done."""
    project = str(Path(project).resolve())
    use_project(project)
    cfg = load_config(config_path)
    name = name or default_name(cfg)
    runs = plan(cfg, name, tuple(worlds), tuple(seeds))
    log = get_run_logger()
    with sweep_lock(project, cfg.outputs_dir, name), flow_run_tags(run_tag("sweep", name)):
        tag_this_flow_run()
        init_store(project)
        tags = {"fisao.worlds": ",".join(map(str, worlds)), "fisao.seeds": ",".join(map(str, seeds)),
                "fisao.rounds": str(rounds if rounds is not None else cfg.ppo.rounds),
                "fisao.config": str(config_path), "fisao.campaigns": ",".join(r.name for r in runs)}
        parent = open_sweep(name, config_identity_hash(cfg), identity(cfg), tags)
        try:
            records, campaigns, failed = [], {}, []
            for i, run in enumerate(runs, start=1):
                log.info("sweep %s: campaign %d of %d, %s (world %d, seed %d, data %s/)", name, i, len(runs),
                         run.name, run.world, run.seed, run.data_dir)
                try:
                    summary = campaign(config_path=config_path, project=project, overrides=run.overrides,
                                       run_name=run.name, rounds=rounds)
                except Exception as e:  # one world's failure must not cost the others (Ctrl-C still stops all)
                    log.error("sweep %s: campaign %s failed (%s: %s); the sweep goes on, and running it again "
                              "retries it", name, run.name, type(e).__name__, e)
                    failed.append({"run": run.name, "world": run.world, "seed": run.seed,
                                   "error": f"{type(e).__name__}: {e}"[:2000]})
                    continue
                tag_campaign(run.name, {"fisao.sweep": name, "fisao.sweep_world": str(run.world),
                                        "fisao.sweep_seed": str(run.seed)})
                records.append(run_record(run, summary["rounds"], summary["calibration"]["figures"]))
                campaigns[run.name] = {"seconds": summary["seconds"], "resume": summary["resume"],
                                       "stages": summary["stages"], "summary_path": summary["summary_path"]}
            mean, std = aggregate(records)
            result = {"name": name, "config": config_path, "worlds": list(worlds), "seeds": list(seeds),
                      "runs": records, "mean": mean, "std": std, "failed": failed}
            path = io.write_json(sweep_dir(project, cfg.outputs_dir, name) / "sweep.json", result)
            figures = {f"{which['run']}/{k}": v for which in (mean, std) for k, v in which.items()
                       if k != "run" and v is not None}
            describe(parent["run_id"], f"sweep {name}: {sweep_headline(records, mean)}")
            close_sweep(parent["run_id"], figures, len(records), str(path),
                        {**tags, "fisao.failed": ",".join(f["run"] for f in failed) or "none"},
                        "failed" if failed else "finished")
        except BaseException as e:  # Ctrl-C and SIGTERM included: the sweep's run says how it ended, then it goes on
            end = "interrupted" if isinstance(e, (KeyboardInterrupt, TerminationSignal)) else "failed"
            campaign_state(parent["run_id"], {"fisao.error": f"{type(e).__name__}: {e}"[:4000]}, end=end)
            raise
    log.info("sweep %s: %d campaigns finished, %d failed; sweep.json %s", name, len(records), len(failed), path)
    return {**result, "path": str(path), "campaigns": campaigns,
            "mlflow": {"experiment_id": parent["experiment_id"], "run_id": parent["run_id"]}}
