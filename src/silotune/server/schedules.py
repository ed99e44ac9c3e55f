"""Schedules: the order in which the trunk server serves its clients' training steps.

``Sequential`` is vanilla split learning: one client step at a time, in round-robin order
over the clients taking part. The server, not the network, decides the order, so a
deployment of separate processes trains exactly like the in-process simulation. A client
whose turn it is but which stays silent past the timeout is dropped from the rotation
(the others go on); it is taken back when it rejoins.
"""

from __future__ import annotations

import logging
import threading
import time

from ..errors import ProtocolError

log = logging.getLogger(__name__)


class Sequential:
    def __init__(self, n_clients: int, timeout: float | None = None, on_drop=None):
        self.on_drop = on_drop  # called with the client id when it is dropped
        self.members = list(range(n_clients))
        self.active = set(self.members)
        self.turn = 0
        self.timeout = timeout
        self.cond = threading.Condition()
        self.dropped: list[int] = []

    def _advance(self) -> None:
        if not self.active:
            return
        for k in range(1, len(self.members) + 1):
            candidate = self.members[(self.members.index(self.turn) + k) % len(self.members)]
            if candidate in self.active:
                self.turn = candidate
                return

    def wait_turn(self, client: int) -> None:
        """Block until it is ``client``'s turn; drop a silent turn holder after the timeout."""
        with self.cond:
            if client not in self.active:
                self.active.add(client)
                log.info("client %d rejoins the rotation", client)
            if self.turn not in self.active:
                self._advance()
            deadline = None if self.timeout is None else time.monotonic() + self.timeout
            while self.turn != client:
                holder = self.turn
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    self._drop_locked(holder, "missed its turn")
                    deadline = time.monotonic() + self.timeout
                    continue
                if not self.cond.wait(remaining) and self.timeout is None:
                    raise ProtocolError(f"client {client}: waited for its turn forever")

    def done(self, client: int) -> None:
        """``client`` finished its step: the next active client's turn."""
        with self.cond:
            if self.turn == client:
                self._advance()
            self.cond.notify_all()

    def _drop_locked(self, client: int, why: str) -> None:
        if client in self.active:
            self.active.discard(client)
            self.dropped.append(client)
            log.warning("client %d dropped from the rotation: %s", client, why)
            if self.on_drop is not None:
                self.on_drop(client)
            if self.turn == client:
                self._advance()
            self.cond.notify_all()

    def leave(self, client: int) -> None:
        """``client`` has finished training: take it out of the rotation quietly."""
        with self.cond:
            self.active.discard(client)
            if self.turn == client:
                self._advance()
            self.cond.notify_all()

    def drop(self, client: int, why: str) -> None:
        with self.cond:
            self._drop_locked(client, why)
