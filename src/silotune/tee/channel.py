"""The channel between a client and the server's enclave: what the server's host relays but cannot read.

In TEE mode (``tee.mode: server``) a client's ``h1``, the ``h2`` it gets back and the gradients both
ways are sealed under keys that exist only in that client and inside the enclave; the host carries
them as ``EnclaveMessage`` ciphertext (``protocol/messages.py``), knowing only their batch and
sequence sizes.

- ``SealedTransport``, the client's end, wraps the client's transport to the server, so training
  code does not know. Its first call opens a session with the enclave: the handshake of
  ``crypto/handshake.py`` (the client's hello signed by its identity; the enclave's answer carrying
  its quote over its ephemeral key with the client's nonce as the challenge), verified against the
  client's ``AttestationPolicy`` before any key exists; an enclave that does not attest is refused
  before anything else is sent. Then every ``forward``, ``gradients`` and FedAvg update message is
  encoded, sealed (AES-256-GCM, bound to client, session, step and kind) and sent; the sealed answer
  is opened and checked to answer exactly that message, and so is an average the host relays in
  answer to ``join`` or ``fetch_aggregate``. Control messages (join, fetch, bye) go to the host as
  before. When the transport reconnects (a restarted server is a new enclave), the next call first
  opens a new session.
- ``EnclaveSessions``, the enclave's end, answers hellos inside the enclave (the ephemeral secret and
  the session keys never leave it), opens what clients sealed, runs the boundary's checks on what
  it opened (the host cannot: shapes, dtypes, finite values, lengths) and seals its answers.

The relay may drop or delay messages (a session accepts any later sequence number), never replay,
reorder, swap or alter one: each of those fails authentication and is refused.
"""

from __future__ import annotations

import struct
import threading

import torch

from ..crypto.handshake import ClientHandshake, ClientHello, ReplayGuard, ServerHello, server_accept
from ..crypto.identity import CryptoError, Identity
from ..crypto.session import AeadSession
from ..errors import ProtocolError
from ..protocol.codec import decode, encode
from ..protocol.messages import (
    Aggregation,
    EnclaveMessage,
    ForwardActivations,
    Gradients,
    Message,
    ReturnedActivations,
    SealedTensor,
)

HELLO = struct.Struct(">QQ32s16s64s")  # client id, time (ms), ephemeral key, nonce, signature
WELCOME = struct.Struct(">16s32s16s")  # session id, ephemeral key, nonce; the quote follows
ANSWER = {"forward": "returned", "gradients": "gradients"}  # what the enclave answers each sealed kind with
NO_SESSION = "no enclave session"  # the enclave's refusal when a client has no session (e.g. it restarted)
INNER = {"forward": ForwardActivations, "returned": ReturnedActivations, "gradients": Gradients,
         "update": Aggregation, "aggregate": Aggregation}


def as_bytes(data) -> bytes:
    """An ``EnclaveMessage``'s data (a uint8 tensor) as bytes."""
    return data.numpy().tobytes() if isinstance(data, torch.Tensor) else bytes(data)


def as_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)


def hello_bytes(hello: ClientHello) -> bytes:
    return HELLO.pack(hello.client_id, hello.timestamp_ms, hello.ephemeral, hello.nonce, hello.signature)


def hello_from(data: bytes) -> ClientHello:
    if len(data) != HELLO.size:
        raise CryptoError(f"enclave hello of {len(data)} bytes (expected {HELLO.size})")
    client, when, ephemeral, nonce, signature = HELLO.unpack(data)
    return ClientHello(client, ephemeral, nonce, signature, when)


def welcome_bytes(reply: ServerHello) -> bytes:
    return WELCOME.pack(reply.session_id, reply.ephemeral, reply.nonce) + reply.quote


def welcome_from(data: bytes) -> ServerHello:
    if len(data) < WELCOME.size:
        raise CryptoError(f"enclave welcome of {len(data)} bytes (at least {WELCOME.size} expected)")
    session_id, ephemeral, nonce = WELCOME.unpack_from(data)
    return ServerHello(session_id, ephemeral, nonce, quote=data[WELCOME.size:])


def _shape(msg: Message) -> tuple[int, ...]:
    if isinstance(msg, Aggregation):
        return ()
    t = msg.hidden if isinstance(msg, (ForwardActivations, ReturnedActivations)) else msg.grad
    return tuple(t.shape)


class SealedTransport:
    """A client's transport in TEE mode: ``forward`` and ``gradients`` messages travel sealed to the enclave."""

    def __init__(self, transport, client_id: int, identity: Identity, policy, wire_dtype: torch.dtype = torch.float32):
        """``policy``: the client's ``AttestationPolicy`` (the platform it trusts, the measurement it expects)."""
        self.inner, self.client_id, self.identity, self.policy = transport, client_id, identity, policy
        self.wire_dtype = wire_dtype
        self.session: AeadSession | None = None
        self.quote = None  # the accepted quote of the enclave this session ends in
        self._epoch = None

    @property
    def stats(self):
        return self.inner.stats

    @property
    def epoch(self) -> int:
        return self.inner.epoch

    def connect(self):
        """Open a session with the enclave; returns its accepted quote. ``AttestationError`` (before any key
        exists or anything else is sent) if the enclave does not attest, ``CryptoError`` if the handshake fails."""
        from .attestation import Quote

        hs = ClientHandshake(self.client_id, self.identity, None, attestation=self.policy)
        reply = self.inner.call(EnclaveMessage(self.client_id, 0, of="hello", data=as_tensor(hello_bytes(hs.hello))))
        if not isinstance(reply, EnclaveMessage) or reply.of != "welcome":
            raise ProtocolError(f"client {self.client_id}: expected the enclave's welcome, the server sent "
                                f"{reply.kind}" + (f" ({reply.of})" if isinstance(reply, EnclaveMessage) else ""))
        welcome = welcome_from(as_bytes(reply.data))
        keys = hs.finish(welcome)  # verifies the quote first
        self.session = AeadSession(keys, "client", ordered=False)
        self.quote = Quote.from_bytes(welcome.quote)
        self._epoch = self.inner.epoch
        return self.quote

    def _open_aggregate(self, reply: EnclaveMessage, step: int) -> Aggregation:
        plaintext, sealed_step = self.session.open(as_bytes(reply.data), b"aggregate")
        answer = decode(plaintext)
        if not isinstance(answer, Aggregation) or answer.client != self.client_id or answer.round != reply.round \
                or answer.step != step or sealed_step != step:
            raise CryptoError(f"client {self.client_id}: the enclave's average is for another request")
        return answer

    def call(self, msg: Message) -> Message:
        """Send ``msg`` (sealed if it carries the client's tensors); if the transport reconnected during the call
        and the server's new enclave knows no session of ours, open one and send it again (once)."""
        for attempt in (0, 1):
            if self.session is None or self.inner.epoch != self._epoch:  # first call, or the server restarted
                self.connect()
            epoch = self.inner.epoch
            try:
                return self._call(msg)
            except ProtocolError as exc:
                if attempt or self.inner.epoch == epoch or NO_SESSION not in str(exc):
                    raise
        raise AssertionError("unreachable")

    def _call(self, msg: Message) -> Message:
        if isinstance(msg, Aggregation):  # a FedAvg update: sealed to the enclave, which averages
            envelope = self.session.seal(encode(msg, self.wire_dtype), msg.step, b"update")
            return self.inner.call(EnclaveMessage(msg.client, msg.step, of="update", data=as_tensor(envelope),
                                                  round=msg.round))
        if not isinstance(msg, (ForwardActivations, Gradients)):
            reply = self.inner.call(msg)
            if isinstance(reply, EnclaveMessage) and reply.of == "aggregate":  # join / fetch_aggregate
                return self._open_aggregate(reply, msg.step)
            return reply
        rows, tokens = _shape(msg)[:2]
        envelope = self.session.seal(encode(msg, self.wire_dtype), msg.step, msg.kind.encode())
        reply = self.inner.call(EnclaveMessage(msg.client, msg.step, of=msg.kind, data=as_tensor(envelope),
                                               rows=rows, tokens=tokens, train=getattr(msg, "train", True)))
        want = ANSWER[msg.kind]
        if not isinstance(reply, EnclaveMessage) or reply.of != want:
            raise ProtocolError(f"client {self.client_id} step {msg.step}: expected the enclave's sealed {want}, "
                                f"the server sent {reply.kind}")
        plaintext, step = self.session.open(as_bytes(reply.data), want.encode())
        answer = decode(plaintext)
        if not isinstance(answer, INNER[want]) or answer.client != msg.client or answer.step != msg.step \
                or step != msg.step or _shape(answer)[:2] != (rows, tokens):
            raise CryptoError(f"client {self.client_id} step {msg.step}: the enclave's answer is for another message")
        return answer

    def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()


class EnclaveSessions:
    """Inside the enclave: one session per client, opened by an attested handshake."""

    def __init__(self, attester, enrolled: dict[int, bytes], boundary, wire_dtype: torch.dtype = torch.float32,
                 window: float = 300.0):
        """``boundary``: the enclave's boundary checks (its ``refuse`` makes the errors the host counts)."""
        self.attester, self.enrolled, self.boundary, self.wire_dtype = attester, enrolled, boundary, wire_dtype
        self.replay = ReplayGuard(window)
        self.sessions: dict[int, AeadSession] = {}
        self._lock = threading.Lock()

    def hello(self, client: int, data: bytes) -> bytes:
        """Answer a client's hello (relayed by the host on behalf of ``client``) with the enclave's welcome."""
        where = f"client {client}"
        try:
            hello = hello_from(data)
            if hello.client_id != client:
                raise CryptoError(f"hello names client {hello.client_id}")
            reply, keys = server_accept(hello, None, self.enrolled, self.replay, enclave=self.attester)
        except CryptoError as exc:
            raise self.boundary.refuse("handshake", where, f"enclave handshake: {exc}") from None
        with self._lock:
            self.sessions[client] = AeadSession(keys, "server", ordered=False)  # a new session replaces the old
        return welcome_bytes(reply)

    def open(self, sealed: SealedTensor, shape: tuple[int, ...] | None = None) -> Message:
        """The message a client sealed, after every boundary check; ``shape``: the gradient's expected shape."""
        where = f"client {sealed.client} step {sealed.step}"
        with self._lock:
            session = self.sessions.get(sealed.client)
        if session is None:
            raise self.boundary.refuse("no_session", where, f"{NO_SESSION}: handshake with the enclave first")
        try:
            plaintext, step = session.open(sealed.data, sealed.of.encode())
        except CryptoError as exc:
            raise self.boundary.refuse("crypto", where, f"sealed {sealed.of}: {exc}") from None
        try:
            msg = decode(plaintext)
        except ProtocolError as exc:
            raise self.boundary.refuse("malformed", where, f"sealed {sealed.of}: {exc}") from None
        if not isinstance(msg, INNER[sealed.of]) or msg.client != sealed.client or msg.step != sealed.step \
                or step != sealed.step:
            raise self.boundary.refuse("relay", where, f"sealed {sealed.of} holds {msg.kind} of client {msg.client} "
                                       f"step {msg.step}: not what the host relayed it as")
        if isinstance(msg, Aggregation):
            if msg.round != sealed.round:
                raise self.boundary.refuse("relay", where, f"sealed update for round {msg.round} relayed as round "
                                           f"{sealed.round}")
            return msg  # the aggregator checks its layout, values and example count
        if isinstance(msg, ForwardActivations):
            self.boundary.activations(sealed.client, sealed.step, msg.hidden, msg.lengths)
            if msg.train != sealed.train:
                raise self.boundary.refuse("relay", where, "the host relayed a forward with the wrong train flag")
            if msg.cache or msg.past:
                raise self.boundary.refuse("unexpected", where, "an enclave keeps no generation caches: generate "
                                           "without a cache")
        else:
            self.boundary.gradient(sealed.client, sealed.step, msg.grad, shape)
        if _shape(msg)[:2] != tuple(sealed.shape[:2]):
            raise self.boundary.refuse("relay", where, f"sealed {sealed.of} of shape {_shape(msg)} relayed as "
                                       f"{tuple(sealed.shape)}")
        return msg

    def seal(self, client: int, reply: Message) -> bytes:
        """``reply`` (``returned``, ``gradients``, or an ``Aggregation``: the average) sealed for ``client``."""
        with self._lock:
            session = self.sessions.get(client)
        if session is None:
            raise self.boundary.refuse("no_session", f"client {client}", f"{NO_SESSION}: handshake first")
        context = b"aggregate" if isinstance(reply, Aggregation) else reply.kind.encode()
        return session.seal(encode(reply, self.wire_dtype), reply.step, context)


__all__ = ["SealedTransport", "EnclaveSessions", "as_bytes", "as_tensor"]
