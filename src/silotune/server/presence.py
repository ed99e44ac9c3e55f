"""Who is still taking part: each client's last contact, its calls in flight, and its goodbye.

The server ends its run when every client has either said goodbye or been gone (no call
in flight, no contact) for longer than a grace period; a client that never showed up
counts from the moment the server started. ``report`` says which clients dropped.
"""

from __future__ import annotations

import threading
import time


class Presence:
    def __init__(self, clients: int | list[int], clock=time.monotonic):
        """``clients``: how many (ids 0..n-1), or the ids this server serves (one replica's group)."""
        self.clock = clock
        self.members = list(range(clients)) if isinstance(clients, int) else sorted(clients)
        self.started = clock()
        self.last: dict[int, float] = {}
        self.in_flight: dict[int, int] = {}
        self.finished: set[int] = set()
        self._lock = threading.Lock()

    def enter(self, client: int) -> None:
        with self._lock:
            self.in_flight[client] = self.in_flight.get(client, 0) + 1
            self.last[client] = self.clock()

    def exit(self, client: int) -> None:
        with self._lock:
            self.in_flight[client] -= 1
            self.last[client] = self.clock()

    def finish(self, client: int) -> None:
        with self._lock:
            self.finished.add(client)

    def gone(self, grace: float) -> set[int]:
        """Clients that have not finished, have no call in flight and were last heard of > grace s ago."""
        now = self.clock()
        with self._lock:
            return {c for c in self.members if c not in self.finished and not self.in_flight.get(c)
                    and now - self.last.get(c, self.started) > grace}

    def over(self, grace: float | None) -> bool:
        """True once every client has finished (or, with a grace period, finished or gone)."""
        if len(self.finished) == len(self.members):
            return True
        return grace is not None and len(self.finished | self.gone(grace)) == len(self.members)

    def report(self, grace: float | None) -> dict:
        gone = sorted(self.gone(grace)) if grace is not None else []
        return {"finished": sorted(self.finished), "dropped": gone,
                "never_seen": sorted(c for c in gone if c not in self.last)}
