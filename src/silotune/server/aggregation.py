"""Federated averaging of the clients' head and tail adapters, weighted by example counts."""

from __future__ import annotations

import torch

from ..errors import ProtocolError


class FedAvg:
    """Collects one update per client per round; the average is ready once all have arrived."""

    def __init__(self, n_clients: int):
        self.n_clients = n_clients
        self.updates: dict[int, dict[int, tuple[dict[str, torch.Tensor], int]]] = {}
        self.results: dict[int, dict[str, torch.Tensor]] = {}

    def submit(self, client: int, round_: int, tensors: dict[str, torch.Tensor], num_examples: int) -> None:
        if not 0 <= client < self.n_clients:
            raise ProtocolError(f"aggregation from unknown client {client}")
        if num_examples <= 0:
            raise ProtocolError(f"client {client}: aggregation with {num_examples} examples")
        pending = self.updates.setdefault(round_, {})
        if pending:
            ref = next(iter(pending.values()))[0]
            if set(ref) != set(tensors) or any(ref[k].shape != tensors[k].shape for k in ref):
                raise ProtocolError(f"client {client}: round {round_} update does not match the others' tensors")
        pending[client] = (tensors, num_examples)
        if len(pending) == self.n_clients:
            self.results[round_] = average([u for u, _ in pending.values()], [n for _, n in pending.values()])
            del self.updates[round_]
            self.results.pop(round_ - 2, None)

    def result(self, round_: int) -> dict[str, torch.Tensor] | None:
        return self.results.get(round_)


def average(updates: list[dict[str, torch.Tensor]], weights: list[int]) -> dict[str, torch.Tensor]:
    total = float(sum(weights))
    return {k: sum(u[k].double() * (w / total) for u, w in zip(updates, weights)).to(updates[0][k].dtype)
            for k in updates[0]}
