"""The causal LM loss on the client's own labels (prompt tokens are ignored with -100)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled (answer) tokens of the batch.

    Position j predicts ``labels[:, j + 1]``. ``logits`` may cover one position less than
    ``labels`` (the inputs' last token was never run: it predicts nothing); the loss is the same.
    """
    target = labels[:, 1:logits.shape[1] + 1]
    logits = logits[:, :target.shape[1]]
    return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=-100)
