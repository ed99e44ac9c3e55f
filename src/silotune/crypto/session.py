"""AEAD channel of one client session: every message sealed, ordered and bound to its context.

Each message is sealed with AES-256-GCM under the key of its direction. The 96-bit nonce
is the direction tag and a 64-bit sequence number, so no nonce ever repeats under a key.
The associated data binds client id, session id, step, direction, sequence number and
the caller's context (what the message is, e.g. ``forward``); the receiver accepts only
the next sequence number, which rejects replays and reordering, and any tampering fails
the tag check. A channel through an untrusted relay (``ordered=False``: a client's
session with the server's enclave, relayed by the host) accepts any later sequence
number instead, since the relay may drop a message; replays and reordering are still
refused.

Envelope: seq (8 bytes) | step (8 bytes) | ciphertext with tag.
"""

from __future__ import annotations

import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .handshake import SessionKeys
from .identity import CryptoError

UP, DOWN = 1, 2  # client -> server, server -> client
_HEADER = struct.Struct(">QQ")
_MAX_SEALED = 2**31 - 1  # longer, and the AES-GCM backend panics (a PanicException, not an Exception)


class AeadSession:
    def __init__(self, keys: SessionKeys, role: str, ordered: bool = True):
        if role not in ("client", "server"):
            raise ValueError(role)
        self.ordered = ordered
        self.client_id, self.session_id = keys.client_id, keys.session_id
        up, down = AESGCM(keys.client_to_server), AESGCM(keys.server_to_client)
        self.send_dir, self.recv_dir = (UP, DOWN) if role == "client" else (DOWN, UP)
        self.send_aead, self.recv_aead = (up, down) if role == "client" else (down, up)
        self.send_seq = 0
        self.recv_seq = 0

    def _ad(self, direction: int, seq: int, step: int, context: bytes) -> bytes:
        return struct.pack(">QBQQ", self.client_id, direction, seq, step) + self.session_id + context

    @staticmethod
    def _nonce(direction: int, seq: int) -> bytes:
        return struct.pack(">IQ", direction, seq)

    def seal(self, plaintext: bytes, step: int, context: bytes = b"") -> bytes:
        seq = self.send_seq
        self.send_seq += 1
        ct = self.send_aead.encrypt(self._nonce(self.send_dir, seq), plaintext,
                                    self._ad(self.send_dir, seq, step, context))
        return _HEADER.pack(seq, step) + ct

    def open(self, envelope: bytes, context: bytes = b"") -> tuple[bytes, int]:
        """(plaintext, step); CryptoError (and nothing else) on a replayed, reordered, truncated, oversized or
        tampered message, or one sealed for another ``context``."""
        if len(envelope) < _HEADER.size + 16:
            raise CryptoError(f"client {self.client_id}: truncated message")
        if len(envelope) - _HEADER.size > _MAX_SEALED:
            raise CryptoError(f"client {self.client_id}: message of {len(envelope)} bytes is too large to open")
        seq, step = _HEADER.unpack_from(envelope)
        if seq < self.recv_seq or (self.ordered and seq != self.recv_seq):
            kind = "replayed" if seq < self.recv_seq else "out-of-order"
            raise CryptoError(f"client {self.client_id}: {kind} message (sequence {seq}, expected {self.recv_seq})")
        try:
            plaintext = self.recv_aead.decrypt(self._nonce(self.recv_dir, seq), envelope[_HEADER.size:],
                                               self._ad(self.recv_dir, seq, step, context))
        except InvalidTag:
            raise CryptoError(f"client {self.client_id}: message failed authentication (tampered)") from None
        self.recv_seq = seq + 1
        return plaintext, step
