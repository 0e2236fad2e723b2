"""Rollout backends: how a round's answers are sampled, picked by config `scale.rollout_backend`.

A backend is a function with the signature of `fisao.align.rollout.sample_rollouts` that returns
`Rollouts` whose `logprobs` are the policy's own (temperature 1, full softmax) for the sampled
tokens. "hf" is transformers' `generate` with the KV cache. A vLLM backend would sample with
vLLM from the round's merged checkpoint and then fill `logprobs` with one teacher-forced pass
(`fisao.align.rollout.sequence_logprobs`), so that PPO's ratio is exactly 1 before the first step
whatever the sampler's numerics; nothing else in the project changes.
"""
from __future__ import annotations

from typing import Callable

from fisao.align.rollout import Rollouts, sample_rollouts

Backend = Callable[..., Rollouts]

BACKENDS: dict[str, Backend] = {"hf": sample_rollouts}
