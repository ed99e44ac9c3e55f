"""Attack (a): read tokens off ``h1`` as if it were an embedding: the nearest public row.

In a two-part split (the client keeps only the embedding, a = 0) ``h1`` *is* a row of the
public embedding matrix (plus noise, if any), so the nearest row gives back every token:
this is why SiloTune keeps blocks on the client. Against a >= 1 it is the naive attack
that ignores the blocks. Candidates go through the defence's deterministic part (the
clip) before matching; the nearest in L2 is the maximum-likelihood token under Gaussian
noise. A learned absolute position embedding (GPT-2) is public and subtracted first.
"""

from __future__ import annotations

import torch

from ..models.masks import positions
from .knowledge import AttackerKnowledge


@torch.no_grad()
def nearest_rows(knowledge: AttackerKnowledge, h1: torch.Tensor, lengths: torch.Tensor,
                 chunk: int = 512) -> torch.Tensor:
    """(B, T) token guesses: the embedding row nearest to each position of ``h1``."""
    head = knowledge.head()
    rows = knowledge.deterministic_part(knowledge.embedding.float())
    h = h1.float()
    if head.pos_embed is not None:
        h = h - head.pos_embed(positions(lengths, h.shape[1])).float()
    flat = h.reshape(-1, h.shape[-1])
    sq = rows.pow(2).sum(-1)
    out = []
    for start in range(0, len(flat), chunk):
        x = flat[start:start + chunk]
        out.append((sq[None, :] - 2 * x @ rows.T).argmin(-1))  # |x|^2 is the same for every row
    return torch.cat(out).reshape(h.shape[:2])
