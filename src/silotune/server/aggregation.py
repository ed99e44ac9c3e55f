"""Federated averaging of the clients' head and tail adapters, weighted by example counts.

A round's average is ready once every client still taking part has sent its update; a
client dropped mid-round (dead, timed out) does not hold the others back.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import ProtocolError


class FedAvg:
    def __init__(self, n_clients: int, expected: Callable[[], set[int]] | None = None):
        self.n_clients = n_clients
        self.expected = expected or (lambda: set(range(n_clients)))
        self.updates: dict[int, dict[int, tuple[dict[str, torch.Tensor], int]]] = {}
        self.results: dict[int, dict[str, torch.Tensor]] = {}

    def submit(self, client: int, round_: int, tensors: dict[str, torch.Tensor], num_examples: int) -> bool:
        """Add an update; True if it completed the round."""
        if not 0 <= client < self.n_clients:
            raise ProtocolError(f"aggregation from unknown client {client}")
        if num_examples <= 0:
            raise ProtocolError(f"client {client}: aggregation with {num_examples} examples")
        if round_ in self.results:
            return False  # the round closed without this (late) client
        pending = self.updates.setdefault(round_, {})
        ref = next(iter(pending.values()))[0] if pending else next(iter(self.results.values()), None)
        if ref is not None and (set(ref) != set(tensors) or any(ref[k].shape != tensors[k].shape for k in ref)):
            raise ProtocolError(f"client {client}: round {round_} update does not match the others' tensors")
        pending[client] = (tensors, num_examples)
        return self._try_complete(round_)

    def _try_complete(self, round_: int) -> bool:
        pending = self.updates.get(round_, {})
        if not pending or not self.expected() <= set(pending):
            return False
        self.results[round_] = average([u for u, _ in pending.values()], [n for _, n in pending.values()])
        del self.updates[round_]
        for old in [r for r in self.results if r < round_ - 1]:
            del self.results[old]
        return True

    def recheck(self) -> list[int]:
        """Rounds completed now that fewer clients are expected."""
        return [r for r in sorted(self.updates) if self._try_complete(r)]

    def result(self, round_: int) -> dict[str, torch.Tensor] | None:
        return self.results.get(round_)

    def latest(self) -> tuple[int, dict[str, torch.Tensor] | None]:
        if not self.results:
            return -1, None
        r = max(self.results)
        return r, self.results[r]


def average(updates: list[dict[str, torch.Tensor]], weights: list[int]) -> dict[str, torch.Tensor]:
    total = float(sum(weights))
    return {k: sum(u[k].double() * (w / total) for u, w in zip(updates, weights)).to(updates[0][k].dtype)
            for k in updates[0]}
