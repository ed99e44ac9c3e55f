"""Privacy of a client's traffic against the trunk server: defences and their accounting."""

from .accounting import release_epsilon
from .defences import ClientDefence, PrivacySettings, defend_activations, defend_gradients

__all__ = ["ClientDefence", "PrivacySettings", "defend_activations", "defend_gradients", "release_epsilon"]
