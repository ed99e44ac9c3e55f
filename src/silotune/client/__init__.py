"""The client (data owner) runtime."""

from .runtime import SplitClient

__all__ = ["SplitClient"]
