"""Run a round's update on several processes: `accelerate launch -m fisao.align.launch ARGS.json`.

ARGS.json holds the arguments of `fisao.align.stages.update_stage` (paths, and the config
sections as JSON). Every process runs the stage with the same arguments; accelerate's
environment says which share of each optimizer step is its own, and the main process writes
the output directory (see fisao/align/update.py). The campaign's update task writes the file
and starts this when `scale.processes` > 1; a test runs it on 2 CPU processes (gloo).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from fisao.config import LoraConfig, ModelConfig, PPOConfig


def write_args(path: str | Path, **kwargs) -> Path:
    """Write update_stage's keyword arguments (config sections as dicts) for `main`."""
    data = {k: (v.model_dump(mode="json") if hasattr(v, "model_dump") else (None if v is None else str(v)))
            for k, v in kwargs.items() if k not in ("round_index",)}
    data["round_index"] = kwargs["round_index"]
    Path(path).write_text(json.dumps(data, indent=1))
    return Path(path)


def main(argv: list[str] | None = None) -> int:
    import torch

    from fisao.align.stages import update_stage

    args = json.loads(Path((argv or sys.argv[1:])[0]).read_text())
    torch.set_num_threads(int(args.pop("threads", 0)) or torch.get_num_threads())
    runtime = args.pop("runtime", None)
    update_stage(**{**args, "lora": LoraConfig(**args["lora"]), "cfg": PPOConfig(**args["cfg"]),
                    "runtime": None if runtime is None else ModelConfig(**runtime)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
