"""A round's rollouts with their per-token rewards, as rows that need no model to read.

Joins the rollouts (token ids, sampling log-probs), the scoring stage's per-token rewards and
mentions, and the tokenizer of the policy that sampled them into one JSON row per answer:

    {"row": 0, "image_id": 12, "text": "...", "answer_reward": 0.4,
     "tokens": [{"id": 57, "text": " circle", "start": 6, "end": 13, "reward": 0.81, "logprob": -0.2}, ...],
     "mentions": [{"text": "circle", "category": "circle", "start": 6, "end": 12, "score": 0.31,
                   "reward": 0.81, "hallucinated": false}, ...]}

A yes/no question row (`rollout.questions_per_image`) has no mentions; its claim is the object
asked about, what the answer said, and the reward on its yes/no word:

    {"row": 512, "kind": "question", ..., "mentions": [],
     "claim": {"category": "star", "says_yes": true, "score": 0.12, "reward": -0.7, "present": false}}
"""
from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file
from transformers import AutoTokenizer

from fisao import io
from fisao.align.rewards import token_offsets
from fisao.align.rollout import load_rollouts
from fisao.align.files import REWARDS, TOKEN_REWARDS


def token_rows(rollouts_dir: str | Path, scores_dir: str | Path, tokenizer_dir: str | Path) -> list[dict]:
    """One row per rollout (see the module doc), in rollout order."""
    rollouts, _ = load_rollouts(rollouts_dir)
    rewards = load_file(str(Path(scores_dir) / TOKEN_REWARDS))["token_rewards"]
    scored = io.read_jsonl(Path(scores_dir) / REWARDS)
    if rewards.shape != rollouts.response_ids.shape or len(scored) != len(rollouts):
        raise ValueError(f"{scores_dir} does not score the rollouts in {rollouts_dir}: rewards {tuple(rewards.shape)}, "
                         f"{len(scored)} rows, rollouts {tuple(rollouts.response_ids.shape)}")
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    rows = []
    for r, row in enumerate(scored):
        keep = rollouts.mask[r]
        ids = rollouts.response_ids[r][keep].tolist()
        text, offsets = token_offsets(tok, ids)
        values, logps = rewards[r][keep].tolist(), rollouts.logprobs[r][keep].tolist()
        tokens = [{"id": i, "text": text[s:e], "start": s, "end": e, "reward": round(v, 5), "logprob": round(lp, 5)}
                  for i, (s, e), v, lp in zip(ids, offsets, values, logps)]
        out = {"row": r, "image_id": row["image_id"], "kind": row.get("kind", "caption"), "text": text,
               "answer_reward": round(sum(values), 5), "tokens": tokens, "mentions": row.get("mentions", [])}
        if out["kind"] == "question":
            out["claim"] = {k: row[k] for k in ("category", "says_yes", "score", "reward", "present")}
        rows.append(out)
    return rows


def pick_examples(rows: list[dict], n: int = 6) -> list[dict]:
    """A few telling rows: those with the most negative and the most positive mention rewards."""
    with_mentions = [r for r in rows if r["mentions"]]
    by_reward = sorted(with_mentions, key=lambda r: (min(m["reward"] for m in r["mentions"]), r["row"]))
    low, high = by_reward[: (n + 1) // 2], by_reward[::-1][: n // 2]
    chosen = {r["row"]: r for r in low + high}
    return [chosen[k] for k in sorted(chosen)][:n]
