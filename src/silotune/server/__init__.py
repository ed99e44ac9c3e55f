"""The trunk server runtime and its aggregation."""

from .aggregation import Aggregator
from .trunk import TrunkServer

__all__ = ["Aggregator", "TrunkServer"]
