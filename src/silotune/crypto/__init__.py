"""Identities, the authenticated key exchange and per-client AEAD sessions."""

from .handshake import ClientHandshake, ClientHello, ServerHello, SessionKeys, server_accept
from .identity import CryptoError, Identity, load_enrollment, save_enrollment
from .session import AeadSession

__all__ = ["CryptoError", "Identity", "ClientHandshake", "ClientHello", "ServerHello", "SessionKeys",
           "server_accept", "AeadSession", "load_enrollment", "save_enrollment"]
