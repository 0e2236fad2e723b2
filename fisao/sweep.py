"""A quality sweep: one campaign per (world seed × training seed), and what the runs add up to.

One campaign is one world's and one seed's result, and how hard a world is varies with its seed
as much as anything the method does. A sweep runs one config on several world seeds and training
seeds and reports each run's base and final figures, with their mean and standard deviation.

What the seeds set:
- the **world seed** sets `world.seed` and the run's `data_dir`, `data-sweep-w<seed>-<hash>` (the
  hash is that of the whole `world` section), so each world has its own directory and DVC record
  (`<data_dir>.dvc`, `<data_dir>.md5` at the project root) and never touches `data/` or
  `data.dvc`; two sweeps over the same world share it, and a changed world option gets a new one;
- the **training seed** sets `rollout.seed` (rollout sampling and the calibration answers) and
  `ppo.seed` (the update's shuffling). The base models' seeds (`clip.seed`, `llava.seed`) stay as
  the config has them, so the base models of a world are built once and shared by its training
  seeds (their cache keys hold the world's md5 and their config sections).

Run `r` of sweep `S` is the campaign `S-w<world>-s<seed>`; all of this module is pure (no
Prefect, no MLflow): the plan, the per-run record, and the mean/std aggregation.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from fisao.config import Config, config_hash
from fisao.locks import CampaignLocked, RunLock, lock_holder
from fisao.world.causes import CAUSES

DATA_PREFIX = "data-sweep"
CAUSE_METRICS = tuple(f"halluc_{c}" for c in CAUSES)  # the world's hallucinations by cause (fisao/world/causes.py)
METRICS = ("chair_s", "chair_i", "recall", "glued", "looped", "pope_random_f1", "pope_popular_f1", "pope_adversarial_f1",
           *CAUSE_METRICS)
POPE_SPLITS = ("random", "popular", "adversarial")
# The numeric fields of a run's record, in table order (mean and std are taken of each).
FIELDS = (
    *[f"{when}_{m}" for m in METRICS for when in ("base", "final")],
    "chair_i_cut", *[f"{m}_cut" for m in CAUSE_METRICS], "verifier_auroc", "hallucinated_share",
    *[f"final_pope_{s}_yes_ratio" for s in POPE_SPLITS], "yes_ratio_min", "yes_ratio_max", "final_kl",
)


def parse_seeds(text: str, option: str) -> tuple[int, ...]:
    """"10,11,12" -> (10, 11, 12); `option` names the command-line option in errors."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    try:
        seeds = tuple(int(p) for p in parts)
    except ValueError as e:
        raise ValueError(f"{option} takes comma-separated integers such as 10,11,12, got {text!r}") from e
    if not seeds:
        raise ValueError(f"{option} needs at least one seed, e.g. {option} 0")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"{option} names a seed twice ({text!r}): give each once")
    return seeds


@dataclass(frozen=True)
class SweepRun:
    """One campaign of a sweep: its name, its world seed, its training seed and its data directory."""

    name: str
    world: int
    seed: int
    data_dir: str

    @property
    def overrides(self) -> dict:
        """The config keys this run sets (on top of the sweep's config)."""
        return {"world.seed": self.world, "data_dir": self.data_dir, "rollout.seed": self.seed, "ppo.seed": self.seed}


def world_data_dir(cfg: Config, world_seed: int) -> str:
    """The data directory of world `world_seed` under `cfg`'s world options (never `data`)."""
    world = cfg.world.model_copy(update={"seed": world_seed})
    return f"{DATA_PREFIX}-w{world_seed}-{config_hash(world)[:8]}"


def default_name(cfg: Config) -> str:
    """A sweep's name when none is given: the config's name + "-sweep"."""
    return f"{cfg.name}-sweep"


def plan(cfg: Config, sweep: str, worlds: tuple[int, ...], seeds: tuple[int, ...]) -> list[SweepRun]:
    """The sweep's campaigns, world by world (a world's base models are built before its seeds train)."""
    if cfg.model is not None:
        raise ValueError(f"a sweep runs the shapes world over world seeds, but config {cfg.name!r} has a model section "
                         "(real checkpoints on COCO): remove model and data, or run it with `fisao run`")
    if not sweep.strip() or "/" in sweep or sweep.startswith("."):
        raise ValueError(f"sweep name {sweep!r} must be a plain name (no '/', not starting with '.'), e.g. --name q1")
    return [SweepRun(f"{sweep}-w{w}-s{s}", w, s, world_data_dir(cfg, w)) for w in worlds for s in seeds]


def sweep_dir(project: str | Path, outputs_dir: str, sweep: str) -> Path:
    """Where sweep `sweep` writes `sweep.json` and its lock."""
    return Path(project) / outputs_dir / "sweeps" / sweep


@contextlib.contextmanager
def sweep_lock(project: str | Path, outputs_dir: str, sweep: str) -> Iterator[RunLock]:
    """One process per sweep name (re-entrant within a process, like a campaign's lock)."""
    path = sweep_dir(project, outputs_dir, sweep) / ".lock"
    try:
        lock = RunLock(path, sweep).acquire()
    except CampaignLocked:
        holder = lock_holder(path)
        who = holder.describe() if holder else "another process"
        raise CampaignLocked(f"sweep {sweep!r} is already running: {who} holds {path}. Wait for it to finish, "
                             "or start another sweep with a new --name") from None
    try:
        yield lock
    finally:
        lock.release()


def relative_cut(base: float | None, final: float | None) -> float | None:
    """(base − final) / base: 0.4 is a 40% cut; None when base is 0 (nothing to cut) or unknown."""
    if base is None or final is None or base == 0:
        return None
    return (base - final) / base


def run_record(run: SweepRun, rounds: list[dict], calibration: dict) -> dict:
    """A run's figures from its campaign: `rounds` as in summary.json (round 0 is the base model; a
    sweep with `--rounds 0` checks base models only, its final figures are the base's),
    `calibration` the calibration figures (`auroc` and `hallucinated_share` on the base policy's mentions)."""
    assert rounds, "a sweep run has at least its base model (round 0)"
    base, final = rounds[0], rounds[-1]  # with --rounds 0 the base is also the final model
    record: dict = {"run": run.name, "world": run.world, "seed": run.seed, "rounds": len(rounds) - 1}
    for m in METRICS:
        record[f"base_{m}"], record[f"final_{m}"] = base.get(m), final.get(m)
    for m in ("chair_i", *CAUSE_METRICS):
        record[f"{m}_cut"] = relative_cut(base.get(m), final.get(m))
    record["verifier_auroc"] = calibration.get("auroc")
    record["hallucinated_share"] = calibration.get("hallucinated_share")
    ratios = [r[f"pope_{s}_yes_ratio"] for r in rounds[1:] or rounds for s in POPE_SPLITS if f"pope_{s}_yes_ratio" in r]
    for s in POPE_SPLITS:
        record[f"final_pope_{s}_yes_ratio"] = final.get(f"pope_{s}_yes_ratio")
    record["yes_ratio_min"] = min(ratios) if ratios else None
    record["yes_ratio_max"] = max(ratios) if ratios else None
    record["final_kl"] = final.get("update/kl")
    return record


def aggregate(records: list[dict]) -> tuple[dict, dict]:
    """(mean, std) records over `records`, field by field (FIELDS).

    A field's None values (e.g. the cut of a run whose base had no hallucination) are left out;
    std is the sample standard deviation (n − 1), None with fewer than two values.
    """
    mean: dict = {"run": "mean"}
    std: dict = {"run": "std"}
    for f in FIELDS:
        values = [float(r[f]) for r in records if r.get(f) is not None]
        mean[f] = sum(values) / len(values) if values else None
        if len(values) < 2:
            std[f] = None
            continue
        std[f] = math.sqrt(sum((v - mean[f]) ** 2 for v in values) / (len(values) - 1))
    return mean, std
