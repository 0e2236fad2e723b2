"""LoRA on the language model, the value head, and the files a round writes (adapters, merged model).

`add_lora` puts adapters on the language model's attention projections (optionally also on the
vision-to-language projector) and nowhere else: the vision tower is the verifier's image encoder
and stays frozen, bit for bit. The reference policy is the same model with its adapters disabled
(`model.disable_adapter()`), so no second copy is ever held in memory. The value head (GAE only)
is a linear layer on the language model's last hidden state, sharing the LoRA backbone.

Round k continues round k−1's adapters: reload them with `load_policy_with_adapter(...,
is_trainable=True)`; `merge_and_save` writes a round's checkpoint as a plain Hugging Face
directory for evaluation and the next round's rollouts.
"""
from __future__ import annotations

import re
from pathlib import Path

import peft
import torch
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from fisao import io
from fisao.config import LoraConfig, ModelConfig
from fisao.models.families import LLAVA, Family, family_of
from fisao.runtime import load_runtime_policy

VALUE_HEAD = "value_head.safetensors"


def lora_target_regex(cfg: LoraConfig, family: Family = LLAVA) -> str:
    """A regex (peft matches it against full module names) for the language model's projections
    (and the family's vision-to-language projector with `train_projector`)."""
    names = "|".join(re.escape(n) for n in cfg.target_modules)
    pattern = rf".*language_model\..*\.({names})"
    if cfg.train_projector:
        pattern += "|" + family.projector_regex
    return pattern


def add_lora(model, cfg: LoraConfig) -> peft.PeftModel:
    """Wrap `model` with fresh LoRA adapters; only the adapters are trainable afterwards."""
    family = family_of(model)
    peft_cfg = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                               target_modules=lora_target_regex(cfg, family), bias="none")
    try:
        wrapped = peft.get_peft_model(model, peft_cfg)
    except ValueError as e:
        raise ValueError(f"lora.target_modules {list(cfg.target_modules)} match no module of the language model; "
                         "use its projection names (q_proj, k_proj, v_proj, o_proj for Llama)") from e
    vision = family.vision_tower(wrapped.get_base_model())
    vision.requires_grad_(False)
    assert not any("lora_" in n for n, _ in vision.named_parameters()), "LoRA reached the vision tower"
    return wrapped


class ValueHead(nn.Module):
    """V(s_t) from the language model's last hidden state: (N, T, H) -> (N, T). Starts at 0."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    @classmethod
    def for_model(cls, model) -> "ValueHead":
        hf = model.get_base_model() if isinstance(model, peft.PeftModel) else model
        head = cls(hf.config.get_text_config().hidden_size)
        return head.to(device=next(hf.parameters()).device)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.linear(hidden.to(self.linear.weight.dtype)).squeeze(-1)


def save_adapter(model: peft.PeftModel, out: str | Path, value_head: ValueHead | None = None) -> Path:
    """Write the adapters (peft's safetensors + adapter_config.json) and the value head, if any."""
    with io.atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        if value_head is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in value_head.state_dict().items()}, str(tmp / VALUE_HEAD))
    return Path(out)


def load_adapter(base, adapter_dir: str | Path, is_trainable: bool = False) -> peft.PeftModel:
    """`base` (a loaded transformers model) with the adapters from `adapter_dir`."""
    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir} has no adapter_config.json: not a directory written by save_adapter")
    return peft.PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=is_trainable)


def load_policy_with_adapter(base_dir: str | Path, adapter_dir: str | Path, merge: bool = False, device: str | None = None,
                             is_trainable: bool = False, runtime: ModelConfig | None = None):
    """(model, processor): the base model from `base_dir` with the adapters from `adapter_dir`.

    By default a PeftModel: the reference (adapters disabled) stays available, and with
    `is_trainable=True` training continues where it stopped. `merge=True` folds the adapters into
    the weights and returns a plain transformers model (faster inference, no reference). The base
    loads as `runtime` says (device, dtype: bf16 for the real configs; the world's CPU float32
    without one), as the round that trained the adapters loaded it; the adapters stay float32
    (peft's autocast), and merging adds their delta in the base's dtype, as `merge_and_save` does.
    """
    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir} has no adapter_config.json: not a directory written by save_adapter")
    base, processor = load_runtime_policy(base_dir, runtime, device)
    model = load_adapter(base, adapter_dir, is_trainable=is_trainable)
    if merge:
        model = model.merge_and_unload()
    return model.eval(), processor


def load_value_head(adapter_dir: str | Path, model) -> ValueHead | None:
    """The value head saved next to the adapters, or None when there is none."""
    path = Path(adapter_dir) / VALUE_HEAD
    if not path.is_file():
        return None
    head = ValueHead.for_model(model)
    head.load_state_dict(load_file(str(path)))
    return head


def merged_state_dict(model: peft.PeftModel) -> dict[str, Tensor]:
    """The base model's state dict with every LoRA delta added to its weight; the model is unchanged.

    Each merged weight is what `merge_and_unload` gives, bit for bit, in float32 as in bf16."""
    hf = model.get_base_model()
    adapter = model.active_adapter
    merged = {}
    for name, module in hf.named_modules():
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            # Added in float32 and rounded once (as peft's merge_and_unload does): a bf16 base would
            # otherwise round the delta first and the sum again.
            merged[f"{name}.weight"] = (base.weight.float() + module.get_delta_weight(adapter).float()).to(base.weight.dtype).detach()
            if base.bias is not None:
                merged[f"{name}.bias"] = base.bias.detach()
    out = {}
    for key, value in hf.state_dict().items():
        if "lora_" in key:
            continue
        clean = key.replace(".base_layer.", ".")
        out[clean] = merged.get(clean, value)
    return out


def merge_and_save(model: peft.PeftModel, processor, out: str | Path) -> Path:
    """A full Hugging Face directory with the adapters merged, loadable with `fisao.generate.load_policy`.

    Merges out of place (the training model keeps its adapters and its exact weights).
    """
    with torch.no_grad():
        state = merged_state_dict(model)
    with io.atomic_dir(out) as tmp:
        model.get_base_model().save_pretrained(tmp, state_dict=state)
        processor.save_pretrained(tmp)
    return Path(out)
