"""Model families: what differs between LLaVA, LLaVA-NeXT and InstructBLIP, in one place.

Everything else (rollouts, log-probs, LoRA, the verifier check, evaluation) calls the adapter of
the model's family, picked by `config.model_type`:

| family | vision tower (the verifier's eyes) | projector (LoRA with `train_projector`) | prompt | extra inputs |
|---|---|---|---|---|
| llava | `model.vision_tower` (CLIP) | `multi_modal_projector.linear_1/2` | the processor's chat template | pixel_values, or image_features computed once (the update) |
| llava_next | `model.vision_tower` (CLIP) | `multi_modal_projector.linear_1/2` | the processor's chat template | pixel_values, image_sizes (any-res tiles) |
| instructblip | `vision_model` (EVA-CLIP ViT-g, last layer dropped) | `language_projection` | the question as written (no chat template; LAVIS's format) | pixel_values, qformer_input_ids, qformer_attention_mask |

The language model is always reached as `language_model` (the LoRA regex targets its projections
only). InstructBLIP with a T5 language model (instructblip-flan-t5-*) is not supported: the
response log-probs here are those of a decoder-only model reading prompt + answer in one
sequence; `family_of` says so instead of computing something else.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

Hidden = Callable[[nn.Module, Tensor, Tensor, Tensor, dict], Tensor]


def _llava_hidden(hf, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, extra: dict) -> Tensor:
    """(N, L, H) last hidden states of LLaVA / LLaVA-NeXT (`extra`: pixel_values[, image_sizes], or
    LLaVA's `image_features` from `_llava_image_features`, computed earlier, in their place)."""
    if "image_features" not in extra:
        out = hf.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                       **extra)
        return out.last_hidden_state
    # What LlavaModel.forward does with pixel_values, from the image tokens on.
    embeds = hf.get_input_embeddings()(input_ids)
    features = extra["image_features"].to(embeds.device, embeds.dtype)
    where = (input_ids == _image_token_id(hf.config)).unsqueeze(-1).expand_as(embeds)
    if int(where.sum()) != features.numel():
        raise ValueError(f"{int(where.sum()) // embeds.shape[-1]} image tokens in the prompts but image features for "
                         f"{features.numel() // embeds.shape[-1]}")
    embeds = embeds.masked_scatter(where, features)
    out = hf.model.language_model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                                  use_cache=False)
    return out.last_hidden_state


def _image_token_id(config) -> int:
    token = getattr(config, "image_token_id", None)
    return config.image_token_index if token is None else token


def _llava_image_features(hf, pixel_values: Tensor) -> Tensor:
    """(N, I, H) LLaVA's image features for `pixel_values` (N, 3, h, w): the vision tower's states at
    the config's feature layer, through the projector, as the language model reads them in place of
    the I image tokens. The model's own `get_image_features`."""
    out = hf.model.get_image_features(pixel_values=pixel_values)
    features = getattr(out, "pooler_output", out)
    return torch.stack(list(features)) if isinstance(features, (list, tuple)) else features


def _instructblip_hidden(hf, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, extra: dict) -> Tensor:
    """(N, L, H) last hidden states of InstructBLIP's decoder, with the Q-Former's outputs in place of
    the image tokens, as its `forward` and `generate` put them."""
    features = hf.get_image_features(extra["pixel_values"], qformer_input_ids=extra["qformer_input_ids"],
                                     qformer_attention_mask=extra.get("qformer_attention_mask")).pooler_output
    embeds = hf.get_input_embeddings()(input_ids)
    where = hf.get_placeholder_mask(input_ids, inputs_embeds=embeds)
    embeds = embeds.masked_scatter(where, features.to(embeds.dtype))
    out = hf.language_model.base_model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                                       use_cache=False)
    return out.last_hidden_state


def _template_prompt(processor, question: str) -> str:
    if not getattr(processor, "chat_template", None):
        raise ValueError(f"{type(processor).__name__} has no chat template: save the model's processor with its "
                         "chat_template (llava-hf checkpoints ship one)")
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(conv, add_generation_prompt=True)


def _plain_prompt(processor, question: str) -> str:
    """InstructBLIP reads the instruction as is (the processor prepends the query tokens)."""
    return question


@dataclass(frozen=True)
class Family:
    """How one kind of vision-language model is driven."""

    name: str
    vision_tower: Callable[[nn.Module], nn.Module]
    projector_regex: str  # peft regex of the vision-to-language projector's linear layers
    prompt: Callable[[object, str], str]
    hidden: Hidden
    # Tensors of the policy's vision tower that are its own, not the verifier's (BLIP-2's ln_vision).
    own_vision_tensors: tuple[str, ...] = ()
    # True when the policy's tower may be the verifier's vision model minus its last layers.
    vision_is_prefix: bool = False
    # (model, pixel_values) -> (N, I, H) image features that `hidden` takes as extra["image_features"]
    # in place of pixel_values (fixed-size images only: not LLaVA-NeXT's any-res tiles); None: no such path.
    image_features: Callable[[nn.Module, Tensor], Tensor] | None = None


LLAVA = Family("llava", lambda hf: hf.model.vision_tower, r".*multi_modal_projector\.(linear_1|linear_2)",
               _template_prompt, _llava_hidden, image_features=_llava_image_features)
LLAVA_NEXT = Family("llava_next", lambda hf: hf.model.vision_tower, r".*multi_modal_projector\.(linear_1|linear_2)",
                    _template_prompt, _llava_hidden)
INSTRUCTBLIP = Family("instructblip", lambda hf: hf.vision_model, r".*language_projection", _plain_prompt,
                      _instructblip_hidden, own_vision_tensors=("post_layernorm.",), vision_is_prefix=True)

FAMILIES: dict[str, Family] = {f.name: f for f in (LLAVA, LLAVA_NEXT, INSTRUCTBLIP)}
# The processor classes of each family (a processor alone decides the prompt format).
PROCESSORS: dict[str, str] = {
    "LlavaProcessor": "llava", "LlavaNextProcessor": "llava_next", "InstructBlipProcessor": "instructblip",
}


def hf_model(model) -> nn.Module:
    """The transformers model inside a PeftModel (LoRA layers are injected in place), or `model`."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def family_of(model_or_config) -> Family:
    """The family of a model (a PeftModel is looked through) or of its config."""
    config = getattr(hf_model(model_or_config), "config", model_or_config)
    family = FAMILIES.get(getattr(config, "model_type", None))
    if family is None:
        raise ValueError(f"model type {getattr(config, 'model_type', None)!r} is not supported; "
                         f"supported: {sorted(FAMILIES)} (LLaVA-1.5, LLaVA-NeXT, InstructBLIP)")
    if family is INSTRUCTBLIP and not config.use_decoder_only_language_model:
        raise ValueError("InstructBLIP with an encoder-decoder (T5) language model is not supported: use a "
                         "decoder-only one such as Salesforce/instructblip-vicuna-7b")
    return family


def family_of_processor(processor) -> Family:
    name = PROCESSORS.get(type(processor).__name__)
    if name is None:
        raise ValueError(f"processor {type(processor).__name__} is not supported; supported: {sorted(PROCESSORS)}")
    return FAMILIES[name]


def vision_tower(model) -> nn.Module:
    """The policy's vision tower (looking through a peft wrapper)."""
    return family_of(model).vision_tower(hf_model(model))


def chat_prompt(processor, question: str) -> str:
    """The model's own format for one image and one question, ready for the answer: the chat
    template of LLaVA-family processors, the plain instruction for InstructBLIP."""
    return family_of_processor(processor).prompt(processor, question)


def decoder_hidden(model, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, extra: dict) -> Tensor:
    """(N, L, H) last hidden states of the language model over the whole sequence."""
    hf = hf_model(model)
    return family_of(hf).hidden(hf, input_ids, attention_mask, position_ids, extra)


@torch.no_grad()
def count_parameters(model) -> dict[str, int]:
    """Parameters of the whole model, its vision tower and its language model (works on meta tensors)."""
    hf = hf_model(model)
    total = sum(p.numel() for p in hf.parameters())
    vision = sum(p.numel() for p in family_of(hf).vision_tower(hf).parameters())
    language = sum(p.numel() for n, p in hf.named_parameters() if "language_model" in n or n.startswith("lm_head"))
    return {"total": total, "vision": vision, "language": language, "other": total - vision - language}
