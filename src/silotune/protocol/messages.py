"""The typed messages clients and the trunk server exchange; nothing else crosses the wire.

Tensors travel as tensors (dtype and shape preserved by the codec); everything else is
plain JSON-able metadata. A 4-D attention mask never travels: ``lengths`` is enough.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch


@dataclass
class Message:
    client: int
    step: int
    kind: ClassVar[str] = "message"


@dataclass
class ForwardActivations(Message):
    """Client -> server: the head's output ``h1`` (B, T, H) and per-sample lengths."""

    hidden: torch.Tensor = None
    lengths: torch.Tensor = None
    train: bool = True
    kind: ClassVar[str] = "forward"


@dataclass
class ReturnedActivations(Message):
    """Server -> client: the trunk's output ``h2`` for the same batch."""

    hidden: torch.Tensor = None
    kind: ClassVar[str] = "returned"


@dataclass
class Gradients(Message):
    """Client -> server ``dL/dh2``; server -> client ``dL/dh1``."""

    grad: torch.Tensor = None
    kind: ClassVar[str] = "gradients"


@dataclass
class Aggregation(Message):
    """Client -> server: its adapter tensors and example count; server -> client: the average."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    num_examples: int = 0
    round: int = 0
    kind: ClassVar[str] = "aggregation"


@dataclass
class Control(Message):
    """Session control: ``ack``, ``fetch_aggregate`` (payload: round), ``bye``, ``error``."""

    command: str = "ack"
    payload: dict = field(default_factory=dict)
    kind: ClassVar[str] = "control"


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.kind: cls for cls in (ForwardActivations, ReturnedActivations, Gradients, Aggregation, Control)
}
