"""The base models: real transformers classes, saved and loaded the way real checkpoints are."""
from __future__ import annotations

import json
import subprocess
import sys

import torch
from transformers import CLIPModel, LlavaForConditionalGeneration

from fisao.coco import load_image
from fisao.generate import answer, banned_token_ids, chat_prompt, load_policy
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
