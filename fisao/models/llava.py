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
from fisao.models.families import chat_prompt, decoder_hidden
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


class ItemIds:
    """Token ids of training items: each prompt (with its image tokens) and each answer (with EOS)
    tokenized once and remembered; the same ids as tokenizing every time."""

    def __init__(self, processor: LlavaProcessor, n_image_tokens: int):
        self.processor, self.n_image_tokens = processor, n_image_tokens
        self.prompts: dict[str, list[int]] = {}
        self.answers: dict[str, tuple[list[int], int]] = {}

    def __call__(self, question: str, answer: str) -> tuple[list[int], list[int], int]:
        """(prompt ids, answer ids ending in EOS, index in the answer ids of its first word's first token)."""
        tok = self.processor.tokenizer
        prompt = self.prompts.get(question)
        if prompt is None:
            image = self.processor.image_token
            text = chat_prompt(self.processor, question).replace(image, image * self.n_image_tokens)
            prompt = self.prompts[question] = tok(text, add_special_tokens=True)["input_ids"]
        if answer not in self.answers:
            ids = tok(" " + answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            self.answers[answer] = ids, next(i for i, t in enumerate(ids) if tok.decode([t]).strip())
        ids, first = self.answers[answer]
        return prompt, ids, first


def collate(processor: LlavaProcessor, n_image_tokens: int, items: list[tuple[int, str, str]],
            ids: ItemIds | None = None) -> dict[str, torch.Tensor]:
    """Right-padded input ids, attention mask, labels (-100 outside the answers) and `decision`:
    True at each answer's first word token (a yes/no answer's "Yes" or "No"). `ids` remembers the
    tokenized prompts and answers across batches."""
    ids = ids or ItemIds(processor, n_image_tokens)
    rows, labels, decisions = [], [], []
    for _, question, answer in items:
        p, a, first = ids(question, answer)
        rows.append(p + a)
        labels.append([-100] * len(p) + a)
        decisions.append(len(p) + first)
    width = max(map(len, rows))
    pad = processor.tokenizer.pad_token_id
    decision = torch.zeros(len(rows), width, dtype=torch.bool)
    decision[torch.arange(len(rows)), torch.tensor(decisions)] = True
    return {
        "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
        "labels": torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels]),
        "decision": decision,
    }


def sft_token_weights(labels: torch.Tensor, decision: torch.Tensor, n_questions: int, mean: str = "kinds") -> torch.Tensor:
    """(B, T-1) weight of each next-token loss in `sft_loss`, which is Σ weight · loss.

    labels: (B, T), -100 where no loss is taken; decision: (B, T) bool, True at each answer's first
    word; the first `n_questions` rows are yes/no questions. `mean="token"`: 1/n for each of the n
    answer tokens (the model's own `.loss`). `mean="kinds"`: three kinds of tokens, the captions'
    tokens, the questions' deciding words ("Yes"/"No") and the questions' other tokens, each kind's
    tokens 1/(k · its count) for the k kinds present in the batch, so their means weigh equally.
    Positions without a loss weigh 0.
    """
    counted = labels[:, 1:] != -100
    weights = torch.zeros(counted.shape)
    if mean == "token":
        weights[counted] = 1.0 / int(counted.sum())
        return weights
    is_question = torch.zeros_like(counted)
    is_question[:n_questions] = True
    deciding = decision[:, 1:] & counted
    kinds = [k for k in (counted & ~is_question, deciding & is_question, counted & is_question & ~deciding) if k.any()]
    for k in kinds:
        weights[k] = 1.0 / (len(kinds) * int(k.sum()))
    return weights


def sft_loss(
    logits: torch.Tensor, labels: torch.Tensor, decision: torch.Tensor, n_questions: int, mean: str = "kinds"
) -> torch.Tensor:
    """Next-token cross-entropy of a batch whose first `n_questions` rows are yes/no questions.

    logits: (B, T, V); labels: (B, T), -100 where no loss is taken; decision: (B, T) bool, True at
    each answer's first word. Each token's loss weighs as `sft_token_weights` says (`mean="token"`:
    the mean over every answer token; `"kinds"`: the means of captions, deciding words and the
    questions' other tokens, weighed equally). Returns a scalar.
    """
    weights = sft_token_weights(labels, decision, n_questions, mean)
    counted = weights > 0
    return weighted_token_loss(logits[:, :-1][counted], labels[:, 1:][counted], weights[counted])


def weighted_token_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ weight · cross-entropy over N tokens: logits (N, V), targets (N,), weights (N,) -> scalar."""
    return (F.cross_entropy(logits.float(), targets, reduction="none") * weights).sum()


@torch.no_grad()
def tower_states(model: LlavaForConditionalGeneration, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(N, I, D) what LLaVA's projector reads for pixels (N, 3, H, W): the frozen vision tower's
    states at the config's feature layer, CLS dropped ("default" strategy), as `get_image_features`
    takes them before its projector."""
    config = model.config
    if not isinstance(config.vision_feature_layer, int) or config.vision_feature_select_strategy != "default":
        raise ValueError("tower_states reads one feature layer with the default (CLS dropped) strategy")
    tower = model.model.vision_tower
    chunks = [tower(chunk, output_hidden_states=True).hidden_states[config.vision_feature_layer][:, 1:]
              for chunk in pixels.split(batch_size)]
    return torch.cat(chunks)


def sft_backward(model: LlavaForConditionalGeneration, states: torch.Tensor, batch: dict[str, torch.Tensor],
                 image_index: torch.Tensor, n_questions: int, mean: str = "kinds") -> float:
    """Back-propagates `sft_loss` of one batch (`collate`'s, questions first) and returns it.

    states: (N, I, D) `tower_states` of the training images; image_index: (B,) each row's image. The
    questions and the captions go through the model as two groups, each padded to its own longest
    row (the questions are shorter), with the whole batch's token weights: the loss and gradient
    of the batch in one pass, less the padding. Logits are computed at answer positions only.
    """
    labels, decision = batch["labels"], batch["decision"]
    weights = sft_token_weights(labels, decision, n_questions, mean)
    projector, head = model.model.multi_modal_projector, model.get_output_embeddings()
    total = 0.0
    for rows in (slice(0, n_questions), slice(n_questions, len(labels))):
        if rows.start == rows.stop:
            continue
        width = int(batch["attention_mask"][rows].sum(1).max())
        ids, mask, target = batch["input_ids"][rows, :width], batch["attention_mask"][rows, :width], labels[rows, 1:width]
        features = projector(states[image_index[rows]])
        hidden = decoder_hidden(model, ids, mask, None, {"image_features": features})
        counted = target != -100
        loss = weighted_token_loss(head(hidden[:, :-1][counted]), target[counted], weights[rows, : width - 1][counted])
        loss.backward()
        total += float(loss.detach())
    return total


def train_llava(
    model: LlavaForConditionalGeneration, processor: LlavaProcessor, train: list[Example], cfg: LlavaBuildConfig,
    progress: bool = True,
) -> dict:
    """Supervised fine-tuning of projector + language model; returns the loss curve.

    The vision tower is frozen, so its states for the training images are computed once, and each
    prompt and answer is tokenized once."""
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    pixels = pixel_values(processor.image_processor, [e.image for e in train])
    states = tower_states(model, pixels)
    item_ids = ItemIds(processor, image_token_count(processor, load_image(train[0].image)))
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
        batch = collate(processor, item_ids.n_image_tokens, items, item_ids)
        opt.zero_grad(set_to_none=True)
        loss = sft_backward(model, states, batch, torch.tensor([i for i, _, _ in items]), n_q, cfg.loss_mean)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        curve.append(round(loss, 5))
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss:.3f}")
    model.eval()
    return {"loss": curve}


def save_llava(model: LlavaForConditionalGeneration, processor: LlavaProcessor, out: str | Path) -> None:
    model.save_pretrained(out)
    processor.save_pretrained(out)
