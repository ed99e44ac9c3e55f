"""Long-term identities: Ed25519 signing keys for the server and every enrolled client.

Keys are stored as PEM files (private keys written atomically with mode 0600); a
server's enrollment file maps client ids to their public keys. Every primitive comes
from the ``cryptography`` package.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..atomic import atomic_write
from ..errors import SiloTuneError


class CryptoError(SiloTuneError):
    """A failed handshake, signature, decryption, replay check or key file."""


def raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def fingerprint(public: bytes) -> str:
    return hashlib.sha256(public).hexdigest()[:16]


@dataclass
class Identity:
    key: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> "Identity":
        return cls(Ed25519PrivateKey.generate())

    @property
    def public(self) -> bytes:
        return raw_public(self.key.public_key())

    def sign(self, data: bytes) -> bytes:
        return self.key.sign(data)

    def save(self, path: str | Path) -> None:
        atomic_write(path, self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()), mode=0o600)

    @classmethod
    def load(cls, path: str | Path) -> "Identity":
        path = Path(path)
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except FileNotFoundError:
            raise CryptoError(f"identity key {path} not found (create one with 'silotune keys')") from None
        except (ValueError, TypeError) as exc:
            raise CryptoError(f"identity key {path}: not a PEM private key ({exc})") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise CryptoError(f"identity key {path}: expected an Ed25519 key")
        return cls(key)


def verify(public: bytes, signature: bytes, data: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, data)
        return True
    except (InvalidSignature, ValueError):
        return False


def save_enrollment(path: str | Path, clients: dict[int, bytes]) -> None:
    text = json.dumps({str(k): v.hex() for k, v in sorted(clients.items())}, indent=2)
    atomic_write(path, text, mode=0o600)


def load_enrollment(path: str | Path) -> dict[int, bytes]:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        return {int(k): bytes.fromhex(v) for k, v in data.items()}
    except FileNotFoundError:
        raise CryptoError(f"enrollment file {path} not found") from None
    except (ValueError, AttributeError) as exc:
        raise CryptoError(f"enrollment file {path}: malformed ({exc})") from None
