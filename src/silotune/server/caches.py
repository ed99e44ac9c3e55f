"""The trunk's generation caches: one per client request, bounded, and gone when the request ends.

Split generation keeps a key/value cache on every party; the server's holds the keys and
values of the trunk's blocks for one client's request (``ForwardActivations.cache``, an id
the client picks). Every decode step must continue it exactly (``past`` equals the slots it
holds, the batch is the same, the sequence stays within ``boundary.max_length``), else the
step is refused and the cache dropped. A client may hold ``boundary.max_generations``
caches at once; all clients' caches together may hold ``boundary.cache_mb`` (a step that
would grow its cache past what is left is refused and the cache dropped); a cache unused for ``boundary.cache_idle_seconds`` is dropped, and a
client's caches go when it ends its request (``Control("release")``), says goodbye or is
dropped. Refusals are counted by the boundary like any other.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import torch

from ..models.arch import attention_geometry
from ..models.kvcache import KVCache
from .boundary import Boundary

log = logging.getLogger(__name__)


@dataclass
class _Entry:
    cache: KVCache
    rows: int
    reserved: int
    used: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)


class GenerationCaches:
    """The live generation caches of a trunk, keyed by (client, request id)."""

    def __init__(self, boundary: Boundary, trunk, clock=time.monotonic):
        """``trunk``: the server's stage (its config and blocks size a cache's reservation)."""
        self.boundary, self.limits = boundary, boundary.limits
        kv_heads, head_dim = attention_geometry(trunk.config)
        itemsize = next((p.element_size() for p in trunk.parameters()), 4)
        # keys + values, per trunk block, per row and per token slot
        self.bytes_per_slot = 2 * len(trunk.blocks) * kv_heads * head_dim * itemsize
        self.clock = clock
        self.entries: dict[tuple[int, int], _Entry] = {}
        self._lock = threading.Lock()

    @property
    def reserved(self) -> int:
        with self._lock:
            return sum(e.reserved for e in self.entries.values())

    def _expire(self) -> None:
        now = self.clock()
        for key, entry in list(self.entries.items()):
            if now - entry.used > self.limits.cache_idle_seconds:
                del self.entries[key]
                log.info("generation cache %d of client %d idle for %.0f s: dropped", key[1], key[0], now - entry.used)

    def acquire(self, client: int, step: int, request: int, past: int, rows: int, tokens: int) -> _Entry:
        """The cache a step continues (``past`` > 0) or a new one (``past`` 0); refused (counted) otherwise."""
        where, lim = f"client {client} step {step} generation {request}", self.limits
        if past + tokens > lim.max_length:
            raise self.boundary.refuse("limit", where, f"{past} cached + {tokens} new tokens exceed the limit of "
                                       f"{lim.max_length} (boundary.max_length)")
        with self._lock:
            self._expire()
            key = (client, request)
            if past == 0:
                self.entries.pop(key, None)  # a new request under an old id replaces it
                mine = sum(1 for c, _ in self.entries if c == client)
                if mine >= lim.max_generations:
                    raise self.boundary.refuse("cache_limit", where, f"already holds {mine} generation caches (at "
                                               f"most {lim.max_generations}, boundary.max_generations): release one")
                entry = _Entry(KVCache(), rows, 0)
            else:
                entry = self.entries.get(key)
                if entry is None:
                    raise self.boundary.refuse("cache", where, "no such generation cache (never opened, released or "
                                               "expired): start the request again")
                if past != entry.cache.length or rows != entry.rows:
                    del self.entries[key]
                    raise self.boundary.refuse("cache", where, f"continues {past} slots of {rows} rows, the cache "
                                               f"holds {entry.cache.length} of {entry.rows}: cache dropped")
            need = rows * (past + tokens) * self.bytes_per_slot  # what the cache holds after this step
            others = sum(e.reserved for k, e in self.entries.items() if k != key)
            if others + need > lim.cache_bytes:
                self.entries.pop(key, None)
                raise self.boundary.refuse("cache_memory", where, f"a cache of {rows} x {past + tokens} tokens needs "
                                           f"{need / 2**20:.1f} MiB, {(lim.cache_bytes - others) / 2**20:.1f} MiB left "
                                           "(boundary.cache_mb): cache dropped; retry later or with fewer rows")
            entry.reserved, entry.used = need, self.clock()
            self.entries[key] = entry
            return entry

    def run(self, client: int, step: int, request: int, past: int, h1: torch.Tensor, lengths: torch.Tensor,
            infer) -> torch.Tensor:
        """``infer(h1, lengths, cache)`` on the request's cache; a step that fails drops the cache."""
        entry = self.acquire(client, step, request, past, h1.shape[0], h1.shape[1])
        with entry.lock:  # two calls on one cache: the second waits, then fails its ``past`` check
            if entry.cache.length != past:
                self.release(client, request)
                raise self.boundary.refuse("cache", f"client {client} step {step} generation {request}",
                                           "the cache moved on meanwhile: cache dropped")
            try:
                return infer(h1, lengths, entry.cache)
            except BaseException:
                self.release(client, request)
                raise

    def release(self, client: int, request: int | None = None) -> int:
        """Drop one cache of ``client`` (None: all of them); returns how many went."""
        with self._lock:
            keys = [k for k in self.entries if k[0] == client and (request is None or k[1] == request)]
            for key in keys:
                del self.entries[key]
            return len(keys)


__all__ = ["GenerationCaches"]
