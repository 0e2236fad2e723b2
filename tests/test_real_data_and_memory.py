"""COCO-layout loaders on a fixture in the real formats, the shipped POPE files, the real-model
config sections, and the memory estimate (7B counted on the meta device) and its refusal."""
from __future__ import annotations

from pathlib import Path

import pytest

from fisao import io
from fisao.benchmarks.vocab import Vocabulary
from fisao.config import load_config
from fisao.evaluate import eval_data, shipped_pope
from fisao.examples import example_truth, load_examples
from fisao.memory import GIB, check_fits, estimate, report
from fisao.models.known import VERIFIER_PARAMS, known_config
from tests.realmodels import TRAIN, VAL, coco_fixture

ROOT = Path(__file__).resolve().parents[1]


def test_coco_layout_loaders(tmp_path):
    root = coco_fixture(tmp_path / "coco")
    train = load_examples(root, "train")
    assert [e.image_id for e in train] == sorted(TRAIN) and all(e.objects is None for e in train)
    assert train[0].image.name == "COCO_train2014_000000000009.jpg"
    val = load_examples(root, "val", limit=3, need_objects=True)
    assert [e.image_id for e in val] == sorted(VAL)[:3] and val[0].objects == ("dog", "chair")
    truth = example_truth(root, val, Vocabulary.coco())
    assert truth[0] == {"dog", "chair", "couch"}  # "sofa" in a reference caption counts, as in CHAIR
    assert example_truth(root, train[:1], Vocabulary.coco()) == [None]
    with pytest.raises(FileNotFoundError, match="instances_train2014.json"):
        load_examples(root, "train", need_objects=True)
    with pytest.raises(ValueError, match="rollout.split: train"):
        load_examples(root, "pretrain")
    data = eval_data(root)
    assert data.images_dir == root / "val2014" and data.references == root / "annotations" / "captions_val2014.json"
    assert data.pope["random"] == root / "pope" / "coco_pope_random.json"
    for d in ("pope",):
        for f in (root / d).iterdir():
            f.unlink()
    assert eval_data(root).pope["adversarial"] == shipped_pope("adversarial")


def test_the_official_pope_files_ship_with_their_licence():
    for strategy in ("random", "popular", "adversarial"):
        rows = io.read_jsonl(shipped_pope(strategy))
        assert len(rows) == 3000 and {r["label"] for r in rows} == {"yes", "no"}
        assert len({r["image"] for r in rows}) == 500 and rows[0]["image"].startswith("COCO_val2014_")
    assert "MIT License" in (shipped_pope("random").parent / "LICENSE").read_text()


def test_real_model_configs_load_and_sections_go_together(tmp_path):
    for size in ("7b", "13b"):
        cfg = load_config(ROOT / "configs" / f"llava-1.5-{size}.yaml")
        assert cfg.model.policy == f"llava-hf/llava-1.5-{size}-hf" and cfg.model.dtype == "bfloat16"
        assert cfg.model.verifier == "openai/clip-vit-large-patch14-336" and not cfg.model.trust_remote_code
        assert cfg.eval.limit == 500 and cfg.eval.max_new_tokens == 512 and cfg.data.kind == "coco"
    next_cfg = load_config(ROOT / "configs" / "llava-v1.6-vicuna-7b.yaml")
    assert next_cfg.model.policy == "llava-hf/llava-v1.6-vicuna-7b-hf"
    assert next_cfg.model.verifier == "openai/clip-vit-large-patch14-336"
    blip = load_config(ROOT / "configs" / "instructblip-vicuna-7b.yaml")
    assert blip.model.policy == "Salesforce/instructblip-vicuna-7b" and blip.model.verifier == "models/eva01-g-14"
    for cfg in (next_cfg, blip):
        assert cfg.model.dtype == "bfloat16" and cfg.data.kind == "coco" and cfg.eval.limit == 500
        assert cfg.eval.max_new_tokens == 512 and cfg.rollout.split == "train"
        assert cfg.ppo.minibatch_size * cfg.ppo.grad_accum == 64  # the 1.5 config's optimizer step
    with pytest.raises(ValueError, match="model and data go together"):
        load_config(None, {"model": {"policy": "x", "verifier": "y"}})
    with pytest.raises(ValueError, match="on COCO rollouts use train"):
        load_config(None, {"model": {"policy": "x", "verifier": "y"}, "data": {"root": "d"}})


def test_llava_7b_estimate_and_refusal():
    cfg = load_config(ROOT / "configs" / "llava-1.5-7b.yaml")
    est = estimate(known_config(cfg.model.policy), cfg.lora, cfg.ppo, cfg.rollout,
                   verifier_params=VERIFIER_PARAMS[cfg.model.verifier])
    assert est.params["total"] == 7_063_427_072  # llava-hf/llava-1.5-7b-hf's parameter count
    assert est.params["vision"] == 303_507_456
    assert est.lora_params == 32 * 4 * cfg.lora.r * (4096 + 4096)  # q, k, v, o of 32 layers
    assert est.weights == 2 * est.params["total"] and est.rollout_tokens == 512 * 4 * 512
    assert 14 * GIB < est.peak < 40 * GIB
    check_fits(est, 80 * GIB, "an 80 GiB GPU")  # fits
    with pytest.raises(ValueError, match=r"needs about .* GiB at its calibration stage but a 16 GiB GPU is 16.0 GiB"):
        check_fits(est, 16 * GIB, "a 16 GiB GPU")
    text = report(est, "a 16 GiB GPU", 16 * GIB)
    assert "parameters: 7.06 B" in text and "LoRA 67.1 M" in text
    no_ckpt = estimate(known_config(cfg.model.policy), cfg.lora, cfg.ppo, cfg.rollout, gradient_checkpointing=False)
    assert no_ckpt.update_activations > est.update_activations


def test_the_coco_world_fixture_speaks_coco(tmp_path):
    """tests/cocoworld.py: every renamed caption names exactly its image's objects in COCO-80 (so
    CHAIR's and calibration's labels are the world's truth), and the loaders read it as COCO."""
    from fisao.benchmarks.mentions import parse_mentions
    from fisao.world.build import build_world
    from tests.cocoworld import WORLD, _as_coco

    examples = _as_coco(build_world(tmp_path / "world", WORLD, progress=False), tmp_path / "coco")
    coco = Vocabulary.coco()
    for split in examples.values():
        for e in split:
            assert all({m.category for m in parse_mentions(c, coco)} == set(e.objects) for c in e.captions), e
    val = load_examples(tmp_path / "coco", "val", need_objects=True)
    assert [e.image_id for e in val] == sorted(e.image_id for s in ("val", "test") for e in examples[s])
    assert {o for e in val for o in e.objects} == {"clock", "book", "cake", "banana"}
    assert len(io.read_jsonl(eval_data(tmp_path / "coco").pope["adversarial"])) > 0


@pytest.mark.parametrize("name,family,total,verifier", [
    ("llava-v1.6-vicuna-7b", "llava_next", 7_063_431_168, "openai/clip-vit-large-patch14-336, known size"),
    ("instructblip-vicuna-7b", "instructblip", 7_913_210_624,
     "EVA01-g-14, the verifier of Salesforce/instructblip-vicuna-7b (models/eva01-g-14 does not exist yet)"),
])
def test_next_and_instructblip_estimates_from_known_configs(name, family, total, verifier, capsys, monkeypatch):
    """Their configurations are built from known values (fisao/models/known.py), nothing downloaded:
    LLaVA-NeXT is LLaVA-1.5-7B plus the image-newline vector; InstructBLIP is EVA ViT-g (39 layers),
    the Q-Former and Vicuna-7B with its 32001-token vocabulary."""
    import os

    from fisao.memory import campaign_estimate
    from fisao.models.families import family_of
    from cli.main import main

    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    assert family_of(known_config(cfg.model.policy)).name == family
    est = campaign_estimate(cfg)
    assert est.params["total"] == total and est.verifier == verifier
    assert est.lora_params == 32 * 4 * cfg.lora.r * (4096 + 4096)  # q, k, v, o of Vicuna's 32 layers
    if family == "instructblip":
        assert est.params["vision"] == 985_952_256 and est.prompt_tokens == 32 + 48  # query tokens + text
        assert est.verifier_weights == 2 * VERIFIER_PARAMS["EVA01-g-14"]
    else:
        assert est.prompt_tokens > 5 * 576  # any-res: four tiles and the base image
    assert 14 * GIB < est.peak < 40 * GIB
    monkeypatch.setattr(os, "environ", dict(os.environ))
    assert main(["estimate", "--config", str(ROOT / "configs" / f"{name}.yaml"), "--memory-gib", "80"]) == 0
    assert f"parameters: {total / 1e9:.2f} B" in capsys.readouterr().out
    assert main(["estimate", "--config", str(ROOT / "configs" / f"{name}.yaml"), "--memory-gib", "12"]) == 2
    assert "fisao: error: this campaign needs about" in capsys.readouterr().err


def test_a_verifier_directory_is_counted_tensor_by_tensor(real_models):
    from transformers import CLIPModel

    from fisao.models.eva_clip import load_eva_clip
    from fisao.models.known import verifier_parameters

    clip = real_models["models"]["llava"]["verifier"]
    n, source = verifier_parameters(str(clip), "llava-hf/llava-1.5-7b-hf")
    assert n == sum(p.numel() for p in CLIPModel.from_pretrained(clip).parameters()) and source == f"counted in {clip}"
    eva = real_models["models"]["instructblip"]["verifier"]
    model, _ = load_eva_clip(eva)
    assert verifier_parameters(str(eva), "Salesforce/instructblip-vicuna-7b")[0] == sum(p.numel() for p in model.parameters())
    assert verifier_parameters("nowhere", "my/own-model") == (
        0, "unknown: nowhere is neither a directory nor a known verifier, so it is not counted")
