"""Evaluation loops over any ``logits_fn(batch) -> (B, T, V)``: split or centralized alike.

Classification picks the verbalizer whose first token scores highest after the prompt;
generation decodes greedily to the end of the line (``generation``: with a KV cache on every
party) and is scored with ROUGE.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from ..train.batching import prompt_batch
from .metrics import accuracy, rouge

LogitsFn = Callable[[dict], torch.Tensor]


def choice_token_ids(tok, choices: list[str]) -> list[int]:
    ids = [tok(c, add_special_tokens=False).input_ids[0] for c in choices]
    if len(set(ids)) != len(ids):
        raise ValueError(f"verbalizers {choices} share a first token; choose distinct words")
    return ids


@torch.no_grad()
def classify(logits_fn: LogitsFn, tok, examples, choices, max_length: int, batch_size: int,
             progress: Callable[[int], object] | None = None) -> list[int]:
    """Each example's predicted choice; ``progress(n)`` after each batch of n examples."""
    ids = torch.tensor(choice_token_ids(tok, choices))
    preds: list[int] = []
    for start in range(0, len(examples), batch_size):
        batch = prompt_batch(tok, [e.prompt for e in examples[start:start + batch_size]], max_length)
        logits = logits_fn(batch)
        last = logits[torch.arange(len(batch["lengths"])), batch["lengths"] - 1]
        preds.extend(last[:, ids].argmax(-1).tolist())
        if progress is not None:
            progress(len(batch["lengths"]))
    return preds


def generate(decoder, tok, prompts: list[str], max_length: int, max_new_tokens: int, batch_size: int,
             progress: Callable[[int], object] | None = None) -> list[str]:
    """Greedy continuations that stop at the end of the line (``generation.generate_text`` with a decoder:
    KV caches on every party, or ``RecomputeDecoder`` where a party keeps none); ``progress(n)`` after each batch."""
    from ..generation import GenerateSettings, generate_text

    settings = GenerateSettings(max_new_tokens=max_new_tokens, batch_size=batch_size, stop=["\n"])
    return generate_text(decoder, tok, prompts, settings, max_length, progress=progress).texts


def evaluate(logits_fn: LogitsFn, tok, task, max_length: int, batch_size: int, max_new_tokens: int,
             decoder=None, progress: bool = False, desc: str = "evaluation") -> dict:
    """{'accuracy': ...} or {'rouge1': ..., 'rouge2': ..., 'rougeL': ...} on the task's test set. Generation
    decodes with ``decoder`` (``generation.decoders``; None: re-run ``logits_fn`` on the whole prefix).
    ``progress``: a progress bar (``desc``) over the test examples."""
    with tqdm(total=len(task.test), desc=desc, unit="example", disable=not progress, leave=False) as bar:
        return _evaluate(logits_fn, tok, task, max_length, batch_size, max_new_tokens, decoder, bar.update)


def _evaluate(logits_fn: LogitsFn, tok, task, max_length: int, batch_size: int, max_new_tokens: int, decoder,
              progress) -> dict:
    if task.spec.kind == "classification":
        preds = classify(logits_fn, tok, task.test, task.spec.choices, max_length, batch_size, progress)
        return {"accuracy": accuracy(preds, [e.label for e in task.test]), "n": len(task.test)}
    if decoder is None:
        from ..generation import RecomputeDecoder

        decoder = RecomputeDecoder(logits_fn, tok.pad_token_id)
    preds = generate(decoder, tok, [e.prompt for e in task.test], max_length, max_new_tokens, batch_size, progress)
    scores = rouge(preds, [e.target.strip() for e in task.test])
    return {**scores, "n": len(task.test), "samples": [{"prediction": p, "reference": e.target.strip()}
                                                        for p, e in list(zip(preds, task.test))[:3]]}
