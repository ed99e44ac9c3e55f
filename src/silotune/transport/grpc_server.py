"""gRPC server side: handshakes, per-client AEAD sessions, and the trunk server behind them.

Each request is a stream of chunks holding one sealed message. It is joined (with a size
limit), opened with the sending client's session (authenticated, in sequence), decoded,
checked to come from the client that owns the session, and handed to the handler; the
reply is encoded, sealed and streamed back. Every rejection is logged, counted by
reason and answered with a gRPC error status; the server keeps serving everyone else.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from concurrent import futures

import grpc
import torch

from ..crypto import AeadSession, ClientHello, CryptoError, Identity, server_accept
from ..errors import ProtocolError
from ..protocol.codec import decode, encode
from . import chunking
from .base import Handler
from .proto import silotune_pb2 as pb
from .proto import silotune_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

DEFAULT_LIMIT = 512 << 20  # largest accepted message (bytes)


class SiloTuneServicer(pb_grpc.SiloTuneServicer):
    def __init__(self, handler: Handler, identity: Identity, enrolled: dict[int, bytes],
                 wire_dtype: torch.dtype = torch.float32, max_message_bytes: int = DEFAULT_LIMIT):
        self.handler, self.identity, self.enrolled = handler, identity, enrolled
        self.wire_dtype, self.limit = wire_dtype, max_message_bytes
        self.sessions: dict[tuple[int, bytes], AeadSession] = {}
        self.rejected: Counter[str] = Counter()
        self.crypto_seconds = 0.0  # time spent sealing and opening messages
        self.lock = threading.Lock()

    def _reject(self, context, reason: str, code, detail: str):
        with self.lock:
            self.rejected[reason] += 1
        log.warning("rejected (%s): %s", reason, detail)
        context.abort(code, detail)

    def Handshake(self, request, context):
        hello = ClientHello(request.client_id, request.ephemeral, request.nonce, request.signature)
        try:
            reply, keys = server_accept(hello, self.identity, self.enrolled)
        except CryptoError as exc:
            self._reject(context, "handshake", grpc.StatusCode.UNAUTHENTICATED, str(exc))
        with self.lock:  # a new session replaces the client's old ones
            for key in [k for k in self.sessions if k[0] == hello.client_id]:
                del self.sessions[key]
            self.sessions[(hello.client_id, keys.session_id)] = AeadSession(keys, "server")
        log.info("client %d: session %s established", hello.client_id, keys.session_id.hex()[:8])
        return pb.HelloReply(session_id=reply.session_id, ephemeral=reply.ephemeral, nonce=reply.nonce,
                             signature=reply.signature)

    def Exchange(self, request_iterator, context):
        first = {}

        def pieces():
            for chunk in request_iterator:
                first.setdefault("id", (chunk.client_id, chunk.session_id))
                yield chunk.data, chunk.last

        try:
            envelope = chunking.join(pieces(), self.limit)
        except ProtocolError as exc:
            self._reject(context, "oversized", grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        session = self.sessions.get(first.get("id"))
        if session is None:
            self._reject(context, "no_session", grpc.StatusCode.UNAUTHENTICATED,
                         f"no session {first.get('id', (None, b''))[1].hex()[:8]} for client "
                         f"{first.get('id', (None,))[0]}: handshake first")
        try:
            with self.lock:
                t0 = time.perf_counter()
                plaintext, step = session.open(envelope)
                self.crypto_seconds += time.perf_counter() - t0
        except CryptoError as exc:
            self._reject(context, "crypto", grpc.StatusCode.UNAUTHENTICATED, str(exc))
        try:
            msg = decode(plaintext)
            if msg.client != session.client_id:
                raise ProtocolError(f"client {session.client_id} sent a message claiming to be client {msg.client}")
            reply = self.handler.handle(msg)
        except ProtocolError as exc:
            self._reject(context, "protocol", grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Exception as exc:  # a bug or a message we failed to foresee: refuse it, keep serving
            log.exception("client %d: internal error", session.client_id)
            self._reject(context, "internal", grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        blob = encode(reply, self.wire_dtype)
        with self.lock:
            t0 = time.perf_counter()
            sealed = session.seal(blob, step)
            self.crypto_seconds += time.perf_counter() - t0
        for piece, last in chunking.split(sealed):
            yield pb.Chunk(client_id=session.client_id, session_id=session.session_id, data=piece, last=last)


def start_server(servicer: SiloTuneServicer, address: str, tls: tuple[bytes, bytes] | None,
                 max_workers: int = 16, client_ca: bytes | None = None) -> tuple[grpc.Server, int]:
    """Start serving on ``address`` (e.g. '127.0.0.1:0'); returns the server and its port.

    ``tls`` is (certificate chain PEM, private key PEM); None serves without TLS (the AEAD
    layer still encrypts and authenticates every message). With ``client_ca`` the server
    requires mutual TLS: clients must present a certificate signed by that CA.
    """
    options = [("grpc.max_receive_message_length", 8 << 20), ("grpc.max_send_message_length", 8 << 20)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=options)
    pb_grpc.add_SiloTuneServicer_to_server(servicer, server)
    if tls is not None:
        credentials = grpc.ssl_server_credentials([(tls[1], tls[0])], root_certificates=client_ca,
                                                  require_client_auth=client_ca is not None)
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    server.start()
    return server, port
