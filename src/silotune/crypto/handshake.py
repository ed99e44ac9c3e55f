"""Authenticated key exchange that gives every client session its own keys.

Ephemeral X25519 on both sides, each hello signed by the sender's long-term Ed25519
identity (the client's enrolled on the server, the server's pinned by the client), and
HKDF-SHA256 over the shared secret, salted with the transcript hash, yielding one AEAD
key per direction. A peer client never learns another client's keys: they derive from
ephemeral secrets it does not hold.

    client -> server: ClientHello(client_id, eph_c, nonce_c, time_c, sig_c)
    server -> client: ServerHello(session_id, eph_s, nonce_s, [quote], sig_s over the transcript)

Freshness: the client signs the time it sent the hello; the server refuses a hello
outside a window around its own clock, and remembers every accepted (client, nonce)
until the window has passed, so a captured hello can never be replayed to establish
or replace a session.

TEE mode (``tee.attestation``): ``server_accept`` runs inside the enclave with an
``enclave`` attester, and the server hello carries the enclave's quote over eph_s, with
the client's nonce_c as the challenge, signed as part of the transcript. A client with
an ``attestation`` policy checks that quote (platform, measurement, eph_s, its own
nonce_c) before deriving any key and refuses a hello without one; its keys then exist
only inside the enclave. Without either, nothing changes. The enclave may answer without a
long-term server identity (``identity=None``; the client then passes ``server_public=None``):
the quote alone authenticates its ephemeral key, and both hellos are bound into the keys
through the transcript, so a relay that alters either only makes the keys disagree.
"""

from __future__ import annotations

import hashlib
import os
import struct
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .identity import CryptoError, Identity, verify

if TYPE_CHECKING:
    from ..tee.attestation import AttestationPolicy, Attester

LABEL = b"silotune-handshake-v1"


def _raw(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclass
class ClientHello:
    client_id: int
    ephemeral: bytes
    nonce: bytes
    signature: bytes = b""
    timestamp_ms: int = 0  # when the client made it (Unix time, milliseconds)

    def signed_part(self) -> bytes:
        return (LABEL + b"|client|" + struct.pack(">QQ", self.client_id, self.timestamp_ms) + self.ephemeral
                + self.nonce)


@dataclass
class ServerHello:
    session_id: bytes
    ephemeral: bytes
    nonce: bytes
    signature: bytes = b""
    quote: bytes = b""  # the enclave's attestation quote over `ephemeral` (TEE mode); empty otherwise

    def signed_part(self, hello: ClientHello) -> bytes:
        part = hello.signed_part() + hello.signature + b"|server|" + self.session_id + self.ephemeral + self.nonce
        if self.quote:
            part += b"|quote|" + struct.pack(">I", len(self.quote)) + self.quote
        return part


@dataclass
class SessionKeys:
    client_id: int
    session_id: bytes
    client_to_server: bytes
    server_to_client: bytes


def _derive(secret: bytes, transcript: bytes, client_id: int, session_id: bytes) -> SessionKeys:
    okm = HKDF(algorithm=hashes.SHA256(), length=64, salt=hashlib.sha256(transcript).digest(),
               info=LABEL + b"|keys").derive(secret)
    return SessionKeys(client_id, session_id, okm[:32], okm[32:])


class ClientHandshake:
    """The client's side. With ``attestation`` (TEE mode) the server must be an attested enclave: its hello's
    quote must bind the expected measurement to its ephemeral key and this hello's nonce."""

    def __init__(self, client_id: int, identity: Identity, server_public: bytes | None,
                 attestation: AttestationPolicy | None = None):
        if server_public is None and attestation is None:
            raise ValueError("a server hello is authenticated by the pinned server identity or an enclave quote: "
                             "give server_public or attestation")
        self.identity, self.server_public, self.attestation = identity, server_public, attestation
        self.ephemeral = X25519PrivateKey.generate()
        self.hello = ClientHello(client_id, _raw(self.ephemeral), os.urandom(16),
                                 timestamp_ms=int(time.time() * 1000))
        self.hello.signature = identity.sign(self.hello.signed_part())

    def finish(self, reply: ServerHello) -> SessionKeys:
        transcript = reply.signed_part(self.hello)
        if self.server_public is not None and not verify(self.server_public, reply.signature, transcript):
            raise CryptoError("server hello: bad signature (not the pinned server identity)")
        if self.attestation is not None:  # before any key exists: AttestationError unless the enclave is attested
            self.attestation.check(reply.quote, reply.ephemeral, self.hello.nonce)
        secret = _exchange(self.ephemeral, reply.ephemeral, "server hello")
        return _derive(secret, transcript + reply.signature, self.hello.client_id, reply.session_id)


def _exchange(private: X25519PrivateKey, public: bytes, where: str) -> bytes:
    """X25519 with a peer's raw public key; CryptoError for a malformed or low-order (e.g. all-zero) key."""
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as exc:
        raise CryptoError(f"{where}: unusable ephemeral key ({exc})") from None


class ReplayGuard:
    """Refuses hellos outside a time window and any (client, nonce) already accepted within it."""

    def __init__(self, window: float = 300.0, clock=time.time):
        self.window, self.clock = window, clock
        self.seen: dict[tuple[int, bytes], float] = {}  # accepted hello -> when it may be forgotten
        self._lock = threading.Lock()

    def check(self, hello: ClientHello) -> None:
        now = self.clock()
        skew = now - hello.timestamp_ms / 1000
        if abs(skew) > self.window:
            raise CryptoError(f"handshake from client {hello.client_id}: hello is {skew:+.0f}s from the server's "
                              f"clock (window {self.window:.0f}s): stale or replayed")
        with self._lock:
            for key in [k for k, until in self.seen.items() if until < now]:
                del self.seen[key]
            key = (hello.client_id, hello.nonce)
            if key in self.seen:
                raise CryptoError(f"handshake from client {hello.client_id}: replayed hello")
            self.seen[key] = hello.timestamp_ms / 1000 + self.window + 1


def server_accept(hello: ClientHello, identity: Identity | None, enrolled: dict[int, bytes],
                  replay: ReplayGuard | None = None,
                  enclave: Attester | None = None) -> tuple[ServerHello, SessionKeys]:
    """Check a client hello against the enrollment list (and, with ``replay``, its freshness) and answer
    it; CryptoError if it fails. With ``enclave`` (TEE mode: call this inside the enclave, so the ephemeral
    secret and the session keys never leave it) the answer carries the enclave's quote over its ephemeral
    key, with the client's nonce as the challenge; it may then go unsigned (``identity=None``)."""
    if identity is None and enclave is None:
        raise ValueError("only an attested enclave may answer a hello without a server identity")
    public = enrolled.get(hello.client_id)
    if public is None:
        raise CryptoError(f"handshake from unknown client {hello.client_id}")
    if len(hello.ephemeral) != 32 or len(hello.nonce) != 16:
        raise CryptoError(f"handshake from client {hello.client_id}: malformed hello")
    if not verify(public, hello.signature, hello.signed_part()):
        raise CryptoError(f"handshake from client {hello.client_id}: bad signature")
    if replay is not None:
        replay.check(hello)
    ephemeral = X25519PrivateKey.generate()
    quote = b"" if enclave is None else enclave.quote(_raw(ephemeral), hello.nonce).to_bytes()
    reply = ServerHello(os.urandom(16), _raw(ephemeral), os.urandom(16), quote=quote)
    transcript = reply.signed_part(hello)
    reply.signature = identity.sign(transcript) if identity is not None else b""
    secret = _exchange(ephemeral, hello.ephemeral, f"handshake from client {hello.client_id}")
    return reply, _derive(secret, transcript + reply.signature, hello.client_id, reply.session_id)
