"""Run a round's stage on several processes: `accelerate launch -m fisao.align.launch ARGS.json`.

ARGS.json names the stage and holds its keyword arguments (paths, and the config sections as
JSON); every process reads the same file and accelerate's environment says which process it is.
The campaign's tasks write the file and start this when `scale.processes` > 1; tests run both
stages on 2 CPU processes (gloo).

- "update" (`fisao.align.train.update_stage`): each process trains on its share of every
  optimizer step and the main process writes the output directory (see fisao/align/update.py).
- "rollouts" (`rollouts_on_processes`): the round's K shards are dealt out to the P processes
  (process p samples shards p, p + P, …, on its own device), then the main process gathers them
  into one rollouts directory with `merge_rollout_shards`. A shard is seeded by its index, so
  the gathered rollouts depend on K only, never on P: they equal the K shards sampled one after
  another in one process. The shards are gathered through the outputs directory, which every
  process reads anyway (the update reads the rollouts there too; on several machines it is a
  shared filesystem), and a relaunch after a crash samples only the shards that are missing.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from fisao.config import LoraConfig, ModelConfig, PPOConfig, RolloutConfig

STAGES = ("update", "rollouts")


def _plain(value):
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    return value if value is None or isinstance(value, (bool, int, float)) else str(value)


def write_args(path: str | Path, stage: str = "update", **kwargs) -> Path:
    """Write a stage's keyword arguments (config sections as dicts) for `main`."""
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r} does not run under accelerate launch; choose from {STAGES}")
    Path(path).write_text(json.dumps({"stage": stage, **{k: _plain(v) for k, v in kwargs.items()}}, indent=1))
    return Path(path)


def rollouts_on_processes(policy_dir: str | Path, world_dir: str | Path, cfg: RolloutConfig, round_index: int,
                          out: str | Path, shards: int, runtime: ModelConfig | None = None,
                          backend: str = "hf") -> dict | None:
    """This process's shards of round `round_index`, then (main process) the gathered rollouts in `out`.

    Returns the merged figures on the main process, None on the others. Each shard's figures
    record the process that sampled it (`process`: [index, count]).
    """
    from accelerate import PartialState

    from fisao.align.shards import merge_rollout_shards, sample_shards
    from fisao.runtime import runtime_device

    # cpu=True: on CPU accelerate starts gloo only when asked (without it, each process thinks it is alone).
    state = PartialState(cpu=runtime_device(runtime) == "cpu")
    if shards % state.num_processes:
        raise ValueError(f"scale.rollout_shards ({shards}) must be a multiple of the {state.num_processes} processes")
    # device: this process's GPU (cuda:<local rank>), or the CPU
    parts = sample_shards(policy_dir, world_dir, cfg, round_index, out, shards,
                          process=(state.process_index, state.num_processes), runtime=runtime, backend=backend,
                          device=str(state.device))
    state.wait_for_everyone()
    merged = None
    if state.is_main_process:
        merged = merge_rollout_shards(parts, out)
    state.wait_for_everyone()
    return merged


def main(argv: list[str] | None = None) -> int:
    import torch

    from fisao.align.train import update_stage

    args = json.loads(Path((argv or sys.argv[1:])[0]).read_text())
    torch.set_num_threads(int(args.pop("threads", 0)) or torch.get_num_threads())
    stage = args.pop("stage", "update")
    runtime = args.pop("runtime", None)
    runtime = None if runtime is None else ModelConfig(**runtime)
    if stage == "update":
        update_stage(**{**args, "lora": LoraConfig(**args["lora"]), "cfg": PPOConfig(**args["cfg"]), "runtime": runtime})
    elif stage == "rollouts":
        rollouts_on_processes(**{**args, "cfg": RolloutConfig(**args["cfg"]), "runtime": runtime})
    else:
        raise ValueError(f"{argv}: unknown stage {stage!r}; choose from {STAGES}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
