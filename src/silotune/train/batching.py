"""Tokenise examples into right-padded batches whose labels cover only the answer tokens."""

from __future__ import annotations

import random

import torch

KEEP_PROMPT_TAIL = 8  # when a prompt is cut, its last tokens (the question cue) are kept


def cut_prompt(items: list, budget: int) -> list:
    """A prompt's tokens (or anything aligned with them) cut to ``budget``, keeping its tail."""
    if len(items) > budget:
        items = items[: budget - KEEP_PROMPT_TAIL] + items[-KEEP_PROMPT_TAIL:]
    return items


def encode_target(tok, target: str, max_length: int, add_eos: bool = False) -> list[int]:
    ids = tok(target, add_special_tokens=False).input_ids
    if add_eos and tok.eos_token_id is not None:
        ids = ids + [tok.eos_token_id]
    return ids[: max_length // 2]


def encode_prompt(tok, prompt: str, budget: int) -> list[int]:
    return cut_prompt(tok(prompt, add_special_tokens=False).input_ids, budget)


def encode_example(tok, example, max_length: int, add_eos: bool = False) -> tuple[list[int], list[int]]:
    """(input ids, labels) with labels -100 on the prompt."""
    target = encode_target(tok, example.target, max_length, add_eos)
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


def drop_last_token(batch: dict[str, torch.Tensor], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """The inputs without each sequence's last token, which predicts nothing in training.

    By causality no earlier position depends on it, so the loss and every gradient are
    unchanged; what changes is that it is never computed or sent. For a classification
    example that token is the label word: the label stays out of the activations.
    Labels keep their full width (``train.loss.lm_loss`` aligns them); the freed slot of a
    shorter sequence becomes padding (``pad_id``, masked, never read)."""
    lengths = batch["lengths"]
    if int(lengths.min()) < 2:
        return batch
    ids = batch["input_ids"].clone()
    ids[torch.arange(len(lengths)), lengths - 1] = pad_id
    return {**batch, "input_ids": ids[:, : int(lengths.max()) - 1], "lengths": lengths - 1}


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
        self.last_indices: list[int] = []  # which rows made the latest batch

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        picked = []
        while len(picked) < self.batch_size:
            if not self.order:
                self.order = list(range(len(self.rows)))
                self.rng.shuffle(self.order)
            picked.append(self.order.pop())
        self.last_indices = picked
        return collate([self.rows[i] for i in picked], self.pad_id)
