"""Transports carry protocol messages between a client and the trunk server."""

from .base import Transport, WireStats
from .inprocess import InProcessTransport

__all__ = ["Transport", "WireStats", "InProcessTransport"]
