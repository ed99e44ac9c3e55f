"""Decoders: how a prefill and each decode step run on one layout of the model's parties.

A decoder answers two questions: ``prefill(ids, lengths)`` (right-padded prompts) and
``extend(tokens)`` (one new token per row), each with the logits of every row's last real
position. Three layouts:

- ``LocalDecoder``: one stage holding the whole model (the centralized baseline, a reference).
- ``SplitDecoder``: a client's head and tail with their own KV caches, the server's trunk with
  its cache for this request (``server/caches.py``). The prefill sends the prompts' ``h1`` once;
  each decode step sends one hidden vector per sequence and gets one back. The client's
  privacy defences apply to every ``h1`` it sends, as in training.
- ``RecomputeDecoder``: any ``logits_fn(batch)`` re-run on the whole sequence at every step, what a
  party without a cache must do (the baseline the caches are measured against; TEE mode, whose
  enclave keeps no cache).
"""

from __future__ import annotations

import itertools
import os
from typing import Protocol

import torch

from ..compute import to_wire
from ..errors import ProtocolError
from ..models.kvcache import KVCache
from ..models.partition import Stage
from ..protocol.messages import Control, ForwardActivations, ReturnedActivations


def _last(logits: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    return logits[torch.arange(len(lengths)), lengths - 1].float().cpu()


class Decoder(Protocol):
    def prefill(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Right-padded prompts (B, T) and their lengths -> the logits after each prompt (B, V)."""

    def extend(self, tokens: torch.Tensor) -> torch.Tensor:
        """One new token per row (B,) -> the logits after it (B, V)."""

    def close(self) -> None:
        """End the request: every party drops its cache."""


class LocalDecoder:
    """The whole model in one stage, with one KV cache."""

    def __init__(self, model: Stage):
        self.model, self.cache = model, KVCache()
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def prefill(self, ids, lengths):
        self.cache = KVCache()
        return _last(self.model(ids.to(self.device), lengths.to(self.device), self.cache), lengths)

    @torch.no_grad()
    def extend(self, tokens):
        ones = torch.ones(len(tokens), dtype=torch.long, device=self.device)
        return self.model(tokens[:, None].to(self.device), ones, self.cache)[:, 0].float().cpu()

    def close(self):
        self.cache = KVCache()


class RecomputeDecoder:
    """No cache: every step runs ``logits_fn`` over each row's whole sequence so far."""

    def __init__(self, logits_fn, pad_id: int = 0):
        self.logits_fn, self.pad_id = logits_fn, pad_id
        self.ids = self.lengths = None

    @torch.no_grad()
    def prefill(self, ids, lengths):
        self.ids, self.lengths = ids.clone(), lengths.clone()
        return _last(self.logits_fn({"input_ids": self.ids, "lengths": self.lengths}), self.lengths)

    @torch.no_grad()
    def extend(self, tokens):
        if int(self.lengths.max()) == self.ids.shape[1]:
            self.ids = torch.cat([self.ids, torch.full((len(tokens), 1), self.pad_id, dtype=self.ids.dtype)], 1)
        self.ids[torch.arange(len(tokens)), self.lengths] = tokens
        self.lengths = self.lengths + 1
        width = int(self.lengths.max())
        return _last(self.logits_fn({"input_ids": self.ids[:, :width], "lengths": self.lengths}), self.lengths)

    def close(self):
        self.ids = self.lengths = None


class SplitDecoder:
    """A client's split generation: KV caches on its head and tail, and on the server's trunk for this request.

    ``client``: a ``client.runtime.SplitClient`` (its head, tail, defences, compute and transport)."""

    _ids = itertools.count(1)

    def __init__(self, client):
        self.client = client
        self.request = 0
        self.past = 0  # slots of the server's cache

    def _round_trip(self, h1: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        c = self.client
        msg = ForwardActivations(c.id, c.step, hidden=to_wire(h1), lengths=to_wire(lengths), train=False,
                                 cache=self.request, past=self.past)
        reply = c.transport.call(msg)
        if not isinstance(reply, ReturnedActivations):
            raise ProtocolError(f"client {c.id}: expected returned activations, the server sent {reply.kind}")
        if tuple(reply.hidden.shape) != tuple(h1.shape):
            raise ProtocolError(f"client {c.id}: the server returned {tuple(reply.hidden.shape)} for "
                                f"{tuple(h1.shape)} activations")
        self.past += h1.shape[1]
        return reply.hidden

    def _step(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        c = self.client
        dev_lengths = c.compute.to_device(lengths)
        h1 = c.head(c.compute.inputs(ids), dev_lengths, self.head_cache)
        h1 = c.defence.activations(h1.to("cpu", torch.float32), lengths.cpu())
        h2 = self._round_trip(h1, lengths)
        return c.tail(c.compute.inputs(h2), dev_lengths, self.tail_cache)

    @torch.no_grad()
    def prefill(self, ids, lengths):
        if self.request:
            self.close()
        # a fresh id per request (a restarted client does not pick up an old one's cache)
        self.request = (os.getpid() * 7919 + next(self._ids)) % (2**31 - 1) or 1
        self.past = 0
        self.head_cache, self.tail_cache = KVCache(), KVCache()
        return _last(self._step(ids, lengths), lengths)

    @torch.no_grad()
    def extend(self, tokens):
        ones = torch.ones(len(tokens), dtype=torch.long)
        return self._step(tokens[:, None], ones)[:, 0].float().cpu()

    def close(self):
        if self.request:
            request, self.request = self.request, 0
            c = self.client
            c.transport.call(Control(c.id, c.step, command="release", payload={"cache": request}))
        self.head_cache = self.tail_cache = None


def split_decoder(client, use_cache: bool = True) -> Decoder:
    """A client's decoder: caches on every party, or (``use_cache`` false; always in TEE mode, whose enclave keeps
    no cache) the whole prefix re-run through the client's transport at every step."""
    return SplitDecoder(client) if use_cache else RecomputeDecoder(client.logits, pad_id=0)


__all__ = ["Decoder", "LocalDecoder", "RecomputeDecoder", "SplitDecoder", "split_decoder"]
