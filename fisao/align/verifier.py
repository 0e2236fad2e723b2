"""The verifier: the policy's own vision encoder with its paired CLIP text encoder.

s(m) = cos(image embedding, text embedding of "a photo of a {category}.") scores an object
mention; the category is the canonical one the shared mention parser gives ("disk" is scored as
"circle"), so a synonym never scores differently from its category. The text embeddings of the
whole vocabulary are computed once, when the verifier is built; an image costs one vision
forward. `check_vision_tower` makes sure the policy's vision tower *is* the verifier's vision
model: FiSAO's premise is that the model is judged by its own eyes.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPModel, CLIPProcessor

from fisao.benchmarks.vocab import Vocabulary
from fisao.models.clip import PROMPT_TEMPLATE
from fisao.models.eva_clip import is_eva_clip_dir, load_eva_clip
from fisao.models.families import family_of, vision_tower


class Verifier:
    """Scores of images against object categories and against whole answers.

    `model` is a transformers CLIPModel or anything with its `get_image_features`,
    `get_text_features`, `vision_model` and `config.text_config` (the EVA-CLIP of
    fisao/models/eva_clip.py); `processor` has `.tokenizer` and `.image_processor`.
    """

    def __init__(self, model: CLIPModel, processor: CLIPProcessor, vocab: Vocabulary,
                 template: str = PROMPT_TEMPLATE, source: str = "<memory>"):
        if "{}" not in template:
            raise ValueError(f"reward.template must hold '{{}}' where the object name goes, got {template!r}")
        self.model, self.processor, self.vocab, self.template, self.source = model.eval(), processor, vocab, template, source
        self.device = next(model.parameters()).device
        self.index = {c: i for i, c in enumerate(vocab.categories)}
        self.text_embeddings = self.embed_texts([template.format(c) for c in vocab.categories])  # (C, D)

    @classmethod
    def from_pretrained(cls, clip_dir: str | Path, vocab: Vocabulary, template: str = PROMPT_TEMPLATE,
                        device: str = "cpu", trust_remote_code: bool = False) -> "Verifier":
        """A transformers CLIP directory or hub id, or an EVA-CLIP directory (InstructBLIP's verifier,
        see fisao/models/eva_clip.py)."""
        if is_eva_clip_dir(clip_dir):
            model, processor = load_eva_clip(clip_dir, device)
            return cls(model, processor, vocab, template, source=str(clip_dir))
        model = CLIPModel.from_pretrained(str(clip_dir), trust_remote_code=trust_remote_code).to(device)
        processor = CLIPProcessor.from_pretrained(str(clip_dir), trust_remote_code=trust_remote_code)
        return cls(model, processor, vocab, template, source=str(clip_dir))

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """(N, D) unit-norm text embeddings; texts longer than the text tower takes are cut."""
        tok = self.processor.tokenizer
        out = []
        for i in range(0, len(texts), batch_size):
            enc = tok(list(texts[i : i + batch_size]), padding=True, truncation=True,
                      max_length=self.model.config.text_config.max_position_embeddings, return_tensors="pt")
            out.append(F.normalize(self.model.get_text_features(**enc.to(self.device)).pooler_output, dim=-1))
        return torch.cat(out).cpu() if out else torch.zeros(0, self.text_embeddings.shape[1])

    @torch.no_grad()
    def image_embeddings(self, images: Sequence[Image.Image], batch_size: int = 64) -> torch.Tensor:
        """(N, D) unit-norm image embeddings, one vision forward per image."""
        out = []
        for i in range(0, len(images), batch_size):
            pixels = self.processor.image_processor(images=list(images[i : i + batch_size]), return_tensors="pt")["pixel_values"]
            out.append(F.normalize(self.model.get_image_features(pixel_values=pixels.to(self.device)).pooler_output, dim=-1))
        return torch.cat(out).cpu()

    def category_scores(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        """(N, C) cosine of each image with each category's prompt (vocabulary order)."""
        return image_embeddings @ self.text_embeddings.T

    def score(self, image_embedding: torch.Tensor, categories: Sequence[str]) -> torch.Tensor:
        """(M,) cosine of one image (D,) with the prompts of `categories` (canonical names)."""
        unknown = [c for c in categories if c not in self.index]
        if unknown:
            raise ValueError(f"categories {unknown} are not in the verifier's vocabulary {self.vocab.source}")
        idx = torch.tensor([self.index[c] for c in categories], dtype=torch.long)
        return self.text_embeddings[idx] @ image_embedding

    def text_scores(self, image_embeddings: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """(N,) cosine of image i (N, D) with whole text i: the sentence-level score."""
        if len(texts) != len(image_embeddings):
            raise ValueError(f"{len(texts)} texts for {len(image_embeddings)} images")
        return (self.embed_texts(texts) * image_embeddings).sum(-1)


def check_vision_tower(policy, verifier: Verifier, require_equal: bool, names: tuple[str, str] = ("policy", "verifier")) -> bool:
    """True when every tensor of the policy's vision tower equals the verifier's vision model's.

    Per family (fisao/models/families.py): tensors that are the policy's own are left out (BLIP-2's
    `post_layernorm`), and InstructBLIP's tower may be the verifier's EVA-CLIP minus its last
    layer, as BLIP-2 drops it. On a mismatch: a warning naming both checkpoints and the first
    differing tensor, or a ValueError when `require_equal` (config `reward.require_same_vision`).
    """
    family = family_of(policy)

    def keep(key: str) -> bool:
        return not key.startswith(family.own_vision_tensors) if family.own_vision_tensors else True

    mine = {k: v for k, v in vision_tower(policy).state_dict().items() if keep(k)}
    theirs = {k: v for k, v in verifier.model.vision_model.state_dict().items() if keep(k)}
    problem = None
    extra = theirs.keys() - mine.keys()
    if mine.keys() - theirs.keys() or (extra and not family.vision_is_prefix):
        problem = f"different tensors: {sorted(mine.keys() ^ theirs.keys())[:3]}"
    else:
        for key in mine:
            if mine[key].shape != theirs[key].shape or not torch.equal(mine[key].cpu(), theirs[key].cpu()):
                problem = f"first differing tensor: {key}"
                break
    if problem is None:
        return True
    message = (f"the vision tower of {names[0]} is not the vision model of the verifier {names[1]} ({problem}); "
               "the verifier should be the policy's own CLIP")
    if require_equal:
        raise ValueError(message + "; set reward.require_same_vision: false to allow it")
    warnings.warn(message, stacklevel=2)
    return False
