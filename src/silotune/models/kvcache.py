"""Key/value caches of one stage for incremental runs: split generation, search inversion.

Each party caches the keys and values of its own blocks only; what crosses a cut per decode
step is one hidden vector per sequence. A cache also keeps, per row, the position of every
cached slot (-1 for padding), so sequences of different lengths share one batch: a prompt
batch is right-padded, the padding slots are never attended to, and each row's next token
takes the position after that row's last real token. Every party rebuilds the same
positions and masks from the per-sample lengths alone, as in training.

``KVCache`` is what Hugging Face attention layers see as ``past_key_values``: they call
``update(keys, values, layer_idx)`` and get the cached keys and values with the new ones
appended.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of the tokens a stage has already run, per layer, and where each slot sits.

    Passed as ``cache`` to ``Stage.forward``: new tokens take each row's next positions, attend
    to that row's real cached tokens and to each other causally, and are appended. ``select``
    picks (or repeats) batch rows into a new cache, e.g. to try several next tokens after one
    shared prefix, or to drop finished sequences.
    """

    def __init__(self):
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.key_pos: torch.Tensor | None = None  # (B, S) position of each cached slot, -1: padding
        self.seen: torch.Tensor | None = None  # (B,) real tokens cached per row: the next position

    @property
    def length(self) -> int:
        """Cached slots (the same for every row, padding included)."""
        return 0 if self.key_pos is None else int(self.key_pos.shape[1])

    @property
    def rows(self) -> int | None:
        return None if self.seen is None else int(self.seen.shape[0])

    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.kv.values())

    # ---- what Stage.forward asks before and after its blocks ----
    def _start(self, lengths: torch.Tensor) -> None:
        if self.seen is None:
            self.seen = torch.zeros(len(lengths), dtype=torch.long, device=lengths.device)
            self.key_pos = torch.zeros(len(lengths), 0, dtype=torch.long, device=lengths.device)
        elif len(lengths) != len(self.seen):
            raise ValueError(f"a batch of {len(lengths)} rows continues a cache of {len(self.seen)} rows")

    def positions(self, lengths: torch.Tensor, seq_len: int) -> torch.Tensor:
        """(B, T) positions of the new tokens: each row continues after its own real tokens."""
        self._start(lengths)
        return self.seen[:, None] + torch.arange(seq_len, device=lengths.device)[None, :]

    def mask(self, lengths: torch.Tensor, seq_len: int, dtype: torch.dtype, prefix_len: int = 0,
             window: int | None = None) -> torch.Tensor:
        """Float mask (B, 1, T, P+S+T): 0 where a new token may attend a key, dtype-min elsewhere.

        Keys are ``prefix_len`` always-visible prefix slots, the S cached slots and the T new
        tokens; a token key is visible when it is real, causal (its position is not after the
        query's) and inside the ``window``. A padded query keeps itself visible (no NaN rows)."""
        new_pos = self.positions(lengths, seq_len)
        real = torch.arange(seq_len, device=lengths.device)[None, :] < lengths[:, None]
        key_pos = torch.cat([self.key_pos, torch.where(real, new_pos, -1)], dim=1)  # (B, S+T)
        q, k = new_pos[:, :, None], key_pos[:, None, :]
        allowed = (k >= 0) & (k <= q)
        if window is not None:
            allowed = allowed & (q - k < window)
        self_slot = torch.arange(seq_len, device=lengths.device) + self.length
        allowed[:, torch.arange(seq_len), self_slot] |= ~real  # a padded query sees itself only
        if prefix_len:
            prefix = torch.ones(*allowed.shape[:2], prefix_len, dtype=torch.bool, device=allowed.device)
            allowed = torch.cat([prefix, allowed], dim=-1)
        out = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        out.masked_fill_(~allowed, torch.finfo(dtype).min)
        return out.unsqueeze(1)

    def advance(self, lengths: torch.Tensor, seq_len: int) -> None:
        """Record the T new slots (called once the stage's blocks have appended their keys and values)."""
        new_pos = self.positions(lengths, seq_len)
        real = torch.arange(seq_len, device=lengths.device)[None, :] < lengths[:, None]
        self.key_pos = torch.cat([self.key_pos, torch.where(real, new_pos, -1)], dim=1)
        self.seen = self.seen + lengths.clamp(max=seq_len)

    # ---- the cache API of Hugging Face attention layers ----
    def update(self, keys, values, layer_idx, *args, **kwargs):
        if layer_idx in self.kv:
            old_k, old_v = self.kv[layer_idx]
            keys, values = torch.cat([old_k, keys], dim=2), torch.cat([old_v, values], dim=2)
        self.kv[layer_idx] = (keys, values)
        return keys, values

    def select(self, index: torch.Tensor) -> KVCache:
        out = KVCache()
        out.kv = {i: (k[index], v[index]) for i, (k, v) in self.kv.items()}
        if self.seen is not None:
            out.seen, out.key_pos = self.seen[index], self.key_pos[index]
        return out


__all__ = ["KVCache"]
