"""A byte-level BPE tokenizer trained on the world's text.

Byte-level BPE (as GPT-2's) covers every string, decodes exactly and gives character offsets,
which the verifier needs to put rewards on a mention's tokens. Two flavours share one vocabulary:
the LLaVA tokenizer prepends <s> (as Llama's does), the CLIP tokenizer wraps text in <s> ... </s>
and the CLIP text tower pools at </s>.
"""
from __future__ import annotations

from typing import Iterable, Literal

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

# </s> must not get id 2: transformers' CLIP text tower treats eos_token_id == 2 as the
# original CLIP vocabulary and pools at the highest token id instead of at </s>.
SPECIAL_TOKENS = ("<pad>", "<s>", "<image>", "</s>")
PAD, BOS, IMAGE, EOS = SPECIAL_TOKENS


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE on `texts`, repeats included: merges follow word frequencies.

    The special tokens take the first ids. Training is deterministic for the same texts in the
    same order.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer)
    return tok


def wrap(tok: Tokenizer, flavour: Literal["llava", "clip"]) -> PreTrainedTokenizerFast:
    """A transformers tokenizer over `tok`, with the post-processing of `flavour`."""
    tok = Tokenizer.from_str(tok.to_str())  # a copy: post-processors differ per flavour
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    single = f"{BOS} $A" if flavour == "llava" else f"{BOS} $A {EOS}"
    tok.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[(BOS, bos), (EOS, eos)]
    )
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE} if flavour == "llava" else {},
        model_max_length=512 if flavour == "llava" else 77,
    )
    return out
