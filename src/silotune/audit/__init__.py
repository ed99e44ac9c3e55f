"""Attacks SiloTune runs against its own wire, to measure what still leaks."""

from .peer_inversion import invert, peer_attack

__all__ = ["invert", "peer_attack"]
