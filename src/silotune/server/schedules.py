"""Schedules: which clients' training steps the trunk runs together, and in what order.

A schedule receives each client's forward (``forward(part) -> h2``) and backward
(``backward(client, step, dL/dh2) -> dL/dh1``) and decides when the trunk runtime
(``server/runtime.py``) runs them; it never touches the model itself. It also keeps the
*rotation*: the clients taking part, which a FedAvg round waits for.

- ``Sequential`` is vanilla split learning: one client step at a time, round-robin over
  the rotation. The server, not the network, decides the order, so a deployment of
  separate processes trains exactly like the in-process simulation. A turn lasts at most
  ``timeout`` seconds from when it was granted, whatever the holder sends meanwhile; then
  the holder is dropped from the rotation and the others go on; it is taken back when it
  asks for a turn again.
- ``ClientBatch`` (FL-GLM's client-batch parallelism) gathers the forwards of up to
  ``size`` clients (closing the group early once every client that can come is in it, or
  ``wait`` seconds after its first member arrived), runs the trunk once on their
  concatenation and returns each its rows; the backward waits for the group's gradients
  (at most ``wait`` seconds after the first), runs one backward and one optimizer step,
  and returns each member its rows of ``dL/dh1``. A member that does not answer in time
  is left out of that step (it redoes the step when it comes back) and is not waited for
  again until it sends a forward; a client silent for ``timeout`` leaves the rotation.

Server-hierarchical training (several trunk replicas) runs one of these schedules in
each replica; ``server/replicas.py`` keeps the replicas in step.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod

import torch

from ..errors import ProtocolError, StepAborted
from .runtime import Part, Pass, TrunkRuntime

log = logging.getLogger(__name__)

SCHEDULES = ("sequential", "client-batch", "hierarchical")


def _aborted(client: int, step: int) -> StepAborted:
    return StepAborted(f"client {client} step {step}: no forward pass pending for this step (it was dropped, "
                       "or the server restarted): redo the step")


class Schedule(ABC):
    """The rotation and its timeouts, shared by every schedule; subclasses order the steps."""

    def __init__(self, clients: int | list[int], runtime: TrunkRuntime, timeout: float | None = None,
                 on_drop=None):
        """``clients``: how many (ids 0..n-1), or the ids this trunk serves (one replica's group)."""
        self.runtime = runtime
        self.members = list(range(clients)) if isinstance(clients, int) else sorted(clients)
        self.active = set(self.members)  # the rotation: the clients a FedAvg round waits for
        self.timeout = timeout
        self.on_drop = on_drop  # called with the client id after it is dropped (outside the lock)
        self.cond = threading.Condition()
        self.dropped: list[int] = []  # clients dropped for silence, in order (a client may appear again)

    # ---- the steps: subclasses ----
    @abstractmethod
    def forward(self, part: Part) -> torch.Tensor: ...

    @abstractmethod
    def grad_shape(self, client: int, step: int) -> tuple[int, ...] | None:
        """The shape of the ``dL/dh2`` ``client`` owes for ``step``; None if no such step is pending."""

    @abstractmethod
    def backward(self, client: int, step: int, grad: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def _forget(self, client: int) -> None:
        """Drop ``client``'s pending step (called under ``cond``)."""

    # ---- the rotation ----
    def _admit(self, client: int) -> None:
        if client not in self.active:
            self.active.add(client)
            log.info("client %d rejoins the rotation", client)

    def _drop(self, client: int, why: str) -> None:
        """Take ``client`` out of the rotation (under ``cond``); call ``_notify_drop`` after releasing it."""
        self.active.discard(client)
        self.dropped.append(client)
        self._forget(client)
        log.warning("client %d dropped from the rotation: %s", client, why)
        self.cond.notify_all()

    def _notify_drop(self, clients) -> None:
        for client in clients:
            if self.on_drop is not None:
                self.on_drop(client)

    def seen(self, client: int) -> None:
        """Any message from ``client`` (the schedule may track who is alive)."""

    def check_stale(self) -> None:
        """Called on clients' polls: a silent client must not stall everyone else."""

    def rejoin(self, client: int) -> None:
        """``client`` (re)connected and will train again: back into the rotation."""
        with self.cond:
            self._admit(client)
            self.cond.notify_all()

    def leave(self, client: int) -> None:
        """``client`` has finished training: take it out of the rotation quietly."""
        with self.cond:
            self.active.discard(client)
            self.cond.notify_all()


class Sequential(Schedule):
    def __init__(self, clients: int | list[int], runtime: TrunkRuntime, timeout: float | None = None,
                 on_drop=None):
        super().__init__(clients, runtime, timeout, on_drop)
        self.turn = self.members[0]
        self.turn_since = time.monotonic()  # when the holder was granted the turn
        self.started = False  # the first turn's clock starts when the first client asks for a turn
        self.pending: dict[int, tuple[int, Pass]] = {}  # client -> (step, its pass awaiting the backward)

    def _advance(self) -> None:
        self.turn_since = time.monotonic()
        if not self.active:
            return
        at = self.members.index(self.turn)
        for k in range(1, len(self.members) + 1):
            candidate = self.members[(at + k) % len(self.members)]
            if candidate in self.active:
                self.turn = candidate
                return

    def _forget(self, client: int) -> None:
        if self.pending.pop(client, None) is not None:
            log.warning("client %d: pending step dropped", client)

    def _stale_holder(self) -> int | None:
        """Drop the turn holder if its turn has lasted past the timeout; returns it."""
        if self.timeout is None or time.monotonic() - self.turn_since <= self.timeout or self.turn not in self.active:
            return None  # (a holder already out of the rotation is not dropped twice)
        holder = self.turn
        self._drop(holder, f"its turn expired ({self.timeout:.0f}s)")
        self._advance()
        return holder

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
            self._notify_drop([dropped] if dropped is not None else [])

    def forward(self, part: Part) -> torch.Tensor:
        self.wait_turn(part.client)
        pass_ = self.runtime.forward([part])
        h2 = pass_.output(0)  # raises the refusal of an overflowing step (the turn is kept until it expires)
        with self.cond:
            if part.client in self.pending:
                log.warning("client %d: dropping unfinished step %d", part.client, self.pending[part.client][0])
            self.pending[part.client] = (part.step, pass_)
        return h2

    def grad_shape(self, client: int, step: int) -> tuple[int, ...] | None:
        with self.cond:
            step_, pass_ = self.pending.get(client, (None, None))
        return pass_.shape(0) if step_ == step else None

    def backward(self, client: int, step: int, grad: torch.Tensor) -> torch.Tensor:
        with self.cond:
            step_, pass_ = self.pending.get(client, (None, None))
        if step_ != step:
            raise _aborted(client, step)
        result = self.runtime.backward(pass_, {0: grad})[0]
        if isinstance(result, ProtocolError):
            raise result  # the step stays pending: the holder may send a sound gradient until its turn expires
        with self.cond:
            if self.pending.get(client, (None, None))[1] is pass_:
                del self.pending[client]
            if self.turn == client:
                self._advance()
            self.cond.notify_all()
        return result

    def check_stale(self) -> None:
        with self.cond:
            dropped = self._stale_holder()
        self._notify_drop([dropped] if dropped is not None else [])

    def leave(self, client: int) -> None:
        with self.cond:
            self.active.discard(client)
            if self.turn == client:
                self._advance()
            self.cond.notify_all()


class _Group:
    """One client-batch step: the members' parts, then their pass, gradients and results."""

    def __init__(self, deadline: float):
        self.parts: list[Part] = []
        self.deadline = deadline  # forward gathering ends here
        self.closed = False
        self.pass_: Pass | None = None
        self.error: BaseException | None = None
        self.forward_done = False
        self.grads: dict[int, torch.Tensor] = {}  # part index -> dL/dh2
        self.grad_deadline: float | None = None
        self.running = False
        self.results: dict | None = None  # part index -> dL/dh1 or the error that refused it


class ClientBatch(Schedule):
    def __init__(self, clients: int | list[int], runtime: TrunkRuntime, size: int, wait: float,
                 timeout: float | None = None, on_drop=None):
        super().__init__(clients, runtime, timeout, on_drop)
        if size < 1 or wait <= 0:
            raise ValueError("client-batch needs size >= 1 and a positive wait")
        self.size, self.wait = size, wait
        self.gathering: _Group | None = None
        self.pending: dict[int, tuple[int, _Group, int]] = {}  # client -> (step, its group, its part index)
        self.idle: set[int] = set()  # missed a gathering: not waited for until they send a forward again
        self.last_seen: dict[int, float] = {}
        self.passes = 0  # trunk passes run (each serving one group)
        self.group_sizes: list[int] = []

    def seen(self, client: int) -> None:
        with self.cond:
            self.last_seen[client] = time.monotonic()

    def _quorum(self) -> int:
        return max(1, min(self.size, len(self.active - self.idle)))

    def _forget(self, client: int) -> None:
        self.pending.pop(client, None)

    # ---- forward: gather, one pass, each its rows ----
    def forward(self, part: Part) -> torch.Tensor:
        with self.cond:
            self._admit(part.client)
            self.idle.discard(part.client)
            self.last_seen[part.client] = time.monotonic()
            if part.client in self.pending:
                log.warning("client %d: dropping unfinished step %d", part.client, self.pending[part.client][0])
                del self.pending[part.client]
            group = self.gathering
            if group is None or group.closed or any(p.client == part.client for p in group.parts):
                group = self.gathering = _Group(time.monotonic() + self.wait)
            group.parts.append(part)
            self.cond.notify_all()
            runner = False
            while not group.closed:
                left = group.deadline - time.monotonic()
                if len(group.parts) >= self._quorum() or left <= 0:
                    runner = group.closed = True
                    if len(group.parts) < self._quorum():  # the missing ones are not waited for next time
                        missing = self.active - self.idle - {p.client for p in group.parts}
                        self.idle |= missing
                        log.info("client-batch: group closed with %d of %d clients after %.2fs (not waiting "
                                 "for %s)", len(group.parts), self._quorum(), self.wait, sorted(missing))
                    group.parts.sort(key=lambda p: p.client)
                    break
                self.cond.wait(left)
        if runner:
            try:
                group.pass_ = self.runtime.forward(group.parts)
            except BaseException as exc:  # a bug: every member gets it, nobody waits forever
                group.error = exc
            with self.cond:  # every member owes its gradient from now on (before any of them can send it)
                for i, p in enumerate(group.parts):
                    if group.pass_ is not None and i not in group.pass_.refused:
                        self.pending[p.client] = (p.step, group, i)
                group.forward_done = True
                self.passes += 1
                self.group_sizes.append(len(group.parts))
                self.cond.notify_all()
        with self.cond:
            while not group.forward_done:
                self.cond.wait()
        if group.error is not None:
            raise group.error
        index = next(i for i, p in enumerate(group.parts) if p is part)
        return group.pass_.output(index)  # raises this member's refusal (its rows overflowed)

    # ---- backward: gather the gradients, one backward and step, each its rows ----
    def grad_shape(self, client: int, step: int) -> tuple[int, ...] | None:
        with self.cond:
            entry = self.pending.get(client)
        if entry is None or entry[0] != step or entry[1].results is not None:
            return None
        return entry[1].pass_.shape(entry[2])

    def _owed(self, group: _Group) -> set[int]:
        """The part indices whose gradient the group still waits for (members still pending on it)."""
        return {i for i, p in enumerate(group.parts) if i not in group.pass_.refused and i not in group.grads
                and self.pending.get(p.client, (None, None))[1] is group}

    def backward(self, client: int, step: int, grad: torch.Tensor) -> torch.Tensor:
        with self.cond:
            entry = self.pending.get(client)
            if entry is None or entry[0] != step or entry[1].results is not None or entry[1].running:
                raise _aborted(client, step)
            _, group, index = entry
            group.grads[index] = grad
            if group.grad_deadline is None:
                group.grad_deadline = time.monotonic() + self.wait
            self.cond.notify_all()
            runner = False
            while group.results is None and not group.running:
                left = group.grad_deadline - time.monotonic()
                if not self._owed(group) or left <= 0:
                    runner = group.running = True
                    late = sorted(group.parts[i].client for i in self._owed(group))
                    for c in late:  # they stopped answering: the step goes on without them
                        del self.pending[c]
                        self.idle.add(c)
                    if late:
                        log.warning("client-batch: no gradient from clients %s within %.2fs: the step goes on "
                                    "without them", late, self.wait)
                    break
                self.cond.wait(left)
        if runner:
            try:
                results = self.runtime.backward(group.pass_, dict(group.grads))
            except BaseException as exc:
                results = {i: exc for i in group.grads}
            with self.cond:
                group.results = results
                self.cond.notify_all()
        with self.cond:
            while group.results is None:
                self.cond.wait()
            if self.pending.get(client, (None, None))[1] is group:
                del self.pending[client]
        result = group.results.get(index)
        if result is None:
            raise _aborted(client, step)
        if isinstance(result, BaseException):
            raise result
        return result

    def check_stale(self) -> None:
        """Drop clients of the rotation silent for longer than ``timeout``."""
        if self.timeout is None:
            return
        now, dropped = time.monotonic(), []
        with self.cond:
            for client in sorted(self.active):
                if now - self.last_seen.setdefault(client, now) > self.timeout:
                    self._drop(client, f"silent for {self.timeout:.0f}s")
                    dropped.append(client)
        self._notify_drop(dropped)

    def leave(self, client: int) -> None:
        with self.cond:
            self.active.discard(client)
            self.idle.discard(client)
            self.cond.notify_all()
