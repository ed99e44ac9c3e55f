"""Evaluation loops over any ``logits_fn(batch) -> (B, T, V)``: split or centralized alike.

Classification picks the verbalizer whose first token scores highest after the prompt;
generation decodes greedily (no KV cache: each step re-runs the prefix, which is what a
split party without its own cache must do) and is scored with ROUGE.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..train.batching import prompt_batch
from .metrics import accuracy, rouge

LogitsFn = Callable[[dict], torch.Tensor]


def choice_token_ids(tok, choices: list[str]) -> list[int]:
    ids = [tok(c, add_special_tokens=False).input_ids[0] for c in choices]
    if len(set(ids)) != len(ids):
        raise ValueError(f"verbalizers {choices} share a first token; choose distinct words")
    return ids


@torch.no_grad()
def classify(logits_fn: LogitsFn, tok, examples, choices, max_length: int, batch_size: int) -> list[int]:
    ids = torch.tensor(choice_token_ids(tok, choices))
    preds: list[int] = []
    for start in range(0, len(examples), batch_size):
        batch = prompt_batch(tok, [e.prompt for e in examples[start:start + batch_size]], max_length)
        logits = logits_fn(batch)
        last = logits[torch.arange(len(batch["lengths"])), batch["lengths"] - 1]
        preds.extend(last[:, ids].argmax(-1).tolist())
    return preds


@torch.no_grad()
def generate(logits_fn: LogitsFn, tok, prompts: list[str], max_length: int, max_new_tokens: int,
             batch_size: int) -> list[str]:
    outputs: list[str] = []
    stop = {tok.eos_token_id, *tok("\n", add_special_tokens=False).input_ids}
    for start in range(0, len(prompts), batch_size):
        batch = prompt_batch(tok, prompts[start:start + batch_size], max_length - max_new_tokens)
        ids, lengths = batch["input_ids"], batch["lengths"].clone()
        ids = torch.cat([ids, torch.full((len(lengths), max_new_tokens), tok.pad_token_id)], dim=1)
        new = [[] for _ in lengths]
        done = torch.zeros(len(lengths), dtype=torch.bool)
        for _ in range(max_new_tokens):
            width = int(lengths.max())
            logits = logits_fn({"input_ids": ids[:, :width], "lengths": lengths})
            nxt = logits[torch.arange(len(lengths)), lengths - 1].argmax(-1)
            for i, t in enumerate(nxt.tolist()):
                if done[i]:
                    continue
                if t in stop:
                    done[i] = True
                    continue
                new[i].append(t)
                ids[i, lengths[i]] = t
                lengths[i] += 1
            if done.all():
                break
        outputs.extend(tok.decode(n, skip_special_tokens=True).strip() for n in new)
    return outputs


def evaluate(logits_fn: LogitsFn, tok, task, max_length: int, batch_size: int, max_new_tokens: int) -> dict:
    """{'accuracy': ...} or {'rouge1': ..., 'rouge2': ..., 'rougeL': ...} on the task's test set."""
    if task.spec.kind == "classification":
        preds = classify(logits_fn, tok, task.test, task.spec.choices, max_length, batch_size)
        return {"accuracy": accuracy(preds, [e.label for e in task.test]), "n": len(task.test)}
    preds = generate(logits_fn, tok, [e.prompt for e in task.test], max_length, max_new_tokens, batch_size)
    scores = rouge(preds, [e.target.strip() for e in task.test])
    return {**scores, "n": len(task.test), "samples": [{"prediction": p, "reference": e.target.strip()}
                                                        for p, e in list(zip(preds, task.test))[:3]]}
