"""gRPC client side: the same ``call(msg) -> reply`` as the in-process transport, over the network.

The transport opens an authenticated session (handshake against the pinned server
identity), then seals every message with the session's AEAD, streams it in chunks and
opens the reply. Connection failures and a busy server are retried with exponential
backoff, starting a new session (a restarted server has forgotten the old one); a step
the server dropped raises ``StepAborted`` (the client runtime redoes it); any other
rejected message raises.
"""

from __future__ import annotations

import logging
import time

import grpc
import torch

from ..crypto import AeadSession, ClientHandshake, CryptoError, Identity, ServerHello
from ..errors import ProtocolError, StepAborted
from ..protocol.codec import decode, encode
from ..protocol.messages import Message
from . import chunking
from .base import WIRE_MESSAGE_BYTES, WireStats
from .proto import silotune_pb2 as pb
from .proto import silotune_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class PeerUnavailable(ProtocolError):
    """The server could not be reached within the retry budget."""


class GrpcTransport:
    def __init__(self, address: str, client_id: int, identity: Identity, server_public: bytes,
                 tls_root: bytes | None = None, wire_dtype: torch.dtype = torch.float32,
                 timeout: float = 600.0, retries: int = 8, backoff: float = 0.5,
                 max_message_bytes: int = 512 << 20, tls_server_name: str | None = None,
                 tls_client: tuple[bytes, bytes] | None = None):
        self.address, self.client_id = address, client_id
        self.identity, self.server_public = identity, server_public
        self.wire_dtype, self.timeout = wire_dtype, timeout
        self.retries, self.backoff, self.limit = retries, backoff, max_message_bytes
        options = [("grpc.max_receive_message_length", WIRE_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", WIRE_MESSAGE_BYTES)]
        if tls_server_name:
            options.append(("grpc.ssl_target_name_override", tls_server_name))
        if tls_root is not None:
            cert, key = tls_client or (None, None)  # (certificate, private key) for mutual TLS
            credentials = grpc.ssl_channel_credentials(tls_root, private_key=key, certificate_chain=cert)
            self.channel = grpc.secure_channel(address, credentials, options=options)
        else:
            self.channel = grpc.insecure_channel(address, options=options)
        self.stub = pb_grpc.SiloTuneStub(self.channel)
        self.session: AeadSession | None = None
        self.epoch = 0  # number of sessions opened: a change means the server may have restarted
        self.stats = WireStats()
        self.crypto_seconds = 0.0

    def connect(self) -> None:
        hs = ClientHandshake(self.client_id, self.identity, self.server_public)
        h = hs.hello
        reply = self.stub.Handshake(iter([pb.Hello(client_id=h.client_id, ephemeral=h.ephemeral, nonce=h.nonce,
                                                   signature=h.signature, timestamp_ms=h.timestamp_ms)]),
                                    timeout=self.timeout)
        keys = hs.finish(ServerHello(reply.session_id, reply.ephemeral, reply.nonce, reply.signature))
        self.session = AeadSession(keys, "client")
        self.epoch += 1

    def _exchange(self, blob: bytes, step: int) -> bytes:
        if self.session is None:
            self.connect()
        t0 = time.perf_counter()
        sealed = self.session.seal(blob, step)
        self.crypto_seconds += time.perf_counter() - t0
        chunks = [pb.Chunk(client_id=self.client_id, session_id=self.session.session_id, data=d, last=last)
                  for d, last in chunking.split(sealed)]
        replies = self.stub.Exchange(iter(chunks), timeout=self.timeout)
        envelope = chunking.join(((c.data, c.last) for c in replies), self.limit)
        t0 = time.perf_counter()
        plaintext, _ = self.session.open(envelope)
        self.crypto_seconds += time.perf_counter() - t0
        self.stats.add(sum(c.ByteSize() for c in chunks), len(envelope))
        return plaintext

    def call(self, msg: Message) -> Message:
        blob = encode(msg, self.wire_dtype)
        delay = self.backoff
        for attempt in range(self.retries + 1):
            try:
                return decode(self._exchange(blob, msg.step))
            except grpc.RpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "Concurrent RPC limit" in (exc.details() or ""):
                    code = grpc.StatusCode.UNAVAILABLE  # gRPC's own overload refusal: busy, retry
                if code in RETRYABLE and attempt < self.retries:
                    log.warning("client %d: server unreachable (%s), retrying in %.1fs", self.client_id,
                                code.name, delay)
                    self.session = None  # a restarted server has forgotten our session
                    time.sleep(delay)
                    delay = min(delay * 2, 30.0)
                    continue
                if code == grpc.StatusCode.UNAUTHENTICATED and "no session" in (exc.details() or "") \
                        and attempt < self.retries:
                    log.warning("client %d: server forgot our session (restarted?); reconnecting", self.client_id)
                    self.session = None
                    continue
                self.session = None  # after any refusal, start the next call from a fresh session
                if code == grpc.StatusCode.ABORTED:
                    raise StepAborted(exc.details()) from None
                if code == grpc.StatusCode.UNAUTHENTICATED:
                    raise CryptoError(f"server refused client {self.client_id}: {exc.details()}") from None
                if code in RETRYABLE:
                    raise PeerUnavailable(f"server {self.address} unreachable after {self.retries} retries "
                                          f"({code.name})") from None
                raise ProtocolError(f"server rejected {msg.kind} from client {self.client_id}: "
                                    f"{exc.details()}") from None
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.channel.close()
