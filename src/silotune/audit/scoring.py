"""How much of the private text an attack got back: token accuracy and ROUGE-L F1.

The server sees whole sequences, but part of every sequence is the task's public
template (``Review: ... Sentiment:``). Leakage is scored on the *private* positions
only: tokens that come from the record's fields (the review, the document) and the
target (the label word, the summary). ``private_mask`` finds them from the tokenizer's
character offsets, aligned exactly with ``train.batching.encode_example``.

Token accuracy is the share of private positions where the guess is the true token;
ROUGE-L F1 (``rouge-score``) compares the decoded private tokens with the decoded
guesses at the same positions, per sequence, averaged. The frequency baselines
(guess the most frequent token everywhere; sample tokens from the unigram distribution
of public text) say what an attack gets for free.
"""

from __future__ import annotations

import string
from collections import Counter
from dataclasses import dataclass

import torch
from rouge_score import rouge_scorer

from ..train.batching import cut_prompt, encode_target

_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def field_spans(template: str, prompt: str) -> list[tuple[int, int]]:
    """Character spans of the template's fields inside a prompt formatted from it."""
    pieces = list(string.Formatter().parse(template))
    last_field = max(k for k, p in enumerate(pieces) if p[1] is not None)
    spans, pos = [], 0
    for k, (literal, name, _, _) in enumerate(pieces):
        pos += len(literal)
        if name is None:
            break
        if k == last_field:  # everything up to the closing literals
            end = len(prompt) - sum(len(p[0]) for p in pieces[k + 1:])
        else:
            following = pieces[k + 1][0]
            end = prompt.find(following, pos) if following else pos
            end = len(prompt) if end < 0 else end
        spans.append((pos, end))
        pos = end
    return spans


def private_mask(tok, template: str, example, max_length: int, add_eos: bool = False) -> list[bool]:
    """Per token of ``encode_example(tok, example, max_length, add_eos)``: True where it is private."""
    enc = tok(example.prompt, add_special_tokens=False, return_offsets_mapping=True)
    spans = field_spans(template, example.prompt)
    prompt_mask = [any(s < e_tok and s_tok < e for s, e in spans) for s_tok, e_tok in enc["offset_mapping"]]
    target = encode_target(tok, example.target, max_length, add_eos)
    return cut_prompt(prompt_mask, max_length - len(target)) + [True] * len(target)


@dataclass
class Truth:
    """The private side of one recorded batch: its tokens and which positions are private."""

    ids: torch.Tensor  # (B, T) the whole training sequences (their last token is never sent)
    lengths: torch.Tensor  # (B,)
    private: torch.Tensor  # (B, T) bool, False on padding
    labels: list[int | None]  # class index per sequence (classification)
    targets: list[list[int]]  # target token ids per sequence


def leakage(tok, truth: Truth, guess: torch.Tensor) -> dict:
    """Token accuracy and mean ROUGE-L F1 of ``guess`` (B, T') on the private positions.

    Private positions the guess does not cover or marks -1 count as misses."""
    width = truth.ids.shape[1]
    if guess.shape[1] < width:
        guess = torch.cat([guess, torch.full((guess.shape[0], width - guess.shape[1]), -1, dtype=guess.dtype)], 1)
    hits = total = 0
    rouge = []
    for i in range(truth.ids.shape[0]):
        where = truth.private[i].nonzero().flatten()
        if not len(where):
            continue
        true_ids, guess_ids = truth.ids[i, where].tolist(), guess[i, where].tolist()
        hits += sum(int(a == b) for a, b in zip(true_ids, guess_ids))
        total += len(true_ids)
        rouge.append(rouge_l(tok.decode(true_ids), tok.decode([t for t in guess_ids if t >= 0])))
    return {"token_accuracy": hits / max(total, 1), "rougeL_f1": sum(rouge) / max(len(rouge), 1),
            "tokens": total, "sequences": len(rouge)}


def rouge_l(reference: str, prediction: str) -> float:
    return _SCORER.score(reference, prediction)["rougeL"].fmeasure


def merge(scores: list[dict]) -> dict:
    """Token-weighted accuracy and sequence-weighted ROUGE-L over several scored batches."""
    tokens = sum(s["tokens"] for s in scores)
    seqs = sum(s["sequences"] for s in scores)
    return {"token_accuracy": sum(s["token_accuracy"] * s["tokens"] for s in scores) / max(tokens, 1),
            "rougeL_f1": sum(s["rougeL_f1"] * s["sequences"] for s in scores) / max(seqs, 1),
            "tokens": tokens, "sequences": seqs}


class FrequencyBaseline:
    """Guesses that use no observation at all, only token frequencies of public text."""

    def __init__(self, public_ids: list[list[int]], seed: int = 0):
        counts = Counter(t for ids in public_ids for t in ids)
        self.most_frequent = counts.most_common(1)[0][0]
        tokens, freq = zip(*counts.items())
        self.tokens = torch.tensor(tokens)
        self.probs = torch.tensor(freq, dtype=torch.float64) / sum(freq)
        self.generator = torch.Generator().manual_seed(seed)

    def constant(self, shape) -> torch.Tensor:
        return torch.full(shape, self.most_frequent, dtype=torch.long)

    def unigram(self, shape) -> torch.Tensor:
        idx = torch.multinomial(self.probs, int(torch.Size(shape).numel()), replacement=True,
                                generator=self.generator)
        return self.tokens[idx].reshape(shape)
