"""gRPC server side: handshakes, per-client AEAD sessions, and the trunk server behind them.

Nothing is buffered or computed for a stranger. Every call is first admitted
(``admission.py``: per-connection and total limits on calls that have not yet
authenticated, deadlines enforced by a watchdog). A handshake is one signed, fresh
hello (``crypto.handshake``: a replayed hello never establishes or replaces a session).
A request is a stream of chunks holding one sealed message: its first chunk must name
a live session before anything more is read; then the rest is joined (within the byte
limit), opened with that session's AEAD (authenticated, in sequence), decoded, checked
to come from the client that owns the session, and handed to the handler, whose own
boundary checks run before any state is touched. The reply is sealed and streamed
back. Every refusal is logged, counted by reason and answered with a gRPC status;
the server keeps serving everyone else.
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
from ..crypto.handshake import ReplayGuard
from ..errors import ProtocolError, StepAborted
from ..protocol.codec import decode, encode
from . import chunking
from .admission import Admission, AdmissionSettings
from .base import WIRE_MESSAGE_BYTES, Handler
from .proto import silotune_pb2 as pb
from .proto import silotune_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

DEFAULT_LIMIT = 512 << 20  # largest accepted message (bytes) unless the server knows a smaller one
BUSY = "server busy"  # detail of a call refused for load: clients retry it with backoff


class _Refused(Exception):
    """Internal: a call was refused (already counted and logged); abort with this status."""

    def __init__(self, code, detail: str):
        super().__init__(detail)
        self.code, self.detail = code, detail


class SiloTuneServicer(pb_grpc.SiloTuneServicer):
    def __init__(self, handler: Handler, identity: Identity, enrolled: dict[int, bytes],
                 wire_dtype: torch.dtype = torch.float32, max_message_bytes: int = DEFAULT_LIMIT,
                 admission: AdmissionSettings | None = None, handshake_window: float = 300.0):
        self.handler, self.identity, self.enrolled = handler, identity, enrolled
        self.wire_dtype, self.limit = wire_dtype, max_message_bytes
        self.sessions: dict[tuple[int, bytes], AeadSession] = {}
        self.rejected: Counter[str] = Counter()
        self.crypto_seconds = 0.0  # time spent sealing and opening messages
        self.lock = threading.Lock()
        self.replay = ReplayGuard(handshake_window)
        self.admission = Admission(admission, on_expire=lambda phase: self._count(f"deadline_{phase}"))

    def _count(self, reason: str) -> None:
        with self.lock:
            self.rejected[reason] += 1

    def _refuse(self, reason: str, code, detail: str) -> _Refused:
        self._count(reason)
        log.warning("rejected (%s): %s", reason, detail)
        return _Refused(code, detail)

    def refusals(self) -> dict[str, int]:
        """Every refusal so far, by reason: this transport's and the handler's boundary checks'."""
        total = Counter(self.rejected)
        total.update(getattr(self.handler, "rejected", {}))
        return dict(sorted(total.items()))

    def _admit(self, context):
        call = self.admission.admit(context)
        if call is None:
            raise self._refuse("busy", grpc.StatusCode.UNAVAILABLE,
                               f"{BUSY}: too many unauthenticated calls from {context.peer()}")
        return call

    def _first(self, iterator):
        """The first request of a stream; None if the call was cancelled (deadline) or is empty."""
        try:
            return next(iterator, None)
        except grpc.RpcError:
            return None  # cancelled by the admission watchdog (already counted) or by the peer

    def _serve(self, context, body):
        """Run ``body(call)`` for an admitted call; turn refusals into gRPC statuses."""
        call = None
        try:
            call = self._admit(context)
            return body(call)
        except _Refused as r:
            context.abort(r.code, r.detail)
        finally:
            self.admission.release(call)

    def Handshake(self, request_iterator, context):
        return self._serve(context, lambda call: self._handshake(call, request_iterator, context))

    def _handshake(self, call, request_iterator, context):
        request = self._first(request_iterator)
        if request is None:
            if call.expired or not context.is_active():
                return pb.HelloReply()  # cancelled: nobody receives this
            raise self._refuse("handshake", grpc.StatusCode.INVALID_ARGUMENT, "empty handshake")
        hello = ClientHello(request.client_id, request.ephemeral, request.nonce, request.signature,
                            request.timestamp_ms)
        try:
            reply, keys = server_accept(hello, self.identity, self.enrolled, self.replay)
        except CryptoError as exc:
            raise self._refuse("handshake", grpc.StatusCode.UNAUTHENTICATED, str(exc)) from None
        with self.lock:  # a new (fresh, genuine) session replaces the client's old ones
            for key in [k for k in self.sessions if k[0] == hello.client_id]:
                del self.sessions[key]
            self.sessions[(hello.client_id, keys.session_id)] = AeadSession(keys, "server")
        log.info("client %d: session %s established", hello.client_id, keys.session_id.hex()[:8])
        return pb.HelloReply(session_id=reply.session_id, ephemeral=reply.ephemeral, nonce=reply.nonce,
                             signature=reply.signature)

    def Exchange(self, request_iterator, context):
        answer = self._serve(context, lambda call: self._exchange(call, request_iterator, context))
        if answer is None:
            return  # the call was cancelled: nobody is listening
        session, sealed = answer
        for piece, last in chunking.split(sealed):
            yield pb.Chunk(client_id=session.client_id, session_id=session.session_id, data=piece, last=last)

    def _exchange(self, call, request_iterator, context):
        first = self._first(request_iterator)
        if first is None:
            if call.expired or not context.is_active():
                return None
            raise self._refuse("malformed", grpc.StatusCode.INVALID_ARGUMENT, "empty request stream")
        with self.lock:
            session = self.sessions.get((first.client_id, first.session_id))
        if session is None:
            raise self._refuse("no_session", grpc.StatusCode.UNAUTHENTICATED,
                               f"no session {first.session_id.hex()[:8]} for client {first.client_id}: "
                               "handshake first")
        if not self.admission.authenticated(call, session.client_id):
            raise self._refuse("busy", grpc.StatusCode.UNAVAILABLE,
                               f"{BUSY}: client {session.client_id} already has calls open")

        def pieces():
            yield first.data, first.last
            if first.last:
                return
            try:
                for chunk in request_iterator:
                    if (chunk.client_id, chunk.session_id) != (first.client_id, first.session_id):
                        raise self._refuse("malformed", grpc.StatusCode.INVALID_ARGUMENT,
                                           "chunks of one message name different sessions")
                    yield chunk.data, chunk.last
            except grpc.RpcError:
                return  # cancelled mid-stream: join reports it as cut short

        try:
            envelope = chunking.join(pieces(), self.limit)
        except ProtocolError as exc:
            if call.expired or not context.is_active():
                return None
            code = grpc.StatusCode.RESOURCE_EXHAUSTED if "larger than" in str(exc) else \
                grpc.StatusCode.INVALID_ARGUMENT
            raise self._refuse("oversized" if "larger than" in str(exc) else "malformed", code,
                               f"client {session.client_id}: {exc}") from None
        self.admission.received(call)
        try:
            with self.lock:
                t0 = time.perf_counter()
                plaintext, step = session.open(envelope)
                self.crypto_seconds += time.perf_counter() - t0
        except CryptoError as exc:
            raise self._refuse("crypto", grpc.StatusCode.UNAUTHENTICATED, str(exc)) from None
        try:
            msg = decode(plaintext)
        except ProtocolError as exc:
            raise self._refuse("malformed", grpc.StatusCode.INVALID_ARGUMENT,
                               f"client {session.client_id}: {exc}") from None
        if msg.client != session.client_id:
            raise self._refuse("impersonation", grpc.StatusCode.PERMISSION_DENIED,
                               f"client {session.client_id} sent a message claiming to be client {msg.client}")
        try:
            reply = self.handler.handle(msg)
        except StepAborted as exc:  # counted by the handler; the client redoes its step
            raise _Refused(grpc.StatusCode.ABORTED, str(exc)) from None
        except ProtocolError as exc:  # counted by the handler's boundary checks
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        except Exception as exc:  # a bug or a message we failed to foresee: refuse it, keep serving
            log.exception("client %d: internal error", session.client_id)
            raise self._refuse("internal", grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}") from None
        blob = encode(reply, self.wire_dtype)
        with self.lock:
            t0 = time.perf_counter()
            sealed = session.seal(blob, step)
            self.crypto_seconds += time.perf_counter() - t0
        return session, sealed

    def close(self) -> None:
        self.admission.close()


def start_server(servicer: SiloTuneServicer, address: str, tls: tuple[bytes, bytes] | None,
                 max_workers: int | None = None, client_ca: bytes | None = None) -> tuple[grpc.Server, int]:
    """Start serving on ``address`` (e.g. '127.0.0.1:0'); returns the server and its port.

    ``tls`` is (certificate chain PEM, private key PEM); None serves without TLS (the AEAD
    layer still encrypts and authenticates every message). With ``client_ca`` the server
    requires mutual TLS: clients must present a certificate signed by that CA.
    """
    if max_workers is None:
        max_workers = servicer.admission.settings.workers(max(len(servicer.enrolled), 1))
    options = [("grpc.max_receive_message_length", WIRE_MESSAGE_BYTES),
               ("grpc.max_send_message_length", WIRE_MESSAGE_BYTES)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=options,
                         maximum_concurrent_rpcs=4 * max_workers)
    pb_grpc.add_SiloTuneServicer_to_server(servicer, server)
    if tls is not None:
        credentials = grpc.ssl_server_credentials([(tls[1], tls[0])], root_certificates=client_ca,
                                                  require_client_auth=client_ca is not None)
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    server.start()
    return server, port
