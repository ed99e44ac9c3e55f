"""Admission control for the gRPC server: who may hold a worker thread, and for how long.

The server has a fixed pool of worker threads, and a call holds one from the moment it
opens. So before anything is buffered or computed, a call must authenticate (name a
live session in its first chunk, or deliver its handshake hello) within
``auth_seconds``; one connection may have at most ``per_peer`` calls waiting to do so,
all connections together ``total``. An authenticated call must deliver its whole
request within ``receive_seconds``, and one client may have at most ``per_client``
calls open. A call past its deadline is cancelled by a watchdog thread, which frees its
worker. Once a request has arrived, the call has no deadline: the handler may wait for
the client's turn. Pool size = ``total + per_client * clients`` + a margin, so stalled or
flooding strangers can never take every worker from the enrolled clients.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass
class AdmissionSettings:
    auth_seconds: float = 10.0
    receive_seconds: float = 300.0
    per_peer: int = 4
    total: int = 16
    per_client: int = 2

    def workers(self, n_clients: int) -> int:
        """Worker threads enough for every admitted call plus refusing the rest."""
        return self.total + self.per_client * n_clients + 4


@dataclass(eq=False)
class Call:
    context: object
    peer: str
    deadline: float | None
    client: int | None = None  # set once authenticated
    phase: str = "auth"  # auth -> receive -> handle
    expired: bool = field(default=False)


class Admission:
    def __init__(self, settings: AdmissionSettings | None = None, clock=time.monotonic, on_expire=None):
        self.settings = settings or AdmissionSettings()
        self.clock = clock
        self.on_expire = on_expire  # called with the phase ('auth' or 'receive') of every cancelled call
        self.calls: set[Call] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, name="silotune-admission", daemon=True)
        self._watchdog.start()

    def admit(self, context) -> Call | None:
        """Register a new call, or None if its connection (or everyone) has too many unauthenticated calls."""
        peer = context.peer() if hasattr(context, "peer") else "?"
        s = self.settings
        with self._lock:
            pending = [c for c in self.calls if c.phase == "auth"]
            if len(pending) >= s.total or sum(c.peer == peer for c in pending) >= s.per_peer:
                return None
            call = Call(context, peer, self.clock() + s.auth_seconds)
            self.calls.add(call)
            return call

    def authenticated(self, call: Call, client: int) -> bool:
        """The call named a live session of ``client``; False if the client already has too many calls open."""
        with self._lock:
            if sum(c.client == client for c in self.calls) >= self.settings.per_client:
                return False
            call.client, call.phase = client, "receive"
            call.deadline = self.clock() + self.settings.receive_seconds
            return True

    def received(self, call: Call) -> None:
        """The whole request arrived: no deadline while the handler works (or waits for a turn)."""
        with self._lock:
            call.phase, call.deadline = "handle", None

    def release(self, call: Call | None) -> None:
        if call is not None:
            with self._lock:
                self.calls.discard(call)

    def _watch(self) -> None:
        while not self._stop.wait(0.05):
            now = self.clock()
            with self._lock:
                late = [c for c in self.calls if c.deadline is not None and c.deadline < now and not c.expired]
                for c in late:
                    c.expired = True
            for c in late:
                log.warning("cancelled a call from %s: no %s within %.0fs", c.peer,
                            "authentication" if c.phase == "auth" else "complete request",
                            self.settings.auth_seconds if c.phase == "auth" else self.settings.receive_seconds)
                if self.on_expire is not None:
                    self.on_expire(c.phase)
                c.context.cancel()

    def close(self) -> None:
        self._stop.set()
