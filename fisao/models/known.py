"""What the real checkpoints look like, without the hub: their configurations and verifier sizes.

`fisao estimate` and the campaign's memory check need a policy's configuration before anything
is downloaded (nothing is, with HF_HUB_OFFLINE=1). A local directory or a cached hub id is read
as it is; for the checkpoints below the configuration is built here from its known values:

| id | family | source of the values |
|---|---|---|
| llava-hf/llava-1.5-7b-hf, -13b-hf | llava | the checkpoints' config.json (keys that differ from transformers' defaults) |
| llava-hf/llava-v1.6-vicuna-7b-hf | llava_next | its config.json: LLaVA-1.5-7B's towers, any-res grid up to 672 px |
| Salesforce/instructblip-vicuna-7b | instructblip | transformers' conversion script (`convert_instructblip_original_to_pytorch.py`): EVA ViT-g without its last layer (39 × 1408), Q-Former with BERT's vocabulary + [DEC], Vicuna-7B (LLaMA-7B, vocabulary 32001) |

Verifiers: a directory is counted tensor by tensor (safetensors headers); otherwise its known
size, or, when `model.verifier` names a directory not made yet, the size of the verifier paired
with the policy (the CLIP its vision tower comes from: CLIP ViT-L/14-336 for LLaVA, EVA01-g-14
for InstructBLIP).
"""
from __future__ import annotations

from pathlib import Path

_CLIP_L_336 = {"model_type": "clip_vision_model", "hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
               "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768}
_LLAMA_7B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096,
             "vocab_size": 32064, "rms_norm_eps": 1e-5}
_LLAVA_15 = {"model_type": "llava", "image_token_index": 32000, "pad_token_id": 32001, "projector_hidden_act": "gelu",
             "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "tie_word_embeddings": False,
             "vision_config": _CLIP_L_336}

KNOWN: dict[str, dict] = {
    "llava-hf/llava-1.5-7b-hf": {**_LLAVA_15, "text_config": _LLAMA_7B},
    "llava-hf/llava-1.5-13b-hf": {**_LLAVA_15, "text_config": {
        **_LLAMA_7B, "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40, "num_attention_heads": 40,
        "num_key_value_heads": 40}},
    "llava-hf/llava-v1.6-vicuna-7b-hf": {
        "model_type": "llava_next", "image_token_index": 32000, "projector_hidden_act": "gelu",
        "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "tie_word_embeddings": False,
        "use_image_newline_parameter": True,
        "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
        "vision_config": _CLIP_L_336, "text_config": {**_LLAMA_7B, "pad_token_id": 0}},
    "Salesforce/instructblip-vicuna-7b": {
        "model_type": "instructblip", "num_query_tokens": 32, "use_decoder_only_language_model": True,
        "vision_config": {"model_type": "instructblip_vision_model", "hidden_size": 1408, "intermediate_size": 6144,
                          "num_hidden_layers": 39, "num_attention_heads": 16, "image_size": 224, "patch_size": 14},
        "qformer_config": {"model_type": "instructblip_qformer", "vocab_size": 30523},
        "text_config": {**_LLAMA_7B, "max_position_embeddings": 2048, "vocab_size": 32001, "rms_norm_eps": 1e-6}},
}

# Parameters of the verifiers, counted on the meta device from their architectures:
# openai/clip-vit-large-patch14-336: vision 303.5M + text 123.1M + projections;
# EVA01-g-14 (open_clip; converted by fisao/models/eva_clip.py): ViT-g 40 × 1408 with its final
# norm 1,011,202,432 + head 1408 -> 1024 1,442,816 + CLIP text (12 × 768, projection 1024) 123,846,912.
VERIFIER_PARAMS = {"openai/clip-vit-large-patch14-336": 427_944_193, "EVA01-g-14": 1_136_492_160}
PAIRED_VERIFIERS = {"llava-hf/llava-1.5-7b-hf": "openai/clip-vit-large-patch14-336",
                    "llava-hf/llava-1.5-13b-hf": "openai/clip-vit-large-patch14-336",
                    "llava-hf/llava-v1.6-vicuna-7b-hf": "openai/clip-vit-large-patch14-336",
                    "Salesforce/instructblip-vicuna-7b": "EVA01-g-14"}


def known_config(model_id: str):
    """The transformers config of a known checkpoint, built locally (no download)."""
    from transformers import AutoConfig

    if model_id not in KNOWN:
        raise ValueError(f"no built-in config for {model_id!r}; known: {sorted(KNOWN)} (or pass a local directory)")
    values = dict(KNOWN[model_id])
    return AutoConfig.for_model(values.pop("model_type"), **values)


def policy_config(policy: str, trust_remote_code: bool = False):
    """The config of `policy` (a directory, a cached hub id, or a known id), without downloading."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(policy, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return known_config(policy)


def count_safetensors(directory: str | Path) -> int:
    """Parameters stored in the safetensors files under `directory` (headers only; nothing loaded)."""
    from safetensors import safe_open

    total = 0
    for path in sorted(Path(directory).rglob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                shape = f.get_slice(key).get_shape()
                n = 1
                for d in shape:
                    n *= d
                total += n
    return total


def verifier_parameters(verifier: str, policy: str) -> tuple[int, str]:
    """(parameters, where the figure comes from) of `verifier`, the verifier of `policy`."""
    if Path(verifier).is_dir() and (n := count_safetensors(verifier)):
        return n, f"counted in {verifier}"
    if verifier in VERIFIER_PARAMS:
        return VERIFIER_PARAMS[verifier], f"{verifier}, known size"
    paired = PAIRED_VERIFIERS.get(policy)
    if paired is not None:
        return VERIFIER_PARAMS[paired], f"{paired}, the verifier of {policy} ({verifier} does not exist yet)"
    return 0, f"unknown: {verifier} is neither a directory nor a known verifier, so it is not counted"
