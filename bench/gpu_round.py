"""One FiSAO round at LLaVA-1.5-7B's shapes on one GPU, from nothing: seconds, throughput and peak memory per stage.

    python bench/gpu_round.py                                # LLaVA-1.5-7B + CLIP ViT-L/14-336 in bf16 on cuda
    python bench/gpu_round.py --shape tiny --device cpu      # the same code on tiny models (tests/test_gpu_round.py)

Nothing is downloaded, and nothing is read but the campaign config (configs/llava-1.5-7b.yaml):
- the policy is transformers' `LlavaForConditionalGeneration` with LLaVA-1.5-7B's configuration
  (fisao/models/known.py), the verifier a `CLIPModel` with CLIP ViT-L/14-336's; each is built on
  the meta device and then materialised on the target device in the config's dtype (bf16): every
  tensor is allocated and initialised there, with no host copy. The verifier's vision model gets
  the policy's vision tower, as the real pair shares it (checked with `check_vision_tower`);
- the weights are random, and the policy's LM head is steered (`steer_to_objects`) so that its
  answers are runs of COCO object names and a few glue words: mentions to reward, answers that
  run to the last new token (no EOS), and so the longest rollouts the settings allow;
- a byte-level BPE tokenizer over the prompts and COCO names (fisao/models/tokenizer.py), the
  llava-hf processor classes around it, and random images.

The round is the campaign's own code, in memory (no checkpoint written): `sample_rollouts`; the
`Verifier`, `calibrate`, `description_rewards` and `caption_token_rewards` (the scoring stage's); `add_lora`,
gradient checkpointing (`prepare_for_training`) and `ppo_update`; then the adapters merged and a
CHAIR pass (`answer`, `chair`) on `--eval-images` other images. The config's batch sizes, LoRA,
PPO and evaluation settings apply; only the images, answers per image and new tokens are the
bench's. Calibration: random mentions (one random COCO category per image) scored by the
verifier and labelled hallucinated below their median score: a random verifier has nothing else
to label by, and this keeps b and w inside the scores, so rewards fall on both sides of 0.

The last line printed is one JSON object: each stage's wall seconds and peak GPU memory
(`torch.cuda.max_memory_allocated`, reset between stages; null on CPU) beside `fisao estimate`'s
figure for that stage (fisao/memory.py, for the bench's settings), rollout tokens/s, update
answers/s and tokens/s, the device's name, and what each stage did (tokens sampled, rewarded
mention tokens, LoRA tensors changed). Speed is reported, never asserted. It imports the library,
torch, transformers, peft and accelerate and nothing of Prefect, MLflow or DVC: bench/gpu/README.md
says what a GPU machine needs.
"""
from __future__ import annotations

import time

STARTED = time.perf_counter()  # imports count: the whole run must fit the GPU machine's spell

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fisao.localstate import OFFLINE  # noqa: E402

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import (  # noqa: E402
    CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor, LlamaConfig, LlavaConfig,
    LlavaForConditionalGeneration, LlavaProcessor,
)

from fisao.align.calibration import calibrate  # noqa: E402
from fisao.align.lora import add_lora  # noqa: E402
from fisao.align.rewards import token_offsets  # noqa: E402
from fisao.align.rollout import sample_rollouts  # noqa: E402
from fisao.align.score import caption_token_rewards, description_rewards  # noqa: E402
from fisao.align.update import make_accelerator, ppo_update  # noqa: E402
from fisao.align.verifier import Verifier, check_vision_tower  # noqa: E402
from fisao.benchmarks.chair import chair  # noqa: E402
from fisao.benchmarks.vocab import Vocabulary  # noqa: E402
from fisao.config import load_config  # noqa: E402
from fisao.generate import answer  # noqa: E402
from fisao.memory import estimate  # noqa: E402
from fisao.models.known import known_config  # noqa: E402
from fisao.models.llava import CHAT_TEMPLATE  # noqa: E402
from fisao.models.families import count_parameters, vision_tower  # noqa: E402
from fisao.models.tokenizer import IMAGE, train_bpe, wrap  # noqa: E402
from fisao.runtime import DTYPES, prepare_for_training  # noqa: E402

GIB = 1024 ** 3
POLICY = "llava-hf/llava-1.5-7b-hf"
VERIFIER = "openai/clip-vit-large-patch14-336"
# CLIP ViT-L/14-336's text tower (its config.json), beside the vision tower known.py holds.
CLIP_L_TEXT = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
               "max_position_embeddings": 77, "vocab_size": 49408, "projection_dim": 768}
# What the steered policy says: COCO names (single BPE tokens, see `tokenizers`) and glue words.
OBJECT_WORDS = ("dog", "cat", "car", "chair", "person", "bottle", "zebra", "pizza", "horse", "train", "cup", "bench")
GLUE_WORDS = ("a", "and", "the", "with", "on", "near")


def tokenizers(vocab: Vocabulary):
    """(policy tokenizer, verifier tokenizer): one byte-level BPE over prompts and COCO names."""
    names = [n for c in vocab.categories for n in vocab.names_of(c)]
    corpus = ["USER:", "ASSISTANT:", "Describe this image in detail.", "Please describe this image in detail.",
              "a photo of a"] * 20
    corpus += [f"There is a {n} and a {m}." for n, m in zip(names, names[1:])]
    corpus += [" ".join(f"{g} {w}" for g in GLUE_WORDS) for w in OBJECT_WORDS] * 20
    bpe = train_bpe(corpus, 1000)
    policy_tok = wrap(bpe, "llava")
    policy_tok.padding_side = "left"
    policy_tok.model_max_length = 4096  # LLaVA-1.5's context
    return policy_tok, wrap(bpe, "clip")


def model_configs(shape: str, tok, clip_tok) -> tuple[LlavaConfig, CLIPConfig]:
    """(policy config, verifier config). "7b": LLaVA-1.5-7B and CLIP ViT-L/14-336, with only the
    special-token ids changed to the local tokenizer's (no shape changes); "tiny": the same classes
    with two-layer towers of width 64 and a vocabulary of 2,048 (still twice the tokenizer's, as
    LLaVA's 32,064 exceeds its tokenizer's 32,002)."""
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    clip_ids = {"bos_token_id": clip_tok.bos_token_id, "eos_token_id": clip_tok.eos_token_id,
                "pad_token_id": clip_tok.pad_token_id}
    image_id = tok.convert_tokens_to_ids(IMAGE)
    if shape == "7b":
        policy = known_config(POLICY)
        policy.image_token_index, policy.pad_token_id = image_id, tok.pad_token_id
        for key, value in ids.items():
            setattr(policy.text_config, key, value)
        text = {**CLIP_L_TEXT, **clip_ids}
        vision = policy.vision_config.to_dict()
        return policy, CLIPConfig(vision_config=vision, text_config=text, projection_dim=vision["projection_dim"])
    vision = {"image_size": 32, "patch_size": 8, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 2, "projection_dim": 32}
    text = LlamaConfig(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False, **ids)
    policy = LlavaConfig(vision_config=vision, text_config=text.to_dict(), image_token_index=image_id,
                         vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
                         pad_token_id=tok.pad_token_id)
    clip_text = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_hidden_layers": 2,
                 "max_position_embeddings": 77, "vocab_size": len(clip_tok), "projection_dim": 32, **clip_ids}
    return policy, CLIPConfig(vision_config=vision, text_config=clip_text, projection_dim=32)


def processors(policy_config: LlavaConfig, tok, clip_tok) -> tuple[LlavaProcessor, CLIPProcessor]:
    """llava-hf's processor classes around the local tokenizers, at the vision tower's resolution."""
    side = policy_config.vision_config.image_size

    def images():
        return CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})

    policy = LlavaProcessor(image_processor=images(), tokenizer=tok, patch_size=policy_config.vision_config.patch_size,
                            vision_feature_select_strategy="default", num_additional_image_tokens=1,
                            chat_template=CHAT_TEMPLATE)
    return policy, CLIPProcessor(image_processor=images(), tokenizer=clip_tok)


def materialise(cls, config, device: str, dtype: torch.dtype, seed: int):
    """`cls(config)` built on the meta device, then allocated and initialised on `device` in `dtype`:
    transformers' own `_init_weights` (which also fills the rotary and position-id buffers), and
    CLIP's `logit_scale`, which it leaves to the checkpoint. Every float tensor is NaN until then,
    so one that nothing initialised stops the run instead of holding whatever memory held."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = cls(config)
    finally:
        torch.set_default_dtype(previous)
    model.to_empty(device=device)
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    with torch.no_grad():
        for t in tensors.values():
            if t.is_floating_point():
                t.fill_(float("nan"))
        with torch.random.fork_rng(devices=[device] if device.startswith("cuda") else []):
            torch.manual_seed(seed)
            model.init_weights()
        if isinstance(model, CLIPModel):
            model.logit_scale.fill_(config.logit_scale_init_value)
    left = [n for n, t in tensors.items() if t.is_floating_point() and bool(t.isnan().any())]
    assert not left, f"{cls.__name__}: nothing initialised {left[:5]}"
    return model.eval()


def meta_parameters(cls, config) -> int:
    """Parameters of `cls(config)`, counted on the meta device (nothing allocated)."""
    with torch.device("meta"):
        return sum(p.numel() for p in cls(config).parameters())


@torch.no_grad()
def steer_to_objects(policy, tok, sigma: float = 12.0, seed: int = 0) -> list[int]:
    """Make a random policy name objects: the LM-head rows of OBJECT_WORDS and GLUE_WORDS become
    random vectors whose logits on the final RMS-normed state (norm √H) are ~N(0, sigma²); every
    other row is 0 (EOS included), so answers are runs of those words to the last new token.
    Returns the steered token ids. (tests/realmodels.py steers its tiny models likewise, keeping EOS.)"""
    head = policy.get_output_embeddings().weight  # (V, H)
    ids = [tok.convert_tokens_to_ids("\u0120" + w) for w in OBJECT_WORDS + GLUE_WORDS]
    assert tok.unk_token_id not in ids and None not in ids and len(set(ids)) == len(ids), ids
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(len(ids), head.shape[1], generator=g) * (sigma / head.shape[1] ** 0.5)
    head.zero_()
    head[ids] = rows.to(head)
    return ids


def random_images(n: int, seed: int) -> list[Image.Image]:
    """`n` COCO-sized (640×480) images of random colour blocks."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (n, 12, 16, 3), generator=g, dtype=torch.uint8)
    return [Image.fromarray(b.numpy()).resize((640, 480), Image.NEAREST) for b in blocks]


class Stages:
    """Times each stage and keeps its peak GPU memory (reset before it) beside the estimate's."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.figures: dict[str, dict] = {}

    def run(self, name: str, estimate_bytes: int | None, estimate_of: str, fn, *args, **kwargs):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        result = fn(*args, **kwargs)
        if self.cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t
        peak = torch.cuda.max_memory_allocated() / GIB if self.cuda else None
        self.figures[name] = {"seconds": round(seconds, 2), "peak_gib": None if peak is None else round(peak, 4),
                              "estimate_gib": None if estimate_bytes is None else round(estimate_bytes / GIB, 4),
                              "estimate_of": estimate_of}
        where = "" if peak is None else f"   peak {peak:6.2f} GiB (estimate {estimate_bytes / GIB:6.2f}, {estimate_of})"
        print(f"{name:<15} {seconds:8.2f} s{where}", file=sys.stderr, flush=True)
        return result


def calibration_from_random_mentions(verifier: Verifier, images, seed: int):
    """b and w from one random COCO category per image, labelled hallucinated below the median score."""
    rng = random.Random(seed)
    emb = verifier.image_embeddings(images)
    scores = [float(verifier.score(e, [rng.choice(verifier.vocab.categories)])[0]) for e in emb]
    median = sorted(scores)[len(scores) // 2]
    return calibrate(scores, [s < median for s in scores])


def build_verifier(policy, config: CLIPConfig, processor: CLIPProcessor, vocab: Vocabulary, template: str, device: str,
                   dtype: torch.dtype, seed: int) -> Verifier:
    """The CLIP materialised on `device` with the policy's vision tower, as a `Verifier` (its
    vocabulary's text embeddings computed), checked to share the policy's eyes."""
    clip = materialise(CLIPModel, config, device, dtype, seed)
    clip.vision_model.load_state_dict(vision_tower(policy).state_dict())
    verifier = Verifier(clip, processor, vocab, template, source="bench (random CLIP)")
    check_vision_tower(policy, verifier, require_equal=True, names=("the bench policy", "the bench verifier"))
    return verifier


def score(verifier: Verifier, tok, images, rollouts, reward_cfg, seed: int) -> tuple[torch.Tensor, dict]:
    """Calibrate, then the (N, T) token rewards of the rollouts, and figures: mentions, rewarded
    tokens, one example."""
    cal = calibration_from_random_mentions(verifier, images, seed)
    emb = verifier.image_embeddings(images)
    n, width = rollouts.response_ids.shape
    token_rewards = torch.zeros(n, width)
    mentions = rewarded = rewarded_outside = 0
    example = None
    for r in range(n):
        ids = rollouts.response_ids[r][rollouts.mask[r]].tolist()
        text, offsets = token_offsets(tok, ids)
        found, _, rewards = description_rewards(text, verifier.vocab, functools.partial(
            verifier.score, emb[rollouts.image_index[r]]), cal, reward_cfg)
        token_rewards[r] = caption_token_rewards(text, offsets, found, rewards, reward_cfg, width)
        on = [t for t in range(len(offsets)) if token_rewards[r, t] != 0]
        inside = [t for t in on if any(offsets[t][0] < m.end and offsets[t][1] > m.start for m in found)]
        mentions, rewarded, rewarded_outside = mentions + len(found), rewarded + len(on), rewarded_outside + len(on) - len(inside)
        if example is None and found:
            example = {"text": text[:300], "mentions": [m.text for m in found][:10],
                       "rewarded_tokens": [[text[offsets[t][0]:offsets[t][1]], round(float(token_rewards[r, t]), 3)]
                                           for t in on][:10]}
    return token_rewards, {"mentions": mentions, "rewarded_tokens": rewarded,
                           "rewarded_tokens_outside_mentions": rewarded_outside, "example": example,
                           "calibration": {"baseline": round(cal.baseline, 5), "width": round(cal.width, 5)}}


def update(policy, processor, images, rollouts, token_rewards, cfg, runtime, device: str) -> tuple[object, dict]:
    """LoRA + gradient checkpointing + `ppo_update`; returns the adapted model and its figures."""
    torch.manual_seed(cfg.ppo.seed)
    model = add_lora(policy, cfg.lora)
    prepare_for_training(model, runtime)
    before = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    accelerator = make_accelerator(cfg.ppo, cpu=device == "cpu")
    t = time.perf_counter()
    stats = ppo_update(model, processor, images, rollouts, token_rewards, cfg.ppo, accelerator,
                       torch.Generator().manual_seed(cfg.ppo.seed))
    seconds = time.perf_counter() - t
    after = {n: p.detach().cpu() for n, p in model.named_parameters() if n in before}
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    answers = int(stats["optimizer_steps"]) * cfg.ppo.minibatch_size * cfg.ppo.grad_accum
    tokens = answers * stats["response_length"]
    return model, {
        "optimizer_steps": int(stats["optimizer_steps"]), "answers": answers, "tokens": round(tokens),
        "answers_per_second": round(answers / seconds, 2), "tokens_per_second": round(tokens / seconds, 1),
        "ppo_seconds": round(seconds, 2),  # reference log-probs + the optimizer steps, without LoRA's set-up
        "lora_tensors": len(before), "lora_tensors_changed": len(changed),
        "lora_max_change": max((float((after[n].float() - before[n].float()).abs().max()) for n in changed), default=0.0),
        **{k: round(float(stats[k]), 5) for k in ("reward_mean", "kl", "loss", "clipfrac", "grad_norm") if k in stats},
    }


def evaluate(model, processor, vocab: Vocabulary, images, eval_cfg, seed: int) -> dict:
    """Merge the adapters, caption `images` greedily as CHAIR does, and score against random truth."""
    merged = model.merge_and_unload().eval()
    t = time.perf_counter()
    captions = answer(merged, processor, images, [eval_cfg.caption_prompt] * len(images),
                      max_new_tokens=eval_cfg.max_new_tokens, batch_size=eval_cfg.batch_size, progress=False)
    seconds = time.perf_counter() - t
    rng = random.Random(seed)
    truth = {i: set(rng.sample(OBJECT_WORDS, 3)) for i in range(len(images))}
    m = chair(list(enumerate(captions)), truth, vocab).metrics
    words = round(m["len"] * m["n_captions"])  # `answer` returns texts; the steered policy says one token a word
    return {"images": len(images), "words": words, "words_per_second": round(words / seconds, 1),
            "chair_i": round(m["chair_i"], 4), "chair_s": round(m["chair_s"], 4), "mentions": m["n_mentions"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=("7b", "tiny"), default="7b")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--config", default=str(ROOT / "configs" / "llava-1.5-7b.yaml"),
                   help="batch sizes, LoRA, PPO, reward and evaluation settings")
    p.add_argument("--images", type=int, default=32, help="rollout images (x --answers answers each)")
    p.add_argument("--answers", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--eval-images", type=int, default=16)
    p.add_argument("--eval-max-new-tokens", type=int, default=None, help="default: the config's eval.max_new_tokens")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    os.environ.update(OFFLINE)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no GPU; use --device cpu (with --shape tiny)")
    overrides = {"rollout.images_per_round": args.images, "rollout.n_per_image": args.answers,
                 "rollout.max_new_tokens": args.max_new_tokens, "rollout.questions_per_image": 0}
    if args.eval_max_new_tokens is not None:
        overrides["eval.max_new_tokens"] = args.eval_max_new_tokens
    cfg = load_config(args.config, overrides)
    if cfg.model is None:
        raise SystemExit(f"{args.config} has no model section: give a real-model config (configs/llava-1.5-7b.yaml)")
    runtime = cfg.model.model_copy(update={"device": "cuda" if args.device.startswith("cuda") else "cpu"})
    dtype = DTYPES[runtime.dtype]
    torch.manual_seed(args.seed)

    vocab = Vocabulary.coco()
    tok, clip_tok = tokenizers(vocab)
    policy_cfg, verifier_cfg = model_configs(args.shape, tok, clip_tok)
    processor, clip_processor = processors(policy_cfg, tok, clip_tok)
    verifier_params = meta_parameters(CLIPModel, verifier_cfg)
    est = estimate(policy_cfg, cfg.lora, cfg.ppo, cfg.rollout, runtime.dtype, runtime.gradient_checkpointing,
                   verifier_params)
    eval_rollout = cfg.rollout.model_copy(update={"max_new_tokens": cfg.eval.max_new_tokens,
                                                  "batch_size": cfg.eval.batch_size})
    eval_est = estimate(policy_cfg, cfg.lora, cfg.ppo, eval_rollout, runtime.dtype, runtime.gradient_checkpointing)
    images = random_images(args.images, args.seed)
    eval_images = random_images(args.eval_images, args.seed + 1)
    stages = Stages(args.device)

    policy = stages.run("build_policy", est.weights, "weights", materialise, LlavaForConditionalGeneration, policy_cfg,
                        args.device, dtype, args.seed)
    steered = steer_to_objects(policy, tok, seed=args.seed)
    r = cfg.rollout
    rollouts = stages.run("rollouts", est.peaks["rollouts"], "rollouts", sample_rollouts, policy, processor, images,
                          r.prompt, r.n_per_image, temperature=r.temperature, top_p=r.top_p,
                          max_new_tokens=r.max_new_tokens, batch_size=r.batch_size, seed=r.seed, progress=False)
    verifier = stages.run("build_verifier", est.weights + est.verifier_weights, "weights + verifier", build_verifier,
                          policy, verifier_cfg, clip_processor, vocab, cfg.reward.template, args.device, dtype,
                          args.seed + 1)
    token_rewards, scored = stages.run("score", est.peaks["calibration"], "calibration", score, verifier, tok, images,
                                       rollouts, cfg.reward, args.seed)
    del verifier
    if stages.cuda:
        torch.cuda.empty_cache()
    model, updated = stages.run("update", est.peaks["update"], "update", update, policy, processor, images, rollouts,
                                token_rewards, cfg, runtime, args.device)
    evaluated = stages.run("eval", eval_est.peaks["rollouts"], "rollouts at eval settings", evaluate, model, processor,
                           vocab, eval_images, cfg.eval, args.seed)

    tokens = int(rollouts.mask.sum())
    out = {
        "device": torch.cuda.get_device_name() if stages.cuda else "cpu",
        "shape": args.shape, "dtype": runtime.dtype, "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "parameters": {"policy": count_parameters(policy)["total"], "estimate": est.params["total"],
                       "verifier": verifier_params, "lora": est.lora_params},
        "settings": {"images": args.images, "answers_per_image": args.answers, "max_new_tokens": r.max_new_tokens,
                     "rollout_batch": r.batch_size, "minibatch": cfg.ppo.minibatch_size, "grad_accum": cfg.ppo.grad_accum,
                     "lora_r": cfg.lora.r, "gradient_checkpointing": runtime.gradient_checkpointing,
                     "eval_images": args.eval_images, "eval_max_new_tokens": cfg.eval.max_new_tokens,
                     "eval_batch": cfg.eval.batch_size, "steered_tokens": len(steered)},
        "stages": stages.figures,
        "round_seconds": round(sum(stages.figures[k]["seconds"] for k in ("rollouts", "score", "update", "eval")), 2),
        "rollouts": {"answers": len(rollouts), "tokens": tokens,
                     "tokens_per_second": round(tokens / stages.figures["rollouts"]["seconds"], 1)},
        "score": scored, "update": updated, "eval": evaluated,
        "total_seconds": round(time.perf_counter() - STARTED, 2),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
