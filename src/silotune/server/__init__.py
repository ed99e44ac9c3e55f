"""The trunk server runtime and its aggregation."""

from .aggregation import FedAvg
from .trunk import TrunkServer

__all__ = ["FedAvg", "TrunkServer"]
