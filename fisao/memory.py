"""What a campaign will need before it starts: parameters, memory per stage, rollout tokens.

`estimate(hf_config, ...)` counts parameters on the meta device (nothing allocated, nothing
downloaded) and estimates the peak memory of each stage; `check_fits` refuses early, with what
to change, when the peak exceeds the memory of the device. `campaign_estimate(cfg)` does it for a
campaign config: the policy's configuration and the verifier's size come from
fisao/models/known.py when the checkpoints are not on disk (LLaVA-1.5 7B/13B, LLaVA-NeXT
Vicuna-7B, InstructBLIP Vicuna-7B).

The model, in bytes (b = bytes per weight of the dtype; B = rows per micro-batch; L = prompt +
answer tokens; H, layers, V = the language model's width, depth and vocabulary):
- weights: all parameters × b (the verifier's on top during calibration and scoring);
- LoRA: trainable parameters × 4 (fp32, as peft keeps them) + gradients 4 + AdamW moments 8;
- activations of the update (bf16 with SDPA, Korthikanti et al. 2022 without the s² term):
  34·B·L·H·b/2 per layer; with gradient checkpointing only each layer's input (B·L·H·b) is
  kept plus one layer's 34·B·L·H·b/2; plus the fp32 logits of the answer tokens (B·T·V·4, twice
  for log-softmax);
- rollouts: KV cache 2·layers·H_kv·batch·L·b plus the last position's logits;
- an overhead factor of 1.2 for allocator fragmentation and workspaces (CUDA context excluded).
These are estimates to refuse what cannot fit, not promises: the report prints each term.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from fisao.config import Config, LoraConfig, PPOConfig, RolloutConfig
from fisao.host import available_ram
from fisao.models.known import policy_config, verifier_parameters

GIB = 1024 ** 3
OVERHEAD = 1.2
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}



@dataclass(frozen=True)
class Estimate:
    """Parameter counts, bytes per term, and the peak of each stage (bytes)."""

    params: dict[str, int]
    lora_params: int
    weights: int
    verifier_weights: int
    lora_and_optimizer: int
    update_activations: int
    rollout_kv_cache: int
    rollout_tokens: int  # answer tokens sampled per round at most (images × answers × max new tokens)
    prompt_tokens: int
    peaks: dict[str, int]  # rollouts, calibration, update: peak bytes with the overhead factor
    verifier: str = ""  # where the verifier's size comes from

    @property
    def peak(self) -> int:
        return max(self.peaks.values())

    def to_json(self) -> dict:
        return {**asdict(self), "peak": self.peak}


def _meta_model(config):
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config)


def lora_parameter_count(model, lora: LoraConfig) -> int:
    """Parameters LoRA adds: r·(in + out) for every linear layer the target regex matches."""
    import re

    from fisao.align.lora import lora_target_regex
    from fisao.models.families import family_of

    pattern = re.compile(lora_target_regex(lora, family_of(model)))
    return sum(lora.r * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and pattern.fullmatch(name))


def prompt_token_count(config, prompt_text_tokens: int = 48) -> int:
    """Tokens of one prompt: the image's tokens plus the question and chat template."""
    if config.model_type == "instructblip":
        return config.num_query_tokens + prompt_text_tokens
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    if config.model_type == "llava_next":  # up to 4 tiles + the base image, newline tokens
        side = vision.image_size // vision.patch_size
        patches = 5 * patches + 2 * side
    return patches + prompt_text_tokens


def estimate(config, lora: LoraConfig, ppo: PPOConfig, rollout: RolloutConfig, dtype: str = "bfloat16",
             gradient_checkpointing: bool = True, verifier_params: int = 0, verifier_source: str = "") -> Estimate:
    """The memory a campaign of `config` needs (see the module docstring for the model)."""
    from fisao.models.families import count_parameters

    model = _meta_model(config)
    params = count_parameters(model)
    lora_params = lora_parameter_count(model, lora)
    b = BYTES[dtype]
    text = config.get_text_config()
    h, layers, vocab = text.hidden_size, text.num_hidden_layers, text.vocab_size
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    h_kv = h // text.num_attention_heads * kv_heads
    prompt = prompt_token_count(config)
    seq = prompt + rollout.max_new_tokens
    rows = ppo.minibatch_size
    per_layer = 34 * rows * seq * h * b // 2
    acts = (layers * rows * seq * h * b + per_layer) if gradient_checkpointing else layers * per_layer
    logits = 2 * rows * rollout.max_new_tokens * vocab * 4
    weights = params["total"] * b
    verifier = verifier_params * b
    lora_bytes = lora_params * 16
    kv = 2 * layers * h_kv * rollout.batch_size * seq * b
    rollout_peak = weights + kv + rollout.batch_size * vocab * 4
    peaks = {
        "rollouts": int(OVERHEAD * rollout_peak),
        "calibration": int(OVERHEAD * (rollout_peak + verifier)),
        "update": int(OVERHEAD * (weights + lora_bytes + acts + logits)),
    }
    return Estimate(params, lora_params, weights, verifier, lora_bytes, acts + logits, kv,
                    rollout.images_per_round * rollout.n_per_image * rollout.max_new_tokens, prompt, peaks, verifier_source)


def campaign_estimate(cfg: Config, policy_path: str | None = None) -> Estimate:
    """The estimate of a campaign with a `model` section (nothing downloaded, nothing loaded).

    policy_path: where the policy already is (its config is read there), if known."""
    if cfg.model is None:
        raise ValueError("the memory estimate is for real checkpoints: the config has no model section")
    m = cfg.model
    verifier_params, source = verifier_parameters(m.verifier, m.policy)
    return estimate(policy_config(policy_path or m.policy, m.trust_remote_code), cfg.lora, cfg.ppo, cfg.rollout, m.dtype,
                    m.gradient_checkpointing, verifier_params, source)


def available_memory(device: str) -> tuple[int, str]:
    """(bytes, description) of the memory a campaign may use on `device` ("cpu" or "cuda")."""
    if device == "cuda":
        free, total = torch.cuda.mem_get_info()
        return free, f"free memory of {torch.cuda.get_device_name()} ({total / GIB:.1f} GiB in all)"
    return available_ram(), "available RAM"


def check_fits(est: Estimate, available: int, where: str) -> None:
    """ValueError naming the stage that does not fit and what to change."""
    stage = max(est.peaks, key=est.peaks.get)
    if est.peak > available:
        raise ValueError(
            f"this campaign needs about {est.peak / GIB:.1f} GiB at its {stage} stage but {where} is "
            f"{available / GIB:.1f} GiB: use a GPU with more memory, lower ppo.minibatch_size (with ppo.grad_accum "
            f"to keep the step) or rollout.batch_size, keep model.gradient_checkpointing on, or spread the update "
            f"over more GPUs (scale.processes; see docs/real-models.md)")


def report(est: Estimate, where: str | None = None, available: int | None = None) -> str:
    """A few lines for people: parameters, each memory term, each stage's peak."""
    def gib(x: int) -> str:
        return f"{x / GIB:7.2f} GiB"

    p = est.params
    lines = [
        f"parameters: {p['total'] / 1e9:.2f} B (vision {p['vision'] / 1e6:.0f} M, language {p['language'] / 1e9:.2f} B, "
        f"other {p['other'] / 1e6:.0f} M); LoRA {est.lora_params / 1e6:.1f} M",
        f"weights              {gib(est.weights)}",
        f"verifier weights     {gib(est.verifier_weights)}" + (f"   ({est.verifier})" if est.verifier else ""),
        f"LoRA + grads + AdamW {gib(est.lora_and_optimizer)}",
        f"update activations   {gib(est.update_activations)}",
        f"rollout KV cache     {gib(est.rollout_kv_cache)}",
        f"rollout tokens/round {est.rollout_tokens:,} answer tokens at most (prompt {est.prompt_tokens} tokens each)",
        "peak by stage (x%.1f overhead): " % OVERHEAD + ", ".join(f"{k} {v / GIB:.1f} GiB" for k, v in est.peaks.items()),
    ]
    if available is not None:
        lines.append(f"{where}: {available / GIB:.1f} GiB; needs {math.ceil(est.peak / GIB * 10) / 10:.1f} GiB")
    return "\n".join(lines)
