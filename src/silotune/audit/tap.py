"""The server-side tap: a copy of exactly what the trunk server decodes, at chosen steps.

The audit wires every client to ``InProcessTransport(tap)`` where ``tap`` wraps the real
trunk server. The transport encodes each message to its wire bytes and decodes it, as a
network transport would; the tap receives that decoded message, keeps a copy of it,
hands the very same object to the server and passes the server's reply back. Nothing
the server computes changes: the tap is the curious operator reading its own inbox.

Recorded per (client, step) in ``steps``: the decoded ``h1`` and lengths of the forward
pass, the trunk's own output ``h2`` (the server computed it), and the ``dL/dh2`` the
client returned. Recorded always: every FedAvg update a client submitted (its head and
tail adapters, in the clear) and every average the server handed out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..protocol.messages import Aggregation, ForwardActivations, Gradients, Message, ReturnedActivations
from ..transport.base import Handler


@dataclass
class StepRecord:
    """What the server held of one client's training step."""

    client: int
    step: int
    h1: torch.Tensor
    lengths: torch.Tensor
    latest_round: int  # the last FedAvg round whose average this client had loaded (-1: none)
    h2: torch.Tensor | None = None
    grad: torch.Tensor | None = None  # dL/dh2 as received


@dataclass
class ServerTap:
    server: Handler
    steps: set[tuple[int, int]]  # (client, step) pairs to record
    records: dict[tuple[int, int], StepRecord] = field(default_factory=dict)
    updates: list[tuple[int, int, dict[str, torch.Tensor], int]] = field(default_factory=list)
    averages: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    loaded_round: dict[int, int] = field(default_factory=dict)

    def handle(self, msg: Message) -> Message:
        key = (msg.client, msg.step)
        if isinstance(msg, ForwardActivations) and msg.train and key in self.steps:
            self.records[key] = StepRecord(msg.client, msg.step, msg.hidden.clone(), msg.lengths.clone(),
                                           self.loaded_round.get(msg.client, -1))
        elif isinstance(msg, Gradients) and key in self.records:
            self.records[key].grad = msg.grad.clone()
        elif isinstance(msg, Aggregation):
            self.updates.append((msg.client, msg.round, {k: v.clone() for k, v in msg.tensors.items()},
                                 msg.num_examples))
        reply = self.server.handle(msg)
        if isinstance(reply, ReturnedActivations) and isinstance(msg, ForwardActivations) \
                and msg.train and key in self.records:
            self.records[key].h2 = reply.hidden.clone()
        if isinstance(reply, Aggregation):
            self.averages.setdefault(reply.round, {k: v.clone() for k, v in reply.tensors.items()})
            self.loaded_round[msg.client] = reply.round
        return reply

    def average_before(self, round_: int) -> tuple[int, dict[str, torch.Tensor] | None]:
        """The newest average the server had sent out up to ``round_`` (inclusive)."""
        done = [r for r in self.averages if r <= round_]
        return (max(done), self.averages[max(done)]) if done else (-1, None)
