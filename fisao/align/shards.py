"""Rollouts in shards: a round's rollouts sampled as several seeded parts (one process or many under
`accelerate launch`, fisao/align/launch.py), then gathered into one rollouts directory.
A shard is seeded by its index, so the merged rollouts do not depend on how many processes sampled them.
"""
from __future__ import annotations

from pathlib import Path

import torch

from fisao import io
from fisao.align.rollout import concat_rollouts, load_rollouts, save_rollouts
from fisao.align.files import FIGURES
from fisao.align.sample import rollout_stage
from fisao.config import ModelConfig, RolloutConfig


def shard_dirs(out: str | Path, count: int) -> list[Path]:
    """Where the `count` shards of the rollouts bound for `out` are sampled (beside `out`)."""
    out = Path(out)
    return [out.parent / f"{out.name}-shard{i}" for i in range(count)]


def sample_shards(policy_dir: str | Path, world_dir: str | Path, cfg: RolloutConfig, round_index: int,
                  out: str | Path, shards: int, process: tuple[int, int] | None = None,
                  runtime: ModelConfig | None = None, backend: str = "hf", device: str | None = None) -> list[Path]:
    """Sample the shards of the rollouts bound for `out` that are not complete yet; returns the
    directories of all `shards` shards, to gather with `merge_rollout_shards`.

    process (index, count): only shards index, index + count, … (one of several processes under
    `accelerate launch`, fisao/align/launch.py), without progress bars, each shard's figures
    recording the process that sampled it; None: every shard, in this process.
    """
    parts = shard_dirs(out, shards)
    index, count = process or (0, 1)
    for i in range(index, shards, count):
        if (parts[i] / FIGURES).is_file():
            continue
        figures = rollout_stage(policy_dir, world_dir, cfg, round_index, parts[i], progress=process is None,
                                runtime=runtime, shard=(i, shards), backend=backend, device=device)
        if process is not None:
            io.write_json(parts[i] / FIGURES, {**figures, "process": [index, count]})
    return parts


def merge_rollout_shards(shard_dirs: list[str | Path], out: str | Path) -> dict:
    """Gather shards of one round's rollouts into one rollouts directory (rows shard after shard)."""
    parts = [load_rollouts(d) for d in shard_dirs]
    figures = [io.read_json(Path(d) / FIGURES) for d in shard_dirs]
    if len({f["split"] for f in figures}) != 1 or len({tuple(extra) for _, extra in parts}) != 1:
        raise ValueError(f"shards {list(map(str, shard_dirs))} come from different splits or rollout settings")
    columns = {k: [v for _, extra in parts for v in extra[k]] for k in parts[0][1]}
    image_ids = columns["image_id"]
    position = {image_id: k for k, image_id in enumerate(sorted(set(image_ids)))}
    padding = [r.response_ids[~r.mask] for r, _ in parts]
    pad = next((int(p[0]) for p in padding if len(p)), 0)  # the shards' pad id (masked out either way)
    merged = concat_rollouts([r for r, _ in parts], torch.tensor([position[i] for i in image_ids]), pad)
    tokens = int(merged.mask.sum())
    seconds = max(f["seconds"] for f in figures)  # shards run side by side
    out_figures = {"split": figures[0]["split"], "rollouts": len(merged), "tokens": tokens, "seconds": seconds,
                   "tokens_per_second": round(tokens / max(seconds, 1e-9), 1), "shards": len(shard_dirs)}
    with io.atomic_dir(out) as tmp:
        save_rollouts(tmp, merged, extra=columns)
        io.write_json(tmp / FIGURES, out_figures)
    return out_figures
