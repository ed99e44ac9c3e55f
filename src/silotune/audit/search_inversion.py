"""Attack (b): exact search inversion of ``h1`` with a known head, token by token.

The head is causal, so position t of ``h1`` depends only on tokens 0..t. Left to right,
the attacker shortlists the tokens whose context-free head output points the same way
as the observed vector, runs the head on the recovered prefix plus each candidate (the
prefix's keys and values are cached, so each try costs one token), and keeps the
candidate whose output, after the defence's deterministic clip, is nearest to the
observation (the maximum-likelihood choice under Gaussian noise). All sequences of a
batch advance together.

A peer client runs it with the shared head it holds; the trunk server runs it with the
public pretrained head, or with the aggregated head a clear-text FedAvg hands it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.partition import KVCache, Stage


@torch.no_grad()
def token_signatures(head: Stage, batch_size: int = 4096) -> torch.Tensor:
    """Unit-norm head output of every vocabulary token seen alone: the shortlist index (V, H)."""
    vocab = head.embed.weight.shape[0]
    out = []
    for start in range(0, vocab, batch_size):
        ids = torch.arange(start, min(start + batch_size, vocab))[:, None]
        out.append(F.normalize(head(ids, torch.ones(len(ids), dtype=torch.long))[:, 0].float(), dim=-1))
    return torch.cat(out)


@torch.no_grad()
def search_invert(head: Stage, h1: torch.Tensor, lengths: torch.Tensor, shortlist: int = 32,
                  signatures: torch.Tensor | None = None, transform=None,
                  prior: torch.Tensor | None = None, prior_logp: torch.Tensor | None = None,
                  noise_std=None) -> torch.Tensor:
    """(B, T) tokens whose head output best reproduces ``h1`` (greedy, left to right).

    ``transform`` maps the head's output to what the defence makes of it before noise
    (the clip); None: identity. ``prior`` (B, T, k2) adds candidates per position, e.g. a
    learned inversion model's top guesses, and ``prior_logp`` their log-probabilities.
    ``noise_std(observed) -> (B, H)`` is the defence's noise std at each observed coordinate:
    with it and a prior, each candidate is scored by its posterior
    (Gaussian log-likelihood plus log-prior; shortlist tokens outside the prior's list get
    its lowest log-probability) instead of by distance alone."""
    signatures = token_signatures(head) if signatures is None else signatures
    transform = transform or (lambda x: x)
    batch, width = h1.shape[:2]
    top = min(shortlist, len(signatures))
    guesses = torch.zeros(batch, width, dtype=torch.long)
    cache = KVCache()
    for t in range(int(lengths.max())):
        target = h1[:, t].float()
        candidates = (F.normalize(target, dim=-1) @ signatures.T).topk(top, dim=-1).indices  # (B, top)
        logp = None
        if prior is not None:
            candidates = torch.cat([candidates, prior[:, t]], dim=1)
            if prior_logp is not None:
                floor = prior_logp[:, t].min(-1, keepdim=True).values.expand(-1, top)
                logp = torch.cat([floor, prior_logp[:, t]], dim=1)
        k = candidates.shape[1]
        one = torch.ones(batch * k, dtype=torch.long)
        trial = cache.select(torch.arange(batch).repeat_interleave(k))
        out = transform(head(candidates.reshape(-1, 1), one, trial)[:, 0].float()).reshape(batch, k, -1)
        score = -(out - target[:, None]).pow(2).sum(-1)
        if logp is not None and noise_std is not None:
            sigma = noise_std(target)
            if bool((sigma > 0).all()):
                score = -((out - target[:, None]) / sigma[:, None]).pow(2).sum(-1) / 2 + logp
        best = candidates[torch.arange(batch), score.argmax(-1)]
        guesses[:, t] = best
        head(best[:, None], torch.ones(batch, dtype=torch.long), cache)  # extend the shared prefix
    return guesses


def invert(head: Stage, h1: torch.Tensor, length: int, shortlist: int = 64,
           signatures: torch.Tensor | None = None) -> list[int]:
    """One sequence's tokens from its ``h1`` (T, H): ``search_invert`` for a batch of one."""
    guess = search_invert(head, h1[None, :length], torch.tensor([length]), shortlist, signatures)
    return guess[0, :length].tolist()
