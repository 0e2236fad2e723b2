"""Build and train the world's tiny LLaVA on the CLIP's (frozen) vision tower.

The architecture is transformers' `LlavaForConditionalGeneration` with a Llama language model,
CLIP vision features without CLS (from the layer `llava.vision_feature_layer`; LLaVA-1.5 reads the
second-to-last of its 24, the world's 3-layer CLIP gives its objects in the last), a two-layer
GELU projector, and LLaVA-1.5's conversation format ("USER: <image>\\n... ASSISTANT: ...").
Supervised fine-tuning trains the projector and the language model on the world's captions
and yes/no questions; the loss covers the answer tokens only.
"""
from __future__ import annotations

import math
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import CLIPModel, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

from fisao.coco import load_image
from fisao.config import LlavaBuildConfig
from fisao.models.families import chat_prompt
from fisao.models.images import pixel_values
from fisao.progress import bar as progress_bar
from fisao.world.data import Example

# LLaVA-1.5's conversation format, as in llava-hf's processors.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

CAPTION_PROMPTS = (
    "Please describe this image in detail.",
    "Describe this image in detail.",
    "Describe the image.",
    "What is in this image?",
)


def llava_config(clip: CLIPModel, cfg: LlavaBuildConfig, tokenizer) -> LlavaConfig:
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.width, intermediate_size=4 * cfg.width,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
        max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=clip.config.vision_config.to_dict(), text_config=text.to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids(tokenizer.image_token),
        vision_feature_layer=cfg.vision_feature_layer, vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )


def llava_from_clip(clip: CLIPModel, cfg: LlavaBuildConfig, tokenizer) -> LlavaForConditionalGeneration:
    """A fresh LLaVA whose vision tower holds `clip`'s vision weights (frozen)."""
    torch.manual_seed(cfg.seed)
    model = LlavaForConditionalGeneration(llava_config(clip, cfg, tokenizer))
    model.model.vision_tower.load_state_dict(clip.vision_model.state_dict())
    model.model.vision_tower.requires_grad_(False)
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    return model


def image_token_count(processor: LlavaProcessor, image) -> int:
    """How many <image> tokens the processor expands one image into."""
    ids = processor(text=[chat_prompt(processor, "x")], images=[image], return_tensors="pt")["input_ids"]
    return int((ids == processor.tokenizer.convert_tokens_to_ids(processor.image_token)).sum())


def sft_items(examples: list[Example], rng: random.Random) -> tuple[list[tuple[int, str, str]], list[tuple[int, str, str]]]:
    """(image index, question, answer) for captions (random prompt) and for yes/no questions."""
    captions = [(i, rng.choice(CAPTION_PROMPTS), c) for i, e in enumerate(examples) for c in e.captions]
    questions = [(i, q, a) for i, e in enumerate(examples) for q, a in e.questions]
    return captions, questions


def collate(processor: LlavaProcessor, n_image_tokens: int, items: list[tuple[int, str, str]]) -> dict[str, torch.Tensor]:
    """Right-padded input ids, attention mask, labels (-100 outside the answers) and `decision`:
    True at each answer's first word token (a yes/no answer's "Yes" or "No")."""
    tok = processor.tokenizer
    image = processor.image_token
    rows, labels, decisions = [], [], []
    for _, question, answer in items:
        prompt = chat_prompt(processor, question).replace(image, image * n_image_tokens)
        p = tok(prompt, add_special_tokens=True)["input_ids"]
        a = tok(" " + answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append(p + a)
        labels.append([-100] * len(p) + a)
        first = next(i for i, t in enumerate(a) if tok.decode([t]).strip())
        decisions.append(len(p) + first)
    width = max(map(len, rows))
    pad = tok.pad_token_id
    decision = torch.zeros(len(rows), width, dtype=torch.bool)
    decision[torch.arange(len(rows)), torch.tensor(decisions)] = True
    return {
        "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
        "labels": torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels]),
        "decision": decision,
    }


def sft_loss(
    logits: torch.Tensor, labels: torch.Tensor, decision: torch.Tensor, n_questions: int, mean: str = "kinds"
) -> torch.Tensor:
    """Next-token cross-entropy of a batch whose first `n_questions` rows are yes/no questions.

    logits: (B, T, V); labels: (B, T), -100 where no loss is taken; decision: (B, T) bool, True at
    each answer's first word. `mean="token"` averages over every answer token (what the model's own
    `.loss` does). `mean="kinds"` averages three kinds of tokens separately and weighs their means
    equally: the captions' tokens, the questions' deciding words ("Yes"/"No") and the questions'
    other tokens (a kind absent from the batch leaves the others). Returns a scalar.
    """
    target = labels[:, 1:]
    token_loss = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), target, ignore_index=-100, reduction="none")
    counted = target != -100
    if mean == "token":
        return token_loss[counted].mean()
    is_question = torch.zeros_like(counted)
    is_question[:n_questions] = True
    deciding = decision[:, 1:] & counted
    kinds = [counted & ~is_question, deciding & is_question, counted & is_question & ~deciding]
    return torch.stack([token_loss[k].mean() for k in kinds if k.any()]).mean()


def train_llava(
    model: LlavaForConditionalGeneration, processor: LlavaProcessor, train: list[Example], cfg: LlavaBuildConfig,
    progress: bool = True,
) -> dict:
    """Supervised fine-tuning of projector + language model; returns the loss curve."""
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    pixels = pixel_values(processor.image_processor, [e.image for e in train])
    n_tokens = image_token_count(processor, load_image(train[0].image))
    captions, questions = sft_items(train, rng)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = max(1, cfg.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, cfg.steps - warm)))
    )
    curve: list[float] = []
    model.train()
    bar = progress_bar(range(cfg.steps), "train LLaVA", progress, leave=True)
    for step in bar:
        n_q = sum(rng.random() < cfg.question_share for _ in range(cfg.batch_size))
        items = rng.sample(questions, n_q) + rng.sample(captions, cfg.batch_size - n_q)
        batch = collate(processor, n_tokens, items)
        batch["pixel_values"] = pixels[[i for i, _, _ in items]]
        labels, decision = batch.pop("labels"), batch.pop("decision")
        loss = sft_loss(model(**batch).logits, labels, decision, n_q, cfg.loss_mean)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        curve.append(round(float(loss.detach()), 5))
        if step % 20 == 0:
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
    model.eval()
    return {"loss": curve}


def save_llava(model: LlavaForConditionalGeneration, processor: LlavaProcessor, out: str | Path) -> None:
    model.save_pretrained(out)
    processor.save_pretrained(out)
