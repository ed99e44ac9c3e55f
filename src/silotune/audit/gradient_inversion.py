"""Attack (e): what the server learns from the gradient ``dL/dh2`` a client sends back.

The server knows ``h2`` (it computed it) and the public tail (or the aggregated tail a
clear-text FedAvg hands it), so it can compute, for any guess of the client's target,
the gradient that guess would produce, and compare it with the one it received
(BiSR's backward direction, gradient matching).

- ``infer_labels`` (classification): targets sit at the end of each sequence (the label's
  last token is never sent; the last sent position predicts it), so for every label word
  the server computes the gradient of its loss there and picks the label whose gradient
  points most nearly the same way as the received one (cosine, so per-sample clipping and
  the unknown batch normalisation do not matter).
- ``reconstruct_targets`` (generation): right to left from the last sent position,
  the received gradient at position t holds the loss at t plus what later losses sent
  back through attention. With later tokens already recovered, their exact contribution
  is subtracted; the rest at position t is the gradient of the loss at t alone. Candidates
  for the token come from a first-order score over the whole vocabulary (through the final
  norm's weight), the best few are checked exactly, and the walk stops when no candidate
  explains the residual (it has reached the prompt, which carries no loss).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..models.masks import valid_mask
from ..models.partition import Stage


@dataclass
class GradientSettings:
    shortlist: int = 16
    """Candidates per position checked exactly, from a first-order score over the whole vocabulary."""
    min_cos: float = 0.3
    """The cosine below which the residual is not a target token's gradient: the walk stops there."""
    max_tokens: int = 64
    """The longest target (tokens) reconstructed, walking right to left from the last sent position."""


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.flatten(-2), b.flatten(-2), dim=-1)


def infer_labels(tail: Stage, h2: torch.Tensor, grad: torch.Tensor, lengths: torch.Tensor,
                 choices: list[list[int]]) -> tuple[list[int], torch.Tensor]:
    """Per sequence, the index of the label whose simulated gradient best matches ``grad``;
    and the (B, K) cosine scores."""
    batch, width = h2.shape[:2]
    valid = valid_mask(lengths, width).unsqueeze(-1).float()
    scores = []
    for ids in choices:
        x = h2.detach().float().clone().requires_grad_(True)
        logits = tail(x, lengths)
        loss = 0.0
        for i in range(batch):
            n, end = len(ids), int(lengths[i])  # the label fills positions end-n+1..end (end: never sent)
            pred = logits[i, end - n:end]  # the positions predicting them
            loss = loss + F.cross_entropy(pred.float(), torch.tensor(ids), reduction="sum")
        (g,) = torch.autograd.grad(loss, x)
        scores.append(_cos(g * valid, grad.float() * valid))
    scores = torch.stack(scores, dim=1)
    return scores.argmax(1).tolist(), scores


def reconstruct_targets(tail: Stage, h2: torch.Tensor, grad: torch.Tensor, lengths: torch.Tensor,
                        settings: GradientSettings) -> torch.Tensor:
    """(B, T + 1) guesses of each sequence's target tokens at their positions (the last one
    never sent); -1 where no guess."""
    out = torch.full((h2.shape[0], h2.shape[1] + 1), -1, dtype=torch.long)
    lm = tail.lm_head.weight.detach().float()  # (V, H)
    norm_w = getattr(tail.norm, "weight", None)
    scaled = lm * (norm_w.detach().float() if norm_w is not None else 1.0)  # first-order: through the norm weight
    for i in range(h2.shape[0]):
        n = int(lengths[i])
        x = h2[i:i + 1, :n].detach().float().clone().requires_grad_(True)
        feats = tail(x, lengths[i:i + 1], project=False)[0]  # (n, H) final-norm output
        probs = (feats @ lm.T).softmax(-1).detach()
        residual = grad[i, :n].float().clone()
        alpha = None
        for t in range(n - 1, max(n - 1 - settings.max_tokens, -1), -1):  # position t predicts token t+1
            r = residual[t]
            q = probs[t] @ scaled  # expected row under the model's own prediction
            cand_dirs = q[None, :] - scaled  # first-order gradient direction for each token, up to scale
            cheap = (cand_dirs @ r) / (cand_dirs.norm(dim=-1) * r.norm() + 1e-12)
            cands = cheap.topk(settings.shortlist).indices
            cot = torch.zeros(len(cands), n, feats.shape[-1])
            cot[:, t] = probs[t] @ lm - lm[cands]  # d(CE at t)/d feats[t] for each candidate
            (sims,) = torch.autograd.grad(feats, x, cot, retain_graph=True, is_grads_batched=True)
            sims = sims[:, 0]  # (k, n, H)
            exact = F.cosine_similarity(sims[:, t], r[None], dim=-1)
            best = int(exact.argmax())
            if float(exact[best]) < settings.min_cos:
                break
            s = sims[best]
            if alpha is None:
                alpha = float((r @ s[t]) / (s[t] @ s[t] + 1e-12))
            residual[: t + 1] -= alpha * s[: t + 1]
            out[i, t + 1] = int(cands[best])
    return out
