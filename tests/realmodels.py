"""Tiny random models of the real classes, with real processor classes, and a COCO-layout fixture.

Each builder saves with `save_pretrained` what `from_pretrained` loads for the real ids
(llava-hf/llava-1.5-7b-hf, llava-hf/llava-v1.6-*, Salesforce/instructblip-vicuna-7b,
openai/clip-vit-large-patch14-336, an EVA-CLIP verifier directory): only the sizes are tiny.
The verifier of each policy holds the policy's own vision weights, as the real pairs do.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torch import nn
from transformers import (
    BlipImageProcessorPil, CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor, CLIPTextConfig,
    CLIPTextModelWithProjection, CLIPVisionConfig, InstructBlipConfig, InstructBlipForConditionalGeneration,
    InstructBlipProcessor, InstructBlipQFormerConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
    LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessorPil, LlavaNextProcessor,
    LlavaProcessor, PreTrainedTokenizerFast,
)
from transformers.models.instructblip import InstructBlipVisionConfig, InstructBlipVisionModel

from fisao.benchmarks.vocab import Vocabulary
from fisao.models.eva_clip import EvaClip, save_eva_clip
from fisao.models.llava import CHAT_TEMPLATE
from fisao.models.tokenizer import train_bpe, wrap

IMAGE, PATCH, WIDTH = 32, 8, 32
# LLaVA-NeXT (Mistral) conversation format, as in llava-hf/llava-v1.6-mistral-7b-hf.
NEXT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{ ' [/INST]' }}{% endif %}{% endfor %}"
)
PROMPTS = ("Please describe this image in detail.", "Describe this image in detail.")

# COCO fixture: (image id, [category ids]) per split; category ids and names are COCO's own.
CATEGORIES = {1: "person", 3: "car", 17: "cat", 18: "dog", 62: "chair", 44: "bottle"}
VAL = {42: [18, 62], 73: [3], 74: [1, 1, 17], 133: [44], 136: [18], 139: [1, 62]}
TRAIN = {9: [17], 25: [3], 30: [1], 34: [18], 36: [62], 49: [44]}


def file_name(split: str, image_id: int) -> str:
    return f"COCO_{split}2014_{image_id:012d}.jpg"


def _image(seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    colour = tuple(int(c) for c in torch.randint(0, 256, (3,), generator=g))
    im = Image.new("RGB", (48, 40), colour)  # not square: LLaVA-NeXT picks a grid from the aspect ratio
    ImageDraw.Draw(im).rectangle([8, 6, 30, 28], fill=tuple(255 - c for c in colour))
    return im


def coco_fixture(root: Path) -> Path:
    """train2014/, val2014/, annotations/ (instances and captions of val2014), pope/ — the real formats."""
    for split, ids in (("train", TRAIN), ("val", VAL)):
        d = root / f"{split}2014"
        d.mkdir(parents=True, exist_ok=True)
        for i in ids:
            _image(i).save(d / file_name(split, i), quality=90)
    (root / "annotations").mkdir(exist_ok=True)
    images = [{"id": i, "file_name": file_name("val", i), "width": 48, "height": 40} for i in VAL]
    anns = [{"id": 1000 + k, "image_id": i, "category_id": c, "bbox": [8, 6, 22, 22], "area": 484.0, "iscrowd": 0}
            for k, (i, c) in enumerate((i, c) for i, cs in VAL.items() for c in cs)]
    cats = [{"id": c, "name": n, "supercategory": "x"} for c, n in CATEGORIES.items()]
    (root / "annotations" / "instances_val2014.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    captions = [{"id": 5000 + k, "image_id": i, "caption": f"A photo with a {CATEGORIES[cs[0]]} in it."}
                for k, (i, cs) in enumerate(VAL.items())]
    captions.append({"id": 6000, "image_id": 42, "caption": "A dog lies under a chair next to a sofa."})
    (root / "annotations" / "captions_val2014.json").write_text(json.dumps({"images": images, "annotations": captions}))
    (root / "pope").mkdir(exist_ok=True)
    for strategy, absent in (("random", "car"), ("popular", "person"), ("adversarial", "cat")):
        rows, q = [], 1
        for i, cs in list(VAL.items())[:4]:
            present = CATEGORIES[cs[0]]
            for name, label in ((present, "yes"), (absent if absent not in {CATEGORIES[c] for c in cs} else "bottle", "no")):
                rows.append({"question_id": q, "image": file_name("val", i), "text": f"Is there a {name} in the image?",
                             "label": label})
                q += 1
        (root / "pope" / f"coco_pope_{strategy}.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def tokenizers():
    """(llava-flavoured, clip-flavoured) tokenizers of one tiny BPE over COCO words and the prompts."""
    names = [" ".join(n.split()) for c in Vocabulary.coco().categories for n in Vocabulary.coco().names_of(c)]
    corpus = (list(PROMPTS) + ["USER:", "ASSISTANT:", "[INST]", "[/INST]", "Is there a", "in the image?"]) * 20
    corpus += [f"There is a {n} and a {m}." for n, m in zip(names, names[1:])]
    corpus += [f"a {w} and a {w}" for w in OBJECT_WORDS] * 20
    bpe = train_bpe(corpus, 600)
    llava = wrap(bpe, "llava")
    llava.padding_side = "left"
    return llava, wrap(bpe, "clip")


def _llama(tok, width: int = WIDTH) -> LlamaConfig:
    return LlamaConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                       tie_word_embeddings=False)


OBJECT_WORDS = ("dog", "cat", "car", "chair", "person", "bottle", "zebra", "pizza", "horse", "train")


@torch.no_grad()
def steer_to_objects(model, tok, scale: float = 40.0) -> None:
    """Make a random model name objects: the output rows of COCO words (and of EOS) are scaled up, the
    others zeroed, so sampled answers are runs of object names, some present and some not — what
    calibration needs (correct and hallucinated mentions) without training anything."""
    head = model.get_output_embeddings().weight
    keep = [tok.convert_tokens_to_ids("\u0120" + w) for w in OBJECT_WORDS] + [tok.eos_token_id]
    keep = [i for i in keep if i is not None and i != tok.unk_token_id]
    assert len(keep) > 6, keep
    rows = head[keep].clone()
    head.zero_()
    head[keep] = rows * scale


def _generation_ids(model, tok) -> None:
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id


def clip_model(clip_tok, out: Path, seed: int = 0) -> tuple[CLIPModel, Path]:
    """A tiny CLIPModel + CLIPProcessor (the verifier of the LLaVA family), saved to `out`."""
    torch.manual_seed(seed)
    config = CLIPConfig(
        vision_config=CLIPVisionConfig(image_size=IMAGE, patch_size=PATCH, hidden_size=WIDTH, intermediate_size=2 * WIDTH,
                                       num_hidden_layers=2, num_attention_heads=2, projection_dim=16).to_dict(),
        text_config=CLIPTextConfig(vocab_size=len(clip_tok), hidden_size=WIDTH, intermediate_size=2 * WIDTH,
                                   num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                                   projection_dim=16, bos_token_id=clip_tok.bos_token_id,
                                   eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id).to_dict(),
        projection_dim=16)
    model = CLIPModel(config)
    processor = CLIPProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": IMAGE},
                                                                    crop_size={"height": IMAGE, "width": IMAGE}),
                              tokenizer=clip_tok)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return model, out


def llava(tok, clip: CLIPModel, out: Path) -> Path:
    torch.manual_seed(1)
    config = LlavaConfig(vision_config=clip.config.vision_config.to_dict(), text_config=_llama(tok).to_dict(),
                         image_token_index=tok.convert_tokens_to_ids(tok.image_token), vision_feature_layer=-2,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu")
    model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(clip.vision_model.state_dict())
    _generation_ids(model, tok)
    steer_to_objects(model, tok)
    processor = LlavaProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": IMAGE},
                                                                     crop_size={"height": IMAGE, "width": IMAGE}),
                               tokenizer=tok, patch_size=PATCH, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def llava_next(tok, clip: CLIPModel, out: Path) -> Path:
    torch.manual_seed(2)
    grid = [[IMAGE, IMAGE], [IMAGE, 2 * IMAGE], [2 * IMAGE, IMAGE], [2 * IMAGE, 2 * IMAGE]]
    config = LlavaNextConfig(vision_config=clip.config.vision_config.to_dict(), text_config=_llama(tok).to_dict(),
                             image_token_index=tok.convert_tokens_to_ids(tok.image_token), vision_feature_layer=-2,
                             vision_feature_select_strategy="default", image_grid_pinpoints=grid)
    model = LlavaNextForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(clip.vision_model.state_dict())
    _generation_ids(model, tok)
    steer_to_objects(model, tok)
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE},
                                                 image_grid_pinpoints=grid)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, patch_size=PATCH,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=NEXT_TEMPLATE)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _eva_vision_config(layers: int) -> InstructBlipVisionConfig:
    return InstructBlipVisionConfig(hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=layers,
                                    num_attention_heads=2, image_size=IMAGE, patch_size=PATCH, qkv_bias=True,
                                    layer_norm_eps=1e-6)


def instructblip(tok, clip_tok, out: Path, verifier_out: Path) -> tuple[Path, Path]:
    """A tiny InstructBLIP (Vicuna-style Llama decoder) and its EVA-CLIP verifier: the verifier's
    ViT has one layer more than the policy's tower (BLIP-2 drops EVA-CLIP's last layer)."""
    torch.manual_seed(3)
    eva_vision = InstructBlipVisionModel(_eva_vision_config(3))
    text = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(clip_tok), hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=16, bos_token_id=clip_tok.bos_token_id,
        eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id))
    image_processor = BlipImageProcessorPil(size={"height": IMAGE, "width": IMAGE})
    save_eva_clip(EvaClip(eva_vision, nn.Linear(WIDTH, 16), text), image_processor, clip_tok, verifier_out)

    config = InstructBlipConfig(
        vision_config=_eva_vision_config(2).to_dict(),
        qformer_config=InstructBlipQFormerConfig(vocab_size=len(clip_tok), hidden_size=WIDTH, num_hidden_layers=1,
                                                 num_attention_heads=2, intermediate_size=2 * WIDTH,
                                                 encoder_hidden_size=WIDTH, max_position_embeddings=64,
                                                 pad_token_id=clip_tok.pad_token_id).to_dict(),
        text_config=_llama(tok).to_dict(), num_query_tokens=4,
        image_token_index=tok.convert_tokens_to_ids(tok.image_token))
    model = InstructBlipForConditionalGeneration(config)
    # Like Salesforce's, the tokenizer has no `image_token` attribute: the processor adds "<image>".
    tok = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, bos_token=tok.bos_token,
                                  eos_token=tok.eos_token, pad_token=tok.pad_token, model_max_length=512)
    tok.padding_side = "left"
    own = {k: v for k, v in eva_vision.state_dict().items() if not k.startswith(("post_layernorm", "encoder.layers.2."))}
    missing, unexpected = model.vision_model.load_state_dict(own, strict=False)
    assert set(missing) == {"post_layernorm.weight", "post_layernorm.bias"} and not unexpected
    _generation_ids(model, tok)
    _generation_ids(model.language_model, tok)
    steer_to_objects(model, tok)
    processor = InstructBlipProcessor(image_processor=image_processor, tokenizer=tok, qformer_tokenizer=clip_tok,
                                      num_query_tokens=4)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out, verifier_out


def build_all(root: Path) -> dict[str, dict[str, Path]]:
    """{family: {"policy": dir, "verifier": dir}} for llava, llava_next and instructblip."""
    tok, clip_tok = tokenizers()
    clip, clip_dir = clip_model(clip_tok, root / "clip")
    out = {"llava": {"policy": llava(tok, clip, root / "llava"), "verifier": clip_dir},
           "llava_next": {"policy": llava_next(tok, clip, root / "llava_next"), "verifier": clip_dir}}
    policy, verifier = instructblip(tok, clip_tok, root / "instructblip", root / "eva_clip")
    out["instructblip"] = {"policy": policy, "verifier": verifier}
    return out
