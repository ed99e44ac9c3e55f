"""Sealed enclave state: the enclave's trunk adapters and optimizer state, encrypted so only the same enclave
(same measurement, same platform) can read them back.

With ``tee.release_trunk: false`` the enclave never hands its trained trunk out in the clear. Its
checkpoints and the trunk a deployment's server writes at the end are *sealed*: ``torch.save`` of
the runtime's state, encrypted with AES-256-GCM under the platform's sealing key for the
enclave's measurement (``AttestationBackend.sealing_key``), a fresh 96-bit nonce per seal, and
the measurement as associated data. An enclave built from other code or another configuration
derives another key and cannot open it; any change to the blob fails authentication. The host
stores and restores the blob like any other state, and learns only its size.

Blob: magic ``SILOSEAL`` | nonce (12 bytes) | ciphertext with tag.
"""

from __future__ import annotations

import io
import os

import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..errors import SiloTuneError

MAGIC = b"SILOSEAL"
LABEL = b"silotune-sealed-state-v1|"


class SealingError(SiloTuneError):
    """Sealed state that this enclave cannot open: another enclave's, or altered."""


def seal_state(state: dict, key: bytes, measurement: bytes) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    nonce = os.urandom(12)
    return MAGIC + nonce + AESGCM(key).encrypt(nonce, buffer.getvalue(), LABEL + measurement)


def open_state(blob: bytes, key: bytes, measurement: bytes) -> dict:
    """The state sealed in ``blob``; SealingError if it is not sealed for this enclave or was altered."""
    if len(blob) < len(MAGIC) + 12 + 16 or blob[:len(MAGIC)] != MAGIC:
        raise SealingError("not sealed enclave state (bad magic or truncated)")
    nonce, body = blob[len(MAGIC):len(MAGIC) + 12], blob[len(MAGIC) + 12:]
    try:
        payload = AESGCM(key).decrypt(nonce, body, LABEL + measurement)
    except InvalidTag:
        raise SealingError("sealed state does not open: sealed by an enclave with another measurement or platform, "
                           "or altered") from None
    return torch.load(io.BytesIO(payload), weights_only=True)


__all__ = ["seal_state", "open_state", "SealingError"]
