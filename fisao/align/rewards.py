"""Token rewards from verifier scores: where each mention's reward goes, and how big it is.

A mention's reward is r(m) = clamp((s − b) / w, −1, 1) ("continuous") or sign(s − b)
("binary"), with b and w from the calibration (fisao/align/calibration.py). It sits on every
answer token whose characters overlap the mention; all other tokens get 0. When one token
overlaps two mentions it takes the lower reward (a hallucination is never masked by a
neighbour). The sentence-level variant for the ablation puts one normalised score of the whole
answer on its last token.

Which characters a mention's reward covers is the `reward.span` option (`SPANS`):
- "mention": the words of the object's name ("square", "plus signs");
- "phrase": the name and the words that led to it since the previous mention, at most
  `words` of them and never across a sentence end ("and a blue square"). In "a red circle and a
  blue square" the choice to name another object is made at "and", before the name: with γ = 0
  a reward on the name alone can only swap one shape for another, while on the phrase it also
  reaches the decision to go on listing.
"""
from __future__ import annotations

import re
from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor


def continuous(s: Tensor, b: Tensor | float, w: Tensor | float) -> Tensor:
    """clamp((s − b) / w, −1, 1), elementwise; w > 0."""
    return ((s - b) / w).clamp(-1.0, 1.0)


def binary(s: Tensor, b: Tensor | float, w: Tensor | float) -> Tensor:
    """sign(s − b), elementwise (0 exactly at the baseline)."""
    return torch.sign(s - b)


REWARD_SHAPES: dict[str, Callable[[Tensor, Tensor | float, Tensor | float], Tensor]] = {
    "continuous": continuous, "binary": binary,
}


_WORD = re.compile(r"[^\W_]+(?:['-][^\W_]+)*")
_SENTENCE_END = re.compile(r"[.!?]")


def mention_spans(text: str, spans: Sequence[tuple[int, int]], words: int = 0) -> list[tuple[int, int]]:
    """The mentions' own character spans (end exclusive), unchanged; `text` and `words` unused."""
    return [tuple(s) for s in spans]


def phrase_spans(text: str, spans: Sequence[tuple[int, int]], words: int = 3) -> list[tuple[int, int]]:
    """Each mention's span stretched back over the words that led to it (see the module docstring).

    spans: the mentions' (start, end) in text order. A phrase starts at the latest of: the end of
    the previous mention, the character after the last sentence end (. ! ?) before the mention,
    and the start of the `words`-th word before it; then skips white space. Punctuation between
    (the comma of a list) belongs to the phrase.
    """
    out, previous_end = [], 0
    for start, end in spans:
        cut = previous_end
        ends = [m.end() for m in _SENTENCE_END.finditer(text, previous_end, start)]
        if ends:
            cut = ends[-1]
        before = [m.start() for m in _WORD.finditer(text, cut, start)]
        if words < len(before):
            cut = before[len(before) - words] if words else start
        while cut < start and text[cut].isspace():
            cut += 1
        out.append((cut, end))
        previous_end = end
    return out


SPANS: dict[str, Callable[[str, Sequence[tuple[int, int]], int], list[tuple[int, int]]]] = {
    "mention": mention_spans, "phrase": phrase_spans,
}


def every_mention(categories: Sequence[str], rewards: Sequence[float]) -> list[float]:
    """Each mention keeps its reward, repeats included."""
    return list(rewards)


def first_mention(categories: Sequence[str], rewards: Sequence[float]) -> list[float]:
    """A category's first mention keeps its reward; a repeat keeps only a penalty: min(r, 0).

    Rewarding every repeat pays the policy to name the objects it is sure of again and again
    instead of the others (seen on the world: mentions per caption stayed at 3.6 while distinct
    objects fell from 2.4 to 1.7 and recall lost 13 points); a hallucination named twice is
    still two hallucinations, as CHAIR counts it.
    """
    if len(categories) != len(rewards):
        raise ValueError(f"{len(categories)} categories but {len(rewards)} rewards")
    seen: set[str] = set()
    out = []
    for category, r in zip(categories, rewards):
        out.append(min(r, 0.0) if category in seen else r)
        seen.add(category)
    return out


REPEATS: dict[str, Callable[[Sequence[str], Sequence[float]], list[float]]] = {
    "each": every_mention, "first": first_mention,
}


def decision_spans(text: str) -> list[tuple[int, int]]:
    """[(start, end)] of the answer's first word (its yes or no), or [] for an answer without words."""
    first = _WORD.search(text)
    return [(first.start(), first.end())] if first else []


def claim_reward(says_yes: bool, object_reward: float) -> float:
    """The reward of a yes/no answer about an object whose verifier reward is `object_reward`."""
    return object_reward if says_yes else -object_reward


def no_question_baseline(object_rewards: Tensor) -> Tensor:
    """(Q,) -> (Q,): each question's object reward as the verifier gives it (the paper has no questions)."""
    return object_rewards


def mean_question_baseline(object_rewards: Tensor) -> Tensor:
    """(Q,) -> (Q,): object rewards minus their mean over the round's questions.

    Questions ask about random objects, most of them absent, so the mean object reward is negative
    and a constant "no" earns E[-r] > 0: the policy can gain by shifting its yes/no bias alone.
    With a fallible verifier that shift wins (measured: POPE yes-ratio 0.000 after one round,
    world 0 with clip.steps 500). Centred, a constant answer earns 0 on average and only answers
    that follow the verifier earn reward: the balanced-accuracy form of the same claim reward.
    """
    return object_rewards - object_rewards.mean() if object_rewards.numel() else object_rewards


QUESTION_BASELINES = {"none": no_question_baseline, "mean": mean_question_baseline}


def token_offsets(tokenizer, token_ids: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
    """The decoded text of `token_ids` and each token's (start, end) character span in it.

    Decodes prefix by prefix (special tokens skipped), so spans follow the generated ids exactly;
    a token that completes a multi-byte character owns it, and a special token (or an incomplete
    byte) gets an empty span.
    """
    offsets, previous = [], ""
    for i in range(len(token_ids)):
        text = tokenizer.decode(list(token_ids[: i + 1]), skip_special_tokens=True)
        if not text.startswith(previous) or text.endswith("\ufffd"):  # an incomplete UTF-8 sequence
            offsets.append((len(previous), len(previous)))
            continue
        offsets.append((len(previous), len(text)))
        previous = text
    return previous, offsets


def place_rewards(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]], rewards: Sequence[float],
                  length: int | None = None) -> Tensor:
    """(T,) token rewards: each mention's reward on the tokens overlapping its span, else 0.

    offsets: (T,) character spans of the tokens; spans, rewards: one per mention. `length` pads
    with zeros to T' >= T (rollouts are right-padded). Overlap means start_tok < end_m and
    end_tok > start_m; a token overlapping several mentions takes the lowest reward.
    """
    if len(spans) != len(rewards):
        raise ValueError(f"{len(spans)} mention spans but {len(rewards)} rewards")
    out = torch.zeros(length if length is not None else len(offsets))
    if len(out) < len(offsets):
        raise ValueError(f"length {length} is shorter than the {len(offsets)} tokens")
    taken = torch.zeros(len(out), dtype=torch.bool)
    for (m_start, m_end), r in zip(spans, rewards):
        for t, (start, end) in enumerate(offsets):
            if start < m_end and end > m_start:
                out[t] = min(out[t].item(), r) if taken[t] else r
                taken[t] = True
    return out


def last_token_reward(mask: Tensor, reward: Tensor) -> Tensor:
    """(N, T) rewards with `reward` (N,) on each row's last valid token (mask (N, T) bool, right-padded)."""
    out = torch.zeros(mask.shape, dtype=torch.float32)
    has = mask.any(-1)
    last = mask.long().cumsum(-1).argmax(-1)  # index of the last True
    rows = torch.arange(len(mask))[has]
    out[rows, last[has]] = reward[has].float()
    return out


def name_token_ids(tokenizer, categories: Sequence[str], prefix: str) -> list[int]:
    """(K,) the first token id of `prefix + name` for each of the K category names, as the tokenizer
    encodes it after a word boundary (`prefix` is the white space the slot's token carries, "" or " ").

    −1 where that first token is not the name's own (it encodes `prefix` alone) or where two
    categories share it: such a name cannot be told apart at its first token.
    """
    firsts = []
    for name in categories:
        ids = tokenizer.encode(prefix + name, add_special_tokens=False)
        own = bool(ids) and tokenizer.decode(ids[:1]).strip() != ""
        firsts.append(ids[0] if own else -1)
    shared = {t for t in firsts if t >= 0 and firsts.count(t) > 1}
    return [-1 if t in shared else t for t in firsts]


def name_slots(text: str, offsets: Sequence[tuple[int, int]], ids: Sequence[int], spans: Sequence[tuple[int, int]],
               mention_categories: Sequence[str], categories: Sequence[str], category_rewards: Sequence[float],
               tokens_for: Callable[[str], list[int]]) -> list[tuple[int, list[int], list[float]]]:
    """One description's name slots: [(token position, (K,) candidate token ids, (K,) their rewards)].

    A slot is the first token of a category's first mention (a repeat is no choice of object). Its
    candidates are the first tokens of the K category names (`tokens_for(prefix)`, prefix the white
    space between the token's start and the name: `name_token_ids`); each earns its category's
    reward on this image (`category_rewards` (K,), vocabulary order `categories`). A category the
    description has named before the slot is no candidate (token −1, reward 0): with it at
    min(r, 0), as `first_mention` pays repeats, a present object named again beat every absent one,
    and on val the policy learnt to list one object three times ("a yellow moon, a yellow moon and a
    yellow moon", recall −11 points). A slot where no candidate earns a positive reward is left out:
    there the better move was to name nothing more, which a choice between names cannot say (on val,
    distilling towards the least bad name there raised CHAIR_i to 0.544 in one round). A mention
    whose first token is not its category's candidate (a synonym, a plural with its own token, a
    name glued onto the word before it) gives no slot.

    offsets (T,): the tokens' character spans in `text`; ids (T,): the tokens; spans, mention_categories
    (M,): the mentions in text order.
    """
    index = {c: k for k, c in enumerate(categories)}
    out, seen = [], set()
    for (start, end), category in zip(spans, mention_categories):
        if category in seen:
            continue
        earlier = set(seen)
        seen.add(category)
        t = next((t for t, (a, b) in enumerate(offsets) if a < end and b > start), None)
        if t is None or not text[offsets[t][0]:start].isspace() and offsets[t][0] != start:
            continue
        tokens = tokens_for(text[offsets[t][0]:start])
        if tokens[index[category]] != ids[t]:
            continue
        tokens = [-1 if c in earlier else tok for c, tok in zip(categories, tokens)]
        rewards = [0.0 if tok < 0 else float(r) for tok, r in zip(tokens, category_rewards)]
        if max(r for tok, r in zip(tokens, rewards) if tok >= 0) > 0:
            out.append((t, tokens, rewards))
    return out


class NameSlots(NamedTuple):
    """A round's name slots (`name_slots`), S of them over the rollouts, K candidate names each:
    index (S, 2) long, (rollout row, token position); tokens (S, K) long, the candidates' first
    tokens (−1: none); rewards (S, K) float32."""

    index: Tensor
    tokens: Tensor
    rewards: Tensor

    @classmethod
    def build(cls, rows: Sequence[tuple[int, int, Sequence[int], Sequence[float]]], k: int) -> "NameSlots":
        """From (row, position, tokens (K,), rewards (K,)) tuples; none gives S = 0."""
        return cls(torch.tensor([[r, t] for r, t, _, _ in rows], dtype=torch.long).reshape(-1, 2),
                   torch.tensor([list(tok) for _, _, tok, _ in rows], dtype=torch.long).reshape(-1, k),
                   torch.tensor([list(rw) for _, _, _, rw in rows], dtype=torch.float32).reshape(-1, k))

    def of_rows(self, rows: Tensor) -> "NameSlots":
        """The slots of `rows` (R,), their index re-counted as positions in `rows`: index[:, 0] in 0..R−1."""
        local = {int(r): i for i, r in enumerate(rows.tolist())}
        keep = [s for s, r in enumerate(self.index[:, 0].tolist()) if r in local]
        index = self.index[keep].clone()
        index[:, 0] = torch.tensor([local[int(r)] for r in index[:, 0].tolist()], dtype=torch.long)
        return NameSlots(index, self.tokens[keep], self.rewards[keep])
