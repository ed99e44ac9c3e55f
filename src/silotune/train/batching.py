"""Tokenise examples into right-padded batches whose labels cover only the answer tokens."""

from __future__ import annotations

import random

import torch

KEEP_PROMPT_TAIL = 8  # when a prompt is cut, its last tokens (the question cue) are kept


def encode_prompt(tok, prompt: str, budget: int) -> list[int]:
    ids = tok(prompt, add_special_tokens=False).input_ids
    if len(ids) > budget:
        ids = ids[: budget - KEEP_PROMPT_TAIL] + ids[-KEEP_PROMPT_TAIL:]
    return ids


def encode_example(tok, example, max_length: int, add_eos: bool = False) -> tuple[list[int], list[int]]:
    """(input ids, labels) with labels -100 on the prompt."""
    target = tok(example.target, add_special_tokens=False).input_ids
    if add_eos and tok.eos_token_id is not None:
        target = target + [tok.eos_token_id]
    target = target[: max_length // 2]
    prompt = encode_prompt(tok, example.prompt, max_length - len(target))
    return prompt + target, [-100] * len(prompt) + target


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    lengths = torch.tensor([len(ids) for ids, _ in rows])
    width = int(lengths.max())
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
    return {"input_ids": ids, "labels": labels, "lengths": lengths}


def prompt_batch(tok, prompts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    rows = [(ids, ids) for ids in (encode_prompt(tok, p, max_length) for p in prompts)]
    return collate(rows, tok.pad_token_id)


class BatchStream:
    """Endless batches over encoded examples, reshuffled every epoch by a seeded RNG."""

    def __init__(self, rows: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int, seed: int):
        if not rows:
            raise ValueError("no training examples")
        self.rows, self.batch_size, self.pad_id = rows, batch_size, pad_id
        self.rng = random.Random(seed)
        self.order: list[int] = []

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        picked = []
        while len(picked) < self.batch_size:
            if not self.order:
                self.order = list(range(len(self.rows)))
                self.rng.shuffle(self.order)
            picked.append(self.rows[self.order.pop()])
        return collate(picked, self.pad_id)
