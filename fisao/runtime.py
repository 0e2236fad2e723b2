"""Where and how the policy runs: device, dtype, gradient checkpointing (config `model`).

The shapes world has no `model` section: everything runs on CPU in float32, as it always did.
A `model` section (real checkpoints) picks the device ("auto": CUDA when there is one), the
dtype (bf16 for LLaVA-1.5) and gradient checkpointing for the update.
"""
from __future__ import annotations

from pathlib import Path

import torch

from fisao.config import ModelConfig
from fisao.generate import load_policy

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def runtime_device(runtime: ModelConfig | None) -> str:
    """"cpu" or "cuda" for a runtime (None: the world's CPU)."""
    if runtime is None or runtime.device == "cpu":
        return "cpu"
    if runtime.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("model.device is cuda but torch sees no GPU; set model.device: auto or cpu")
    return "cuda" if torch.cuda.is_available() else "cpu"


def runtime_dtype(runtime: ModelConfig | None) -> torch.dtype | None:
    return None if runtime is None else DTYPES[runtime.dtype]


def load_runtime_policy(path: str | Path, runtime: ModelConfig | None, device: str | None = None):
    """(model, processor) as `fisao.generate.load_policy`, on the runtime's device and dtype."""
    if runtime is None:
        return load_policy(path) if device is None else load_policy(path, device=device)
    return load_policy(path, device=device or runtime_device(runtime), dtype=runtime_dtype(runtime),
                       trust_remote_code=runtime.trust_remote_code)


def prepare_for_training(model, runtime: ModelConfig | None) -> None:
    """Gradient checkpointing on the language model when the runtime asks for it (peft needs the
    input embeddings to require grad so that checkpointed blocks see a graph)."""
    if runtime is None or not runtime.gradient_checkpointing:
        return
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    kwargs = {"use_reentrant": False}
    if hasattr(hf, "activation_checkpointing_enable"):  # newer transformers 5 (5.23 here)
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # earlier 5.x (5.17 on the GPU machine of bench/gpu/README.md) has only the older name
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    hf.enable_input_require_grads()
