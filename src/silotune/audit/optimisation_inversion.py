"""Attack (d): optimise input embeddings through the known head to match an observed ``h1``.

The attacker treats the client's input embeddings as unknowns, runs them through its copy
of the head (and the defence's deterministic clip), and minimises the distance to what it
observed, per token relative to the observation's own norm so that a few very large
activations do not dominate. The result is projected onto the nearest rows of the public
embedding matrix. Starting from the learned inversion model's guesses (attack c) is the
BiSR recipe: a learned prior refined by optimisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..models.masks import valid_mask
from ..models.partition import Stage


@dataclass
class OptimisationSettings:
    steps: int = 100
    """Adam steps on the unknown input embeddings."""
    lr: float = 0.02
    """The learning rate, relative to the mean norm of the embedding matrix's rows."""


def optimise_invert(head: Stage, h1: torch.Tensor, lengths: torch.Tensor, embedding: torch.Tensor,
                    settings: OptimisationSettings, init: torch.Tensor | None = None, transform=None) -> torch.Tensor:
    """(B, T) tokens nearest to the embeddings that best reproduce ``h1``.

    ``init`` (B, T) token ids to start from (e.g. the learned inverter's guesses); None: the
    mean embedding everywhere."""
    transform = transform or (lambda x: x)
    embedding = embedding.float()
    valid = valid_mask(lengths, h1.shape[1]).float()
    target = h1.float()
    weight = valid / (target.pow(2).sum(-1) + 1e-6)
    if init is None:
        z = embedding.mean(0).expand(h1.shape[0], h1.shape[1], -1).clone()
    else:
        z = embedding[init].clone()
    z.requires_grad_(True)
    opt = torch.optim.Adam([z], lr=settings.lr * float(embedding.norm(dim=-1).mean()))
    for _ in range(settings.steps):
        out = transform(head(z, lengths).float())
        loss = ((out - target).pow(2).sum(-1) * weight).sum() / valid.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        rows = F.normalize(embedding, dim=-1)
        return torch.stack([(F.normalize(seq, dim=-1) @ rows.T).argmax(-1) for seq in z])
