"""The base models: real transformers classes, saved and loaded the way real checkpoints are."""
from __future__ import annotations

import json
import subprocess
import sys

import torch
import torch.nn.functional as F
from transformers import CLIPModel, LlavaForConditionalGeneration

from fisao.coco import load_image
from fisao.generate import answer, banned_token_ids, load_policy
from fisao.models.families import chat_prompt
from fisao.models.tokenizer import EOS, SPECIAL_TOKENS, train_bpe, wrap

FRESH_PROCESS = r"""
import json, sys, torch
from transformers import AutoProcessor, AutoModelForImageTextToText, CLIPModel
from PIL import Image
clip_dir, llava_dir, image = sys.argv[1:4]
clip = CLIPModel.from_pretrained(clip_dir).eval()
cproc = AutoProcessor.from_pretrained(clip_dir)
proc = AutoProcessor.from_pretrained(llava_dir)
model = AutoModelForImageTextToText.from_pretrained(llava_dir).eval()
img = Image.open(image).convert("RGB")
conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
inputs = proc(images=[img], text=[proc.apply_chat_template(conv, add_generation_prompt=True)], return_tensors="pt")
with torch.no_grad():
    logits = model(**inputs).logits[0, -1]
    enc = cproc(text=["a photo of a circle."], images=[img], return_tensors="pt", padding=True)
    score = clip(**enc).logits_per_image[0, 0]
print(json.dumps({"classes": [type(model).__name__, type(proc).__name__, type(cproc).__name__],
                  "logits": logits.tolist(), "clip": float(score)}))
"""


def test_round_trip_in_a_fresh_process_gives_the_same_outputs(tiny_models):
    image = tiny_models["world"] / "test" / "images" / "000001.png"
    res = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(tiny_models["clip"]), str(tiny_models["llava"]), str(image)],
                         capture_output=True, text=True, check=True)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["classes"] == ["LlavaForConditionalGeneration", "LlavaProcessor", "CLIPProcessor"]

    model, proc = load_policy(tiny_models["llava"])
    inputs = proc(images=[load_image(image)], text=[chat_prompt(proc, "Describe the image.")], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1]
    assert torch.allclose(logits, torch.tensor(out["logits"]), atol=1e-5)
    clip = CLIPModel.from_pretrained(tiny_models["clip"]).eval()
    assert isinstance(model, LlavaForConditionalGeneration)
    assert abs(out["clip"]) > 0 and clip.config.text_config.eos_token_id != 2


def test_llava_vision_tower_is_the_clip_vision_model(tiny_models):
    clip = CLIPModel.from_pretrained(tiny_models["clip"])
    model, _ = load_policy(tiny_models["llava"])
    ours = model.model.vision_tower.state_dict()
    theirs = clip.vision_model.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_generation_never_emits_special_tokens_and_is_deterministic(tiny_models):
    model, proc = load_policy(tiny_models["llava"])
    images = [load_image(tiny_models["world"] / "test" / "images" / f"{i:06d}.png") for i in (1, 2, 3)]
    first = answer(model, proc, images, ["Describe the image."] * 3, max_new_tokens=10, batch_size=2, progress=False)
    again = answer(model, proc, images, ["Describe the image."] * 3, max_new_tokens=10, batch_size=3, progress=False)
    assert first == again  # greedy: batching and padding do not change answers
    banned = banned_token_ids(proc)
    assert set(banned) == {proc.tokenizer.convert_tokens_to_ids(t) for t in ("<image>", "<pad>", "<s>")}
    assert not any(tok in text for text in first for tok in SPECIAL_TOKENS)


def test_tokenizer_training_is_deterministic_and_offsets_cover_the_text():
    texts = ["The image shows a red circle and two blue squares.", "Is there a star in the image?"] * 20
    a, b = wrap(train_bpe(texts, 300), "llava"), wrap(train_bpe(texts, 300), "llava")
    assert a.get_vocab() == b.get_vocab()
    text = "two blue squares."
    enc = a(text, return_offsets_mapping=True, add_special_tokens=False)
    assert "".join(text[s:e] for s, e in enc["offset_mapping"]) == text
    assert a.decode(enc["input_ids"]) == text
    clip_tok = wrap(train_bpe(texts, 300), "clip")
    ids = clip_tok("a star")["input_ids"]
    assert ids[0] == clip_tok.bos_token_id and ids[-1] == clip_tok.convert_tokens_to_ids(EOS)


def test_clip_training_stops_at_the_first_check_that_reaches_the_target_auroc(tiny_models, monkeypatch):
    """`clip.target_auroc`: the val AUROC is checked every `check_every` steps and training stops at
    the first check at or above the target; without a target every step runs and nothing is checked."""
    import fisao.models.clip as clip_module
    from fisao.models.tokenizer import wrap
    from fisao.models.build import tokenizer_corpus
    from fisao.world.build import read_world_config
    from fisao.world.data import load_split

    world_dir, cfg = tiny_models["world"], tiny_models["config"]
    world = read_world_config(world_dir)
    train, val = load_split(world_dir, "train"), load_split(world_dir, "val")
    prompts, _ = clip_module.name_prompts(world)
    tokenizer = wrap(train_bpe(tokenizer_corpus(train, prompts), cfg.clip.vocab_size), "clip")
    checks = iter([0.6, 0.75, 0.9, 0.95, 0.99])
    seen: list[bool] = []

    def fake_auroc(model, processor, examples, classes, pixels=None):
        seen.append(model.training)
        return next(checks) if len(seen) <= 5 else 0.5

    monkeypatch.setattr(clip_module, "object_name_auroc", fake_auroc)
    target = cfg.clip.model_copy(update={"steps": 20, "check_every": 3, "target_auroc": 0.9})
    _, _, curves = clip_module.train_clip(train, val, world, target, tokenizer, progress=False)
    assert curves["val_auroc_checks"] == [0.6, 0.75, 0.9]  # the checks after steps 3, 6, 9
    assert curves["steps_trained"] == 9 and len(curves["loss"]) == 9
    assert seen == [True, True, True]  # training mode is kept through a check
    assert curves["val_auroc"] == 0.9  # the stopping check's AUROC, not measured again

    checks = iter([0.6, 0.7, 0.8, 0.85, 0.86, 0.87])
    seen.clear()
    _, _, curves = clip_module.train_clip(train, val, world, target.model_copy(update={"target_auroc": 0.99}),
                                          tokenizer, progress=False)
    assert curves["steps_trained"] == 20 and len(curves["val_auroc_checks"]) == 6  # never reached: all steps

    seen.clear()
    _, _, curves = clip_module.train_clip(train, val, world, target.model_copy(update={"target_auroc": None}),
                                          tokenizer, progress=False)
    assert curves["steps_trained"] == 20 and "val_auroc_checks" not in curves and len(seen) == 1  # the final val AUROC


def test_sft_loss_token_mean_is_the_models_own_loss_and_kinds_weighs_captions_decisions_and_the_rest_equally():
    from fisao.models.llava import sft_loss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, generator=g)
    labels = torch.full((3, 5), -100)
    labels[0, 2:] = torch.tensor([2, 4, 1])       # a question: 3 answer tokens, the first one deciding
    labels[1, 1:] = torch.tensor([1, 2, 3, 6])    # two captions: 4 and 3 answer tokens
    labels[2, 2:] = torch.tensor([5, 0, 1])
    decision = torch.zeros(3, 5, dtype=torch.bool)
    decision[:, 2] = True
    # The naive reference: each counted token's -log p(next token), position by position.
    nll = {}
    for b in range(3):
        for t in range(1, 5):
            if labels[b, t] != -100:
                nll[(b, t)] = float(-torch.log_softmax(logits[b, t - 1], -1)[labels[b, t]])
    token = sum(nll.values()) / len(nll)
    deciding = nll[(0, 2)]
    rest = (nll[(0, 3)] + nll[(0, 4)]) / 2
    caption = sum(v for (b, _), v in nll.items() if b > 0) / 7
    assert abs(float(sft_loss(logits, labels, decision, 1, "token")) - token) < 1e-5
    assert abs(float(sft_loss(logits, labels, decision, 1, "kinds")) - (deciding + rest + caption) / 3) < 1e-5
    assert abs(float(sft_loss(logits, labels, decision, 0, "kinds")) - token) < 1e-5  # no questions: the captions' mean
    questions_only = (nll[(0, 2)] + nll[(1, 2)] + nll[(2, 2)]) / 3 / 2 + (sum(nll.values()) - nll[(0, 2)] - nll[(1, 2)] - nll[(2, 2)]) / 7 / 2
    assert abs(float(sft_loss(logits, labels, decision, 3, "kinds")) - questions_only) < 1e-5  # no captions
    # The token mean is the Hugging Face causal-LM loss.
    hf = F.cross_entropy(logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert abs(float(sft_loss(logits, labels, decision, 1, "token")) - float(hf)) < 1e-6


def test_sft_token_weights_sum_to_one_and_weigh_each_present_kind_equally():
    from fisao.models.llava import sft_token_weights

    labels = torch.full((3, 6), -100)
    labels[0, 3:] = 7          # a question: 3 answer tokens, the first (position 3) deciding
    labels[1, 2:] = 7          # two captions: 4 and 2 answer tokens
    labels[2, 4:] = 7
    decision = torch.zeros(3, 6, dtype=torch.bool)
    decision[0, 3] = decision[1, 2] = decision[2, 4] = True
    w = sft_token_weights(labels, decision, 1, "kinds")  # (3, 5): position t weighs the token at t + 1
    assert w.shape == (3, 5) and abs(float(w.sum()) - 1) < 1e-6
    assert abs(float(w[0, 2]) - 1 / 3) < 1e-7 and torch.allclose(w[0, 3:], torch.full((2,), 1 / 6))  # deciding; the rest (2)
    assert torch.allclose(w[1, 1:], torch.full((4,), 1 / 18)) and torch.allclose(w[2, 3:], torch.full((2,), 1 / 18))
    assert float(w[labels[:, 1:] == -100].abs().sum()) == 0
    token = sft_token_weights(labels, decision, 1, "token")
    assert torch.allclose(token[labels[:, 1:] != -100], torch.full((9,), 1 / 9))


def test_sft_backward_gives_the_full_batchs_loss_and_gradient(tiny_models):
    """The training step's path (tower states computed once, questions and captions as two groups
    each padded to its own width, logits at answer positions only) against the naive one: the
    model's own forward with pixel_values over the whole right-padded batch, then `sft_loss`."""
    import random

    from fisao.coco import load_image
    from fisao.generate import load_policy
    from fisao.models.images import pixel_values
    from fisao.models.llava import (ItemIds, collate, image_token_count, sft_backward, sft_items, sft_loss,
                                    tower_states)
    from fisao.world.data import load_split

    model, processor = load_policy(tiny_models["llava"])
    train = load_split(tiny_models["world"], "train")[:12]
    pixels = pixel_values(processor.image_processor, [e.image for e in train])
    states = tower_states(model, pixels, batch_size=5)
    features = model.model.get_image_features(pixel_values=pixels).pooler_output
    assert torch.allclose(model.model.multi_modal_projector(states), torch.stack(list(features)), atol=1e-6)

    captions, questions = sft_items(train, random.Random(0))
    items = questions[:5] + captions[:3]
    ids = ItemIds(processor, image_token_count(processor, load_image(train[0].image)))
    batch = collate(processor, ids.n_image_tokens, items, ids)
    assert len(ids.answers) == len({a for _, _, a in items})  # each answer tokenized once
    assert all(torch.equal(batch[k], v) for k, v in collate(processor, ids.n_image_tokens, items).items())
    index = torch.tensor([i for i, _, _ in items])
    widths = batch["attention_mask"].sum(1)
    assert int(widths[:5].max()) < int(widths.max())  # the questions' group is narrower: padding saved

    model.model.vision_tower.requires_grad_(False)  # as `llava_from_clip` builds it (not saved in the checkpoint)
    model.train()
    for mean in ("kinds", "token"):
        model.zero_grad(set_to_none=True)
        loss = sft_backward(model, states, batch, index, 5, mean)
        ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        naive = sft_loss(model(**inputs, pixel_values=pixels[index]).logits, batch["labels"], batch["decision"], 5, mean)
        naive.backward()
        assert abs(loss - float(naive.detach())) < 1e-5
        for n, p in model.named_parameters():
            if p.requires_grad:
                assert torch.allclose(ours[n], p.grad, atol=1e-6, rtol=1e-4), n


def test_collate_marks_each_answers_first_word(tiny_models):
    from fisao.generate import load_policy
    from fisao.models.llava import collate

    _, processor = load_policy(tiny_models["llava"])[:2]
    tok = processor.tokenizer
    batch = collate(processor, 3, [(0, "Is there a circle in the image?", "Yes, there is a circle in the image."),
                                   (0, "Describe.", "A red square.")])
    words = [tok.decode([int(batch["input_ids"][r][batch["decision"][r]])]).strip() for r in range(2)]
    # The first token of the answer's first word (the tiny vocabulary may split "Yes").
    assert words[0] and "Yes".startswith(words[0]) and words[1] == "A" and batch["decision"].sum() == 2
    assert (batch["labels"][batch["decision"]] != -100).all()
