"""Long-term identities: Ed25519 signing keys for the server and every enrolled client.

Keys are stored as PEM files (private keys written atomically with mode 0600); a
server's enrollment file maps client ids to their public keys. Every primitive comes
from the ``cryptography`` package.

Every private key file SiloTune reads (identity keys here, TLS keys in ``deploy.py``) goes
through ``read_private_key``: on POSIX systems it must be owned by the current user and
not readable or writable by group or others (``chmod 600``), else CryptoError, unless the
caller passes ``allow_insecure`` (config ``deploy.allow_insecure_keys``), which only warns.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..atomic import atomic_write
from ..errors import SiloTuneError

log = logging.getLogger(__name__)


class CryptoError(SiloTuneError):
    """A failed handshake, signature, decryption, replay check or key file."""


def raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _read_key_file(path: Path, what: str = "private key") -> tuple[bytes, os.stat_result]:
    """A key file's bytes and the status of that very file (read through one descriptor)."""
    try:
        with open(path, "rb") as f:
            return f.read(), os.fstat(f.fileno())
    except FileNotFoundError:
        raise CryptoError(f"{what} {path} not found (create the deployment keys with 'silotune keys')") from None
    except OSError as exc:
        raise CryptoError(f"{what} {path} is unreadable ({exc.strerror or exc})") from None


def check_private_key(path: str | Path, st: os.stat_result | None = None, allow_insecure: bool = False) -> None:
    """Refuse a private key file that group or others may read or write, or that another user owns.

    ``st`` is the file's status when the caller already has it. With ``allow_insecure`` a
    violation is logged as a warning instead. Not checked where file modes are not POSIX."""
    if os.name != "posix":
        return
    st = os.stat(path) if st is None else st
    mode = st.st_mode & 0o777
    problems, fixes = [], []
    if mode & 0o077:
        problems.append(f"has mode {mode:04o} (group/others may access it)")
        fixes.append(f"chmod 600 {path}")
    if st.st_uid != os.getuid():
        problems.append(f"is owned by uid {st.st_uid}, not the current user (uid {os.getuid()})")
        fixes.append(f"chown {os.getuid()} {path}")
    if not problems:
        return
    message = f"private key {path} {' and '.join(problems)}; fix: {' && '.join(fixes)}"
    if not allow_insecure:
        raise CryptoError(message + " (or set deploy.allow_insecure_keys: true to go on anyway)")
    log.warning("INSECURE PRIVATE KEY: %s; going on because deploy.allow_insecure_keys is set", message)


def read_private_key(path: str | Path, allow_insecure: bool = False) -> bytes:
    """The bytes of a private key file, after ``check_private_key``."""
    path = Path(path)
    data, st = _read_key_file(path)
    check_private_key(path, st, allow_insecure)
    return data


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
    def load(cls, path: str | Path, allow_insecure: bool = False) -> "Identity":
        """The identity in a PEM file; the file's permissions are checked (``check_private_key``)."""
        return cls(load_ed25519_key(path, "identity key", allow_insecure))


def load_ed25519_key(path: str | Path, what: str, allow_insecure: bool = False, error=CryptoError) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM file whose permissions pass ``check_private_key``; ``error`` (a
    CryptoError subclass) names what went wrong and where."""
    path = Path(path)
    try:
        data, st = _read_key_file(path, what)
    except CryptoError as exc:
        raise error(str(exc)) from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise error(f"{what} {path}: not a PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise error(f"{what} {path}: expected an Ed25519 key")
    check_private_key(path, st, allow_insecure)
    return key


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
