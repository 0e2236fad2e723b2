"""The open_clip -> EVA-CLIP converter (fisao/models/eva_clip.py) on a tiny state dict in open_clip's layout.

open_clip cannot be imported here (its torchvision has no working CPU build for our torch), so
the state dict is written by hand with the key names and shapes open_clip produces for
`EVA01-g-14`, sizes shrunk: the image tower is open_clip's `TimmModel` around timm's `Eva`
(`eva_giant_patch14_224`: `visual.trunk.*`; timm's classifier head is the projection, since the
config sets no `timm_proj`; the k bias is a non-persistent buffer, so only `q_bias`/`v_bias` are
saved), and the text tower is open_clip's `TextTransformer` under `text.*` (`custom_text`),
`nn.MultiheadAttention` with packed `in_proj_*`, `text_projection` a (width, embed) parameter.

What this proves: every tensor lands in the place its name says, with its values; nothing of the
converted model keeps a random initialisation; the converted model's forward equals a forward
written here from timm's and open_clip's source (pre-norm blocks, q/v-only qkv bias, CLS-token
pooling, final norm then head; causal text attention pooled at the end-of-text token, then the
projection); a converted verifier saves, loads and scores through `Verifier`.
What it does not prove: numerical parity with open_clip's own forward on a real checkpoint.
The key layout and the reference forward are our reading of open_clip/timm, not their code
run here; details such as LayerNorm eps (timm's 1e-6 is assumed), attention scaling, image
preprocessing or pooling of a real EVA01-g-14 are only as right as that reading. Run
`from_open_clip` once next to open_clip on a real checkpoint and compare embeddings before
trusting a converted verifier.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fisao.models.eva_clip import from_open_clip

D, DEPTH, HEADS, MLP, PATCH, IMAGE, EMBED = 32, 2, 2, 80, 8, 32, 16  # vision width, layers, ...
W, LAYERS, T_HEADS, CTX = 24, 2, 2, 16  # text width, layers, heads, context


def open_clip_eva_state(vocab: int = 50, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict with open_clip's EVA01 key names and shapes (every tensor distinct)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"visual.trunk.cls_token": (1, 1, D), "visual.trunk.pos_embed": (1, 1 + (IMAGE // PATCH) ** 2, D),
              "visual.trunk.patch_embed.proj.weight": (D, 3, PATCH, PATCH), "visual.trunk.patch_embed.proj.bias": (D,),
              "visual.trunk.norm.weight": (D,), "visual.trunk.norm.bias": (D,),
              "visual.trunk.head.weight": (EMBED, D), "visual.trunk.head.bias": (EMBED,),
              "text.token_embedding.weight": (vocab, W), "text.positional_embedding": (CTX, W),
              "text.ln_final.weight": (W,), "text.ln_final.bias": (W,), "text.text_projection": (W, EMBED),
              "logit_scale": ()}
    for i in range(DEPTH):
        b = f"visual.trunk.blocks.{i}."
        shapes.update({b + "norm1.weight": (D,), b + "norm1.bias": (D,), b + "attn.q_bias": (D,), b + "attn.v_bias": (D,),
                       b + "attn.qkv.weight": (3 * D, D), b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,),
                       b + "norm2.weight": (D,), b + "norm2.bias": (D,), b + "mlp.fc1.weight": (MLP, D),
                       b + "mlp.fc1.bias": (MLP,), b + "mlp.fc2.weight": (D, MLP), b + "mlp.fc2.bias": (D,)})
    for i in range(LAYERS):
        b = f"text.transformer.resblocks.{i}."
        shapes.update({b + "ln_1.weight": (W,), b + "ln_1.bias": (W,), b + "attn.in_proj_weight": (3 * W, W),
                       b + "attn.in_proj_bias": (3 * W,), b + "attn.out_proj.weight": (W, W), b + "attn.out_proj.bias": (W,),
                       b + "ln_2.weight": (W,), b + "ln_2.bias": (W,), b + "mlp.c_fc.weight": (4 * W, W),
                       b + "mlp.c_fc.bias": (4 * W,), b + "mlp.c_proj.weight": (W, 4 * W), b + "mlp.c_proj.bias": (W,)})
    state = {k: torch.randn(s, generator=g) * 0.2 for k, s in shapes.items()}
    for k in state:  # norms near 1, as trained ones are
        if k.endswith(("norm1.weight", "norm2.weight", "norm.weight", "ln_1.weight", "ln_2.weight", "ln_final.weight")):
            state[k] = state[k] + 1
    state["logit_scale"] = torch.tensor(4.6052)
    return state


def expected_places(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Where each open_clip tensor must land in the converted EvaClip (its state dict keys), written out."""
    v = {k.removeprefix("visual.trunk."): t for k, t in sd.items() if k.startswith("visual.trunk.")}
    out = {"vision_model.embeddings.class_embedding": v["cls_token"],
           "vision_model.embeddings.position_embedding": v["pos_embed"],
           "vision_model.embeddings.patch_embedding.weight": v["patch_embed.proj.weight"],
           "vision_model.embeddings.patch_embedding.bias": v["patch_embed.proj.bias"],
           "vision_model.post_layernorm.weight": v["norm.weight"], "vision_model.post_layernorm.bias": v["norm.bias"],
           "visual_projection.weight": v["head.weight"], "visual_projection.bias": v["head.bias"],
           "text.text_model.embeddings.token_embedding.weight": sd["text.token_embedding.weight"],
           "text.text_model.embeddings.position_embedding.weight": sd["text.positional_embedding"],
           "text.text_model.final_layer_norm.weight": sd["text.ln_final.weight"],
           "text.text_model.final_layer_norm.bias": sd["text.ln_final.bias"],
           "text.text_projection.weight": sd["text.text_projection"].T}
    for i in range(DEPTH):
        a, b = f"blocks.{i}.", f"vision_model.encoder.layers.{i}."
        out.update({b + "layer_norm1.weight": v[a + "norm1.weight"], b + "layer_norm1.bias": v[a + "norm1.bias"],
                    b + "self_attn.qkv.weight": v[a + "attn.qkv.weight"],
                    b + "self_attn.qkv.bias": torch.cat([v[a + "attn.q_bias"], torch.zeros(D), v[a + "attn.v_bias"]]),
                    b + "self_attn.projection.weight": v[a + "attn.proj.weight"],
                    b + "self_attn.projection.bias": v[a + "attn.proj.bias"],
                    b + "layer_norm2.weight": v[a + "norm2.weight"], b + "layer_norm2.bias": v[a + "norm2.bias"],
                    b + "mlp.fc1.weight": v[a + "mlp.fc1.weight"], b + "mlp.fc1.bias": v[a + "mlp.fc1.bias"],
                    b + "mlp.fc2.weight": v[a + "mlp.fc2.weight"], b + "mlp.fc2.bias": v[a + "mlp.fc2.bias"]})
    for i in range(LAYERS):
        a, b = f"text.transformer.resblocks.{i}.", f"text.text_model.encoder.layers.{i}."
        q, k, val = sd[a + "attn.in_proj_weight"].chunk(3)
        qb, kb, vb = sd[a + "attn.in_proj_bias"].chunk(3)
        out.update({b + "self_attn.q_proj.weight": q, b + "self_attn.k_proj.weight": k, b + "self_attn.v_proj.weight": val,
                    b + "self_attn.q_proj.bias": qb, b + "self_attn.k_proj.bias": kb, b + "self_attn.v_proj.bias": vb,
                    b + "self_attn.out_proj.weight": sd[a + "attn.out_proj.weight"],
                    b + "self_attn.out_proj.bias": sd[a + "attn.out_proj.bias"],
                    b + "layer_norm1.weight": sd[a + "ln_1.weight"], b + "layer_norm1.bias": sd[a + "ln_1.bias"],
                    b + "layer_norm2.weight": sd[a + "ln_2.weight"], b + "layer_norm2.bias": sd[a + "ln_2.bias"],
                    b + "mlp.fc1.weight": sd[a + "mlp.c_fc.weight"], b + "mlp.fc1.bias": sd[a + "mlp.c_fc.bias"],
                    b + "mlp.fc2.weight": sd[a + "mlp.c_proj.weight"], b + "mlp.fc2.bias": sd[a + "mlp.c_proj.bias"]})
    return out


def reference_image_embedding(sd: dict[str, torch.Tensor], pixels: torch.Tensor) -> torch.Tensor:
    """(N, EMBED): timm's Eva forward (global_pool="token", head = open_clip's projection), from its source."""
    v = {k.removeprefix("visual.trunk."): t for k, t in sd.items() if k.startswith("visual.trunk.")}
    x = F.conv2d(pixels, v["patch_embed.proj.weight"], v["patch_embed.proj.bias"], stride=PATCH).flatten(2).transpose(1, 2)
    x = torch.cat([v["cls_token"].expand(len(x), -1, -1), x], 1) + v["pos_embed"]
    n, length, _ = x.shape
    for i in range(DEPTH):
        p = lambda name: v[f"blocks.{i}.{name}"]  # noqa: E731
        h = F.layer_norm(x, (D,), p("norm1.weight"), p("norm1.bias"), eps=1e-6)
        bias = torch.cat([p("attn.q_bias"), torch.zeros(D), p("attn.v_bias")])
        q, k, val = F.linear(h, p("attn.qkv.weight"), bias).reshape(n, length, 3, HEADS, -1).permute(2, 0, 3, 1, 4)
        attn = ((q * (D // HEADS) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        x = x + F.linear((attn @ val).transpose(1, 2).reshape(n, length, D), p("attn.proj.weight"), p("attn.proj.bias"))
        h = F.layer_norm(x, (D,), p("norm2.weight"), p("norm2.bias"), eps=1e-6)
        x = x + F.linear(F.gelu(F.linear(h, p("mlp.fc1.weight"), p("mlp.fc1.bias"))), p("mlp.fc2.weight"), p("mlp.fc2.bias"))
    x = F.layer_norm(x, (D,), v["norm.weight"], v["norm.bias"], eps=1e-6)
    return F.linear(x[:, 0], v["head.weight"], v["head.bias"])


def reference_text_embedding(sd: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """(N, EMBED): open_clip's TextTransformer (causal, pooled at argmax of the ids = end of text)."""
    t = {k.removeprefix("text."): x for k, x in sd.items() if k.startswith("text.")}
    n, length = ids.shape
    x = t["token_embedding.weight"][ids] + t["positional_embedding"][:length]
    causal = torch.full((length, length), float("-inf")).triu(1)
    for i in range(LAYERS):
        p = lambda name: t[f"transformer.resblocks.{i}.{name}"]  # noqa: E731
        h = F.layer_norm(x, (W,), p("ln_1.weight"), p("ln_1.bias"))
        q, k, val = F.linear(h, p("attn.in_proj_weight"), p("attn.in_proj_bias")).chunk(3, -1)
        split = lambda y: y.reshape(n, length, T_HEADS, -1).transpose(1, 2)  # noqa: E731
        attn = (split(q) @ split(k).transpose(-2, -1) * (W // T_HEADS) ** -0.5 + causal).softmax(-1)
        out = (attn @ split(val)).transpose(1, 2).reshape(n, length, W)
        x = x + F.linear(out, p("attn.out_proj.weight"), p("attn.out_proj.bias"))
        h = F.layer_norm(x, (W,), p("ln_2.weight"), p("ln_2.bias"))
        x = x + F.linear(F.gelu(F.linear(h, p("mlp.c_fc.weight"), p("mlp.c_fc.bias"))), p("mlp.c_proj.weight"), p("mlp.c_proj.bias"))
    x = F.layer_norm(x, (W,), t["ln_final.weight"], t["ln_final.bias"])
    return x[torch.arange(n), ids.argmax(-1)] @ t["text_projection"]


def convert(sd: dict[str, torch.Tensor], eos: int):
    return from_open_clip(sd, heads=(HEADS, T_HEADS), image_size=IMAGE, eos_token_id=eos)


def test_every_open_clip_tensor_lands_where_its_name_says():
    sd = open_clip_eva_state()
    model = convert(sd, eos=49)
    converted = {**{f"vision_model.{k}": v for k, v in model.vision_model.state_dict().items()},
                 **{f"visual_projection.{k}": v for k, v in model.visual_projection.state_dict().items()},
                 **{f"text.{k}": v for k, v in model.text.state_dict().items()}}
    expected = expected_places(sd)
    assert set(converted) == set(expected)  # nothing left at its random initialisation, nothing extra
    for key, value in expected.items():
        assert torch.equal(converted[key], value), key
    assert model.logit_scale == pytest.approx(100.0, rel=1e-4)  # exp(4.6052), as open_clip's logit_scale.exp()
    cfg = model.vision_model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size, cfg.patch_size) == (D, DEPTH, MLP, PATCH)
    text_cfg = model.text.config
    assert (text_cfg.hidden_size, text_cfg.num_hidden_layers, text_cfg.vocab_size, text_cfg.max_position_embeddings) == (
        W, LAYERS, 50, CTX)


def test_the_converted_forward_is_evas_forward_as_timm_and_open_clip_write_it():
    sd = open_clip_eva_state(vocab=50, seed=1)
    model = convert(sd, eos=49)
    pixels = torch.randn(3, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model.get_image_features(pixels).pooler_output
        theirs = reference_image_embedding(sd, pixels)
    assert ours.shape == (3, EMBED) and torch.allclose(ours, theirs, atol=1e-5)
    # End-of-text (49, the highest id, as open_clip's tokenizer) at different lengths; padding 0 after it.
    ids = torch.tensor([[48, 5, 17, 49, 0, 0, 0], [48, 9, 49, 0, 0, 0, 0], [48, 3, 4, 5, 6, 7, 49]])
    with torch.no_grad():
        ours = model.get_text_features(ids, attention_mask=(ids != 0).long()).pooler_output
        theirs = reference_text_embedding(sd, ids)
    assert ours.shape == (3, EMBED) and torch.allclose(ours, theirs, atol=1e-5)


def test_fisao_convert_eva_clip_writes_a_verifier_that_loads_and_scores(tmp_path, monkeypatch):
    """`fisao convert eva-clip` on a torch.save'd state dict, a saved CLIP tokenizer and the policy's
    image processor; the directory loads as a Verifier whose image embedding is the reference one."""
    import os

    from transformers import BlipImageProcessorPil

    from fisao.align.verifier import Verifier
    from fisao.benchmarks.vocab import Vocabulary
    from cli.main import main
    from tests.realmodels import _image, tokenizers

    _, tok = tokenizers()
    sd = open_clip_eva_state(vocab=len(tok), seed=3)
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "open_clip_model.pt")
    tok.save_pretrained(tmp_path / "tokenizer")
    processor = BlipImageProcessorPil(size={"height": IMAGE, "width": IMAGE})
    processor.save_pretrained(tmp_path / "policy")
    monkeypatch.setattr(os, "environ", dict(os.environ))  # the CLI sets project defaults; keep them here
    assert main(["--project", str(tmp_path), "convert", "eva-clip", "--state-dict", str(tmp_path / "open_clip_model.pt"),
                 "--tokenizer", str(tmp_path / "tokenizer"), "--image-processor", str(tmp_path / "policy"),
                 "--out", str(tmp_path / "eva"), "--vision-heads", str(HEADS), "--text-heads", str(T_HEADS),
                 "--image-size", str(IMAGE)]) == 0
    verifier = Verifier.from_pretrained(tmp_path / "eva", Vocabulary.coco())
    images = [_image(1), _image(2)]
    embeddings = verifier.image_embeddings(images)
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    assert torch.allclose(embeddings, F.normalize(reference_image_embedding(sd, pixels), dim=-1), atol=1e-5)
    assert verifier.model.text.config.eos_token_id == tok.eos_token_id
    scores = verifier.score(embeddings[0], ["dog", "cat", "car"])
    assert scores.shape == (3,) and bool(((scores >= -1) & (scores <= 1)).all())


@pytest.mark.parametrize("extra,message", [
    ({"visual.trunk.blocks.0.gamma_1": torch.ones(D)}, "visual.trunk.blocks.0.gamma_1 has no counterpart"),
    ({"visual.trunk.rope.freqs": torch.ones(4)}, "visual.trunk.rope.freqs has no counterpart"),
])
def test_other_eva_variants_are_refused_by_name(extra, message):
    with pytest.raises(ValueError, match=message):
        convert({**open_clip_eva_state(), **extra}, eos=49)
    with pytest.raises(ValueError, match="no visual.trunk"):
        convert({k: v for k, v in open_clip_eva_state().items() if not k.startswith("visual.")}, eos=49)
