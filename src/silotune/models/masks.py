"""Attention masks and positions rebuilt from per-sample lengths.

Only the lengths cross the wire; each party rebuilds the same causal + padding mask
(and rotary positions) for its own blocks. Sequences are right-padded.
"""

from __future__ import annotations

import torch


def valid_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """(B, T) True on each sequence's real (non-padding) positions."""
    return torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]


def positions(lengths: torch.Tensor, seq_len: int, past: int = 0) -> torch.Tensor:
    """Position ids (B, T): past..past+T-1 for every sample (right padding keeps them aligned)."""
    return torch.arange(past, past + seq_len, device=lengths.device).unsqueeze(0).expand(lengths.shape[0], -1)


def additive_mask(
    lengths: torch.Tensor,
    seq_len: int,
    dtype: torch.dtype,
    prefix_len: int = 0,
    window: int | None = None,
    past: int = 0,
) -> torch.Tensor:
    """Float mask (B, 1, T, P+S+T): 0 where query i may attend key j, dtype-min elsewhere.

    Keys are ``prefix_len`` always-visible prefix slots, then ``past`` cached tokens (at
    positions 0..S-1, all real), then the T new tokens at positions S..S+T-1; token keys
    are visible when causal (j <= i), inside the window (i - j < window) and not padding
    (j < S + length). Every query row keeps at least one visible key, so padded rows never
    produce NaNs.
    """
    device = lengths.device
    q = torch.arange(past, past + seq_len, device=device)[:, None]
    k = torch.arange(past + seq_len, device=device)[None, :]
    allowed = k <= q
    if window is not None:
        allowed = allowed & (q - k < window)
    allowed = allowed[None] & (k[None] < past + lengths.view(-1, 1, 1))  # (B, T, S+T)
    if prefix_len:
        prefix = torch.ones(lengths.shape[0], seq_len, prefix_len, dtype=torch.bool, device=device)
        allowed = torch.cat([prefix, allowed], dim=-1)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask.unsqueeze(1)
