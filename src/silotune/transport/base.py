"""What a transport is: a way for a client to send one message and get the reply.

Training code holds a ``Transport`` and calls ``call``; it never knows whether the
server is in this process or across the network. Every transport counts the bytes it
carries in each direction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ..protocol.messages import Message
from .chunking import CHUNK_BYTES

WIRE_MESSAGE_BYTES = CHUNK_BYTES + (64 << 10)  # one chunk and its framing: the largest gRPC message either side takes


@dataclass
class WireStats:
    bytes_up: int = 0
    bytes_down: int = 0
    messages: int = 0

    def add(self, up: int, down: int) -> None:
        self.bytes_up += up
        self.bytes_down += down
        self.messages += 1

    @property
    def total(self) -> int:
        return self.bytes_up + self.bytes_down


class Handler(Protocol):
    """The server side: takes one decoded message, returns the reply."""

    def handle(self, msg: Message) -> Message: ...


class Transport(Protocol):
    stats: WireStats
    epoch: int  # sessions opened so far; it changes when the transport had to reconnect

    def call(self, msg: Message) -> Message: ...
