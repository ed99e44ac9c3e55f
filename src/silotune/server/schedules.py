"""Schedules: the order in which the trunk server serves its clients' training steps.

``Sequential`` is vanilla split learning: one client step at a time, in round-robin order
over the clients taking part. The server, not the network, decides the order, so a
deployment of separate processes trains exactly like the in-process simulation. A turn
lasts at most ``timeout`` seconds of wall time from when it was granted, whatever the
holder sends meanwhile (a client that died, hangs, or re-sends forward passes to keep
the turn): then the holder is dropped from the rotation and the others go on; it is
taken back when it asks for a turn again.
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger(__name__)


class Sequential:
    def __init__(self, n_clients: int, timeout: float | None = None, on_drop=None):
        self.members = list(range(n_clients))
        self.active = set(self.members)
        self.turn = 0
        self.turn_since = time.monotonic()  # when the holder was granted the turn
        self.started = False  # the first turn's clock starts when the first client asks for a turn
        self.timeout = timeout
        self.on_drop = on_drop  # called with the client id after it is dropped (outside the lock)
        self.cond = threading.Condition()
        self.dropped: list[int] = []

    def _advance(self) -> None:
        self.turn_since = time.monotonic()
        if not self.active:
            return
        for k in range(1, len(self.members) + 1):
            candidate = self.members[(self.turn + k) % len(self.members)]
            if candidate in self.active:
                self.turn = candidate
                return

    def _admit(self, client: int) -> None:
        if client not in self.active:
            self.active.add(client)
            log.info("client %d rejoins the rotation", client)

    def _stale_holder(self) -> int | None:
        """Drop the turn holder if its turn has lasted past the timeout; returns it."""
        if self.timeout is None or time.monotonic() - self.turn_since <= self.timeout or self.turn not in self.active:
            return None  # (a holder already out of the rotation is not dropped twice)
        holder = self.turn
        self.active.discard(holder)
        self.dropped.append(holder)
        log.warning("client %d dropped from the rotation: its turn expired (%.0fs)", holder, self.timeout)
        self._advance()
        self.cond.notify_all()
        return holder

    def _notify_drop(self, client: int | None) -> None:
        if client is not None and self.on_drop is not None:
            self.on_drop(client)

    def wait_turn(self, client: int) -> None:
        """Block until it is ``client``'s turn (dropping a silent holder after the timeout)."""
        while True:
            with self.cond:
                self._admit(client)
                if not self.started:
                    self.started, self.turn_since = True, time.monotonic()
                if self.turn not in self.active:
                    self._advance()
                if self.turn == client:  # the clock started when the turn was granted: asking again never resets it
                    return
                dropped = self._stale_holder()
                if dropped is None:
                    wait = None if self.timeout is None else self.turn_since + self.timeout - time.monotonic()
                    self.cond.wait(None if wait is None else max(wait, 0.01))
            self._notify_drop(dropped)

    def check_stale(self) -> None:
        """Called by clients' polls: a dead turn holder must not stall everyone else."""
        with self.cond:
            dropped = self._stale_holder()
        self._notify_drop(dropped)

    def done(self, client: int) -> None:
        """``client`` finished its step: the next active client's turn."""
        with self.cond:
            if self.turn == client:
                self._advance()
            self.cond.notify_all()

    def rejoin(self, client: int) -> None:
        """``client`` (re)connected and will train again: back into the rotation."""
        with self.cond:
            self._admit(client)
            self.cond.notify_all()

    def leave(self, client: int) -> None:
        """``client`` has finished training: take it out of the rotation quietly."""
        with self.cond:
            self.active.discard(client)
            if self.turn == client:
                self._advance()
            self.cond.notify_all()
