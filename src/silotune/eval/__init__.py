"""Metrics and evaluation loops."""

from .loop import classify, evaluate, generate
from .metrics import accuracy, rouge

__all__ = ["accuracy", "rouge", "classify", "generate", "evaluate"]
