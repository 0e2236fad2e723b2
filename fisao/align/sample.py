"""Sampling a round's rollouts: which images and questions a round asks about, the rollout stage,
and what a rollouts directory records for the stages after it.

Round k samples with round k−1's merged checkpoint (the base model for k = 1). A rollouts
directory (`fisao.align.rollout.save_rollouts`) records each row's `image_id`, `kind` ("caption"
or "question") and `category` (the object a question asks about), and its figures record the
`split`: scoring and updating read the round's images from there (`rollout_images`) instead of
drawing the round again.
"""
from __future__ import annotations

import functools
import random
import time
from pathlib import Path

import torch

from fisao import io
from fisao.align.backends import BACKENDS
from fisao.align.files import FIGURES
from fisao.align.rollout import batch_seed, concat_rollouts, save_rollouts
from fisao.coco import load_image
from fisao.config import ModelConfig, RolloutConfig
from fisao.crashpoints import crash_point
from fisao.examples import data_vocabulary, load_examples
from fisao.runtime import load_runtime_policy
from fisao.world.data import Example


def round_examples(world_dir: str | Path, cfg: RolloutConfig, round_index: int) -> list[Example]:
    """The images of round `round_index` (from 1): a seeded sample of `cfg.split`, new each round."""
    train = load_examples(world_dir, cfg.split)
    if cfg.images_per_round > len(train):
        raise ValueError(f"rollout.images_per_round is {cfg.images_per_round} but the {cfg.split} split has {len(train)} images")
    rng = random.Random(f"fisao-rollouts/{cfg.seed}/{round_index}")
    return sorted(rng.sample(train, cfg.images_per_round), key=lambda e: e.image_id)


def round_questions(image_ids: list[int], categories: list[str], k: int, seed: int, round_index: int) -> list[list[str]]:
    """For each image, `k` distinct categories to ask about, drawn uniformly from `categories`.

    No ground truth is used; the draw depends on (seed, round, image id) only, so it is the same
    whichever shard or process samples the image.
    """
    return [random.Random(f"fisao-questions/{seed}/{round_index}/{image_id}").sample(list(categories), min(k, len(categories)))
            for image_id in image_ids]


def rollout_stage(policy_dir: str | Path, world_dir: str | Path, cfg: RolloutConfig, round_index: int,
                  out: str | Path, progress: bool = True, runtime: ModelConfig | None = None,
                  shard: tuple[int, int] = (0, 1), backend: str = "hf", device: str | None = None) -> dict:
    """Sample `cfg.n_per_image` answers for each of the round's images with the policy in `policy_dir`.

    shard (index, count): only images index, index + count, … of the round (merge the shards
    with `merge_rollout_shards`); one shard is the whole round, seeded as it always was. A shard's
    answers depend on (index, count) only, not on the process or device that samples it.
    device: where the policy runs (default: the runtime's; one per process under `accelerate launch`).
    """
    t0 = time.time()
    index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"shard {index} of {count} does not exist")
    model, processor = load_runtime_policy(policy_dir, runtime, device)
    examples = round_examples(world_dir, cfg, round_index)[index::count]
    seed = cfg.seed * 1000 + round_index
    if count > 1:
        seed = batch_seed(seed, 1_000_000 + index)
    images = [load_image(e.image) for e in examples]
    sample = functools.partial(BACKENDS[backend], model, processor, temperature=cfg.temperature, top_p=cfg.top_p,
                               max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, progress=progress)
    parts = [sample(images, cfg.prompt, cfg.n_per_image, seed=seed)]
    row_image = parts[0].image_index.tolist()  # each row's index into `examples`
    categories: list[str | None] = [None] * len(row_image)
    if cfg.questions_per_image:
        asked = round_questions([e.image_id for e in examples], data_vocabulary(world_dir).categories,
                                cfg.questions_per_image, cfg.seed, round_index)
        about = [(i, c) for i, cs in enumerate(asked) for c in cs]
        parts.append(sample([images[i] for i, _ in about], [cfg.question_template.format(c) for _, c in about], 1,
                            seed=batch_seed(seed, 2_000_000)))
        row_image += [about[k][0] for k in parts[1].image_index.tolist()]
        categories += [about[k][1] for k in parts[1].image_index.tolist()]
    rollouts = concat_rollouts(parts, torch.tensor(row_image), processor.tokenizer.pad_token_id)
    columns = {"image_id": [examples[i].image_id for i in row_image],
               "kind": ["caption" if c is None else "question" for c in categories], "category": categories}
    crash_point("rollout:mid", round_index)
    seconds = time.time() - t0
    tokens = int(rollouts.mask.sum())
    figures = {"split": cfg.split, "rollouts": len(rollouts), "tokens": tokens, "seconds": round(seconds, 2),
               "tokens_per_second": round(tokens / max(seconds, 1e-9), 1)}
    if count > 1:
        figures["shard"] = [index, count]
    # The figures are the completeness marker: written in the same atomic directory as the rollouts.
    with io.atomic_dir(out) as tmp:
        save_rollouts(tmp, rollouts, extra=columns)
        io.write_json(tmp / FIGURES, figures)
    return figures


def rollout_split(rollouts_dir: str | Path) -> str:
    """The split the rollouts in `rollouts_dir` were sampled on."""
    return io.read_json(Path(rollouts_dir) / FIGURES)["split"]


def rollout_images(rollouts_dir: str | Path, world_dir: str | Path, image_ids: list[int]) -> tuple[list[Example], list[int]]:
    """The images behind the rows of the rollouts in `rollouts_dir`, from the split they record.

    image_ids (N,): each row's `image_id` column (`load_rollouts(rollouts_dir)[1]["image_id"]`).
    Returns the distinct examples (D,), sorted by image id, and each row's index into them (N,).
    A ValueError when the split has no image of that id (the data changed under the rollouts).
    """
    split = rollout_split(rollouts_dir)
    order = sorted(set(image_ids))
    by_id = {e.image_id: e for e in load_examples(world_dir, split)}
    missing = [i for i in order if i not in by_id]
    if missing:
        raise ValueError(f"the rollouts in {rollouts_dir} refer to image ids {missing[:5]} that the {split} split of "
                         f"{world_dir} does not have: sample the rollouts again on this data")
    position = {image_id: k for k, image_id in enumerate(order)}
    return [by_id[i] for i in order], [position[i] for i in image_ids]
