"""In-process transport: the real client and server code, wired without a network.

Messages are still encoded to bytes and decoded on the other side, so no tensor,
autograd graph or object is shared between the parties, the bytes are counted exactly
as a network transport would count them, and the wire dtype behaves the same.
"""

from __future__ import annotations

import torch

from ..protocol.codec import decode, encode
from ..protocol.messages import Message
from .base import Handler, WireStats


class InProcessTransport:
    def __init__(self, handler: Handler, wire_dtype: torch.dtype = torch.float32):
        self.handler = handler
        self.wire_dtype = wire_dtype
        self.stats = WireStats()
        self.epoch = 1  # sessions opened (an in-process server never restarts)

    def call(self, msg: Message) -> Message:
        up = encode(msg, self.wire_dtype)
        reply = self.handler.handle(decode(up))
        down = encode(reply, self.wire_dtype)
        self.stats.add(len(up), len(down))
        return decode(down)
