"""The EVA-CLIP verifier for InstructBLIP, in transformers classes, and a converter from open_clip.

InstructBLIP's vision encoder is EVA-CLIP ViT-g (BLIP-2 drops its last layer and adds its own
`ln_vision`, transformers' `post_layernorm`); transformers has no EVA-CLIP text tower. FiSAO's
verifier for InstructBLIP is the EVA-CLIP the tower came from (open_clip's `EVA01-g-14`): the
whole ViT-g (all 40 layers), its final norm and head, and its text transformer, which is
OpenAI-CLIP's architecture. It is kept as a directory of transformers parts, so it loads offline
with `from_pretrained` and the vision weights compare tensor by tensor with the policy's:

    eva_clip.json                     {"kind": "eva_clip", "logit_scale": ...}
    vision/                           InstructBlipVisionModel (full depth; post_layernorm = EVA's final norm)
                                      + the image processor (BlipImageProcessor, EVA's mean/std)
    visual_projection.safetensors     EVA's head: (D_vision) -> (D_embed)
    text/                             CLIPTextModelWithProjection + CLIP tokenizer

An image embedding is head(norm(ViT(x))[CLS]) and a text embedding is CLIP's: exactly what
open_clip computes for EVA01-g-14 (timm `eva_giant_patch14_224`, token pooling, head as
projection). `from_open_clip` converts an open_clip state dict into this layout.

Why not open_clip itself: it imports torchvision at import time, and no torchvision build runs
on this project's CPU torch (PyPI's 0.28.0 wheel, the one paired with torch 2.13, links
libtorch_cuda; `import torchvision` then fails with "operator torchvision::nms does not exist").
Its weights need no open_clip, though: the EVA01-g-14 checkpoint (`open_clip_pytorch_model.bin`,
or `torch.save(open_clip.create_model("EVA01-g-14", pretrained=...).state_dict(), f)` where open_clip
runs) is a plain state dict, and

    fisao convert eva-clip --state-dict open_clip_pytorch_model.bin --tokenizer openai/clip-vit-large-patch14-336 \
        --image-processor Salesforce/instructblip-vicuna-7b --out models/eva01-g-14

writes the verifier directory (CLIP's tokenizer is open_clip's; the image processor is the
policy's, so the verifier sees the pixels the policy's tower sees). tests/test_eva_clip.py says
what the converter's test proves and what it does not.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import AutoImageProcessor, AutoTokenizer, CLIPTextConfig, CLIPTextModelWithProjection
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.instructblip import InstructBlipVisionConfig, InstructBlipVisionModel

from fisao import io

CONFIG = "eva_clip.json"
PROJECTION = "visual_projection.safetensors"


class EvaClip(nn.Module):
    """EVA-CLIP image and text towers with the `get_image_features`/`get_text_features` of CLIPModel."""

    def __init__(self, vision_model: InstructBlipVisionModel, visual_projection: nn.Linear,
                 text: CLIPTextModelWithProjection, logit_scale: float = 100.0):
        super().__init__()
        self.vision_model, self.visual_projection, self.text = vision_model, visual_projection, text
        self.logit_scale = logit_scale
        self.config = SimpleNamespace(text_config=text.config, vision_config=vision_model.config)

    def get_image_features(self, pixel_values: Tensor) -> BaseModelOutputWithPooling:
        """pooler_output (N, D): head(final_norm(ViT(pixels))[:, 0])."""
        hidden = self.vision_model(pixel_values=pixel_values).last_hidden_state  # post_layernorm applied
        return BaseModelOutputWithPooling(pooler_output=self.visual_projection(hidden[:, 0]))

    def get_text_features(self, input_ids: Tensor, attention_mask: Tensor | None = None, **_) -> BaseModelOutputWithPooling:
        """pooler_output (N, D): CLIP's text embedding (pooled at the end-of-text token, projected)."""
        return BaseModelOutputWithPooling(pooler_output=self.text(input_ids=input_ids, attention_mask=attention_mask).text_embeds)


def is_eva_clip_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG).is_file()


def save_eva_clip(model: EvaClip, image_processor, tokenizer, out: str | Path) -> Path:
    with io.atomic_dir(out) as tmp:
        model.vision_model.save_pretrained(tmp / "vision")
        image_processor.save_pretrained(tmp / "vision")
        model.text.save_pretrained(tmp / "text")
        tokenizer.save_pretrained(tmp / "text")
        save_file({k: v.detach().contiguous() for k, v in model.visual_projection.state_dict().items()}, str(tmp / PROJECTION))
        io.write_json(tmp / CONFIG, {"kind": "eva_clip", "logit_scale": float(model.logit_scale)})
    return Path(out)


def load_eva_clip(path: str | Path, device: str = "cpu") -> tuple[EvaClip, SimpleNamespace]:
    """(model, processor with .tokenizer and .image_processor) from a directory of `save_eva_clip`."""
    path = Path(path)
    if not is_eva_clip_dir(path):
        raise FileNotFoundError(f"{path} has no {CONFIG}: not an EVA-CLIP verifier directory (see fisao/models/eva_clip.py)")
    meta = io.read_json(path / CONFIG)
    vision = InstructBlipVisionModel.from_pretrained(path / "vision")
    text = CLIPTextModelWithProjection.from_pretrained(path / "text")
    head = load_file(str(path / PROJECTION))
    projection = nn.Linear(head["weight"].shape[1], head["weight"].shape[0], bias="bias" in head)
    projection.load_state_dict(head)
    model = EvaClip(vision, projection, text, meta.get("logit_scale", 100.0)).to(device).eval()
    processor = SimpleNamespace(image_processor=AutoImageProcessor.from_pretrained(path / "vision"),
                                tokenizer=AutoTokenizer.from_pretrained(path / "text"))
    return model, processor


def _vision_key(key: str) -> str | None:
    """open_clip/timm EVA key (after `visual.trunk.`) -> InstructBlipVisionModel key (None: handled apart)."""
    fixed = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
             "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
             "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
             "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias"}
    if key in fixed:
        return fixed[key]
    if key.startswith("blocks."):
        _, i, rest = key.split(".", 2)
        rest = {"norm1.weight": "layer_norm1.weight", "norm1.bias": "layer_norm1.bias",
                "norm2.weight": "layer_norm2.weight", "norm2.bias": "layer_norm2.bias",
                "attn.qkv.weight": "self_attn.qkv.weight", "attn.proj.weight": "self_attn.projection.weight",
                "attn.proj.bias": "self_attn.projection.bias", "mlp.fc1.weight": "mlp.fc1.weight",
                "mlp.fc1.bias": "mlp.fc1.bias", "mlp.fc2.weight": "mlp.fc2.weight", "mlp.fc2.bias": "mlp.fc2.bias",
                }.get(rest)
        return f"encoder.layers.{i}.{rest}" if rest else None
    return None


def _text_state(sd: dict[str, Tensor]) -> tuple[dict[str, Tensor], int]:
    """open_clip text keys (top level, or under `text.`) -> CLIPTextModelWithProjection keys; and #layers."""
    sd = {k.removeprefix("text."): v for k, v in sd.items() if not k.startswith("visual.")}
    out = {"text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
           "text_model.embeddings.position_embedding.weight": sd["positional_embedding"],
           "text_model.final_layer_norm.weight": sd["ln_final.weight"],
           "text_model.final_layer_norm.bias": sd["ln_final.bias"],
           "text_projection.weight": sd["text_projection"].T.contiguous()}
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("transformer.resblocks."))
    for i in range(layers):
        src, dst = f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        for part, w in zip("qkv", sd[src + "attn.in_proj_weight"].chunk(3)):
            out[f"{dst}self_attn.{part}_proj.weight"] = w
        for part, b in zip("qkv", sd[src + "attn.in_proj_bias"].chunk(3)):
            out[f"{dst}self_attn.{part}_proj.bias"] = b
        for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                     ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            out[f"{dst}{b}.weight"], out[f"{dst}{b}.bias"] = sd[f"{src}{a}.weight"], sd[f"{src}{a}.bias"]
    return out, layers


def from_open_clip(sd: dict[str, Tensor], heads: tuple[int, int] = (16, 12), image_size: int = 224,
                   eos_token_id: int = 49407) -> EvaClip:
    """An EvaClip holding the weights of an open_clip EVA01-style state dict (timm `Eva` trunk).

    heads: attention heads of (vision, text) (EVA01-g-14: 16, 12); the other sizes are read off
    the tensors. Unknown vision keys are an error naming them (another EVA variant: rope, SwiGLU,
    layer scale are not converted).
    """
    vis = {k.removeprefix("visual.trunk."): v for k, v in sd.items() if k.startswith("visual.trunk.")}
    if not vis:
        raise ValueError("the state dict has no visual.trunk.* tensors: not an open_clip model with a timm EVA trunk")
    state: dict[str, Tensor] = {}
    for key, value in vis.items():
        if key.endswith(("attn.q_bias", "attn.v_bias", "attn.k_bias")) or key.startswith("head."):
            continue
        new = _vision_key(key)
        if new is None:
            raise ValueError(f"open_clip key visual.trunk.{key} has no counterpart in InstructBlipVisionModel; "
                             "only EVA01-style trunks (no rope, no SwiGLU, no layer scale) convert")
        state[new] = value
    depth = 1 + max(int(k.split(".")[1]) for k in vis if k.startswith("blocks."))
    for i in range(depth):
        q, v = vis[f"blocks.{i}.attn.q_bias"], vis[f"blocks.{i}.attn.v_bias"]
        state[f"encoder.layers.{i}.self_attn.qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])
    width = vis["cls_token"].shape[-1]
    patch = vis["patch_embed.proj.weight"].shape[-1]
    vision_cfg = InstructBlipVisionConfig(
        hidden_size=width, intermediate_size=vis["blocks.0.mlp.fc1.weight"].shape[0], num_hidden_layers=depth,
        num_attention_heads=heads[0], image_size=image_size, patch_size=patch, qkv_bias=True, layer_norm_eps=1e-6)
    vision = InstructBlipVisionModel(vision_cfg)
    vision.load_state_dict(state, strict=True)
    head = nn.Linear(width, vis["head.weight"].shape[0], bias="head.bias" in vis)
    head.load_state_dict({k.removeprefix("head."): v for k, v in vis.items() if k.startswith("head.")})
    text_state, layers = _text_state(sd)
    tw = text_state["text_model.final_layer_norm.weight"].shape[0]
    text_cfg = CLIPTextConfig(
        vocab_size=text_state["text_model.embeddings.token_embedding.weight"].shape[0], hidden_size=tw,
        intermediate_size=text_state["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0], num_hidden_layers=layers,
        num_attention_heads=heads[1], max_position_embeddings=text_state["text_model.embeddings.position_embedding.weight"].shape[0],
        projection_dim=text_state["text_projection.weight"].shape[0], hidden_act="gelu", eos_token_id=eos_token_id)
    text = CLIPTextModelWithProjection(text_cfg)
    text.load_state_dict(text_state, strict=True)
    scale = float(sd["logit_scale"].exp()) if "logit_scale" in sd else 100.0
    return EvaClip(vision.eval(), head, text.eval(), scale)


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """A state dict saved with torch.save (a training checkpoint's `state_dict`, DDP's `module.` cut) or safetensors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"state dict {path} does not exist")
    sd = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu", weights_only=True)
    sd = sd.get("state_dict", sd)
    return {k.removeprefix("module."): v for k, v in sd.items()}


def convert_open_clip_checkpoint(state_dict: str | Path, tokenizer: str, image_processor: str, out: str | Path,
                                 heads: tuple[int, int] = (16, 12), image_size: int = 224) -> Path:
    """An EVA-CLIP verifier directory (see the module docstring) from an open_clip EVA01 state dict file,
    with the tokenizer and image processor loaded from `tokenizer` / `image_processor` (ids or directories)."""
    tok = AutoTokenizer.from_pretrained(tokenizer)
    processor = AutoImageProcessor.from_pretrained(image_processor)
    model = from_open_clip(read_state_dict(state_dict), heads, image_size, eos_token_id=tok.eos_token_id)
    return save_eva_clip(model, processor, tok, out)
