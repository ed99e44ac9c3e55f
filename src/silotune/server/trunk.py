"""The trunk server: runs the middle blocks for every client and trains its own adapters.

It only ever sees a client's head output ``h1`` and the gradient ``dL/dh2`` it sends
back, never tokens, labels, logits or the loss. It also hosts the federated average of
the clients' adapters. One ``handle`` entry point serves every transport.
"""

from __future__ import annotations

import logging
import math
import threading
from pathlib import Path

import torch

from ..adapters import load_trainable_state, trainable_state
from ..errors import ProtocolError, StepAborted
from ..models.partition import Stage
from ..protocol.messages import Aggregation, Control, ForwardActivations, Gradients, Message, ReturnedActivations
from ..train.optim import OptimSettings, Stepper, trainable
from . import checkpoint as ckpt
from .aggregation import Aggregator
from .boundary import Boundary, Limits
from .presence import Presence
from .schedules import Sequential

log = logging.getLogger(__name__)


class TrunkServer:
    def __init__(self, trunk: Stage, n_clients: int, optim: OptimSettings, aggregator: Aggregator,
                 client_timeout: float | None = None, checkpoint: Path | None = None, limits: Limits | None = None):
        self.trunk = trunk
        self.schedule = Sequential(n_clients, client_timeout, on_drop=self._on_drop)
        self.lock = threading.RLock()  # one trunk: transports may call from many threads
        self.n_clients = n_clients
        self.stepper = Stepper(trainable(trunk), optim)
        self.boundary = Boundary(limits or Limits.unbounded(trunk.config))
        self.aggregator = aggregator
        aggregator.expected = lambda: set(self.schedule.active)  # a round waits for the clients in the rotation
        aggregator.participants = lambda: set(range(n_clients)) - self.presence.finished
        self.presence = Presence(n_clients)
        self.checkpoint = checkpoint
        self.pending: dict[int, tuple[int, torch.Tensor, torch.Tensor]] = {}
        self.steps = 0
        self.finished = threading.Event()  # set once every client has said goodbye
        if checkpoint is not None and (found := ckpt.load_latest(Path(checkpoint))) is not None:
            self.restore(found[0])  # load_latest falls back to checkpoint.prev when the latest is corrupt

    @property
    def rejected(self):
        """Refused messages by reason (boundary checks and protocol violations)."""
        return self.boundary.rejected

    def handle(self, msg: Message) -> Message:
        if not 0 <= msg.client < self.n_clients:
            raise self.boundary.refuse("unknown_client", "message", f"from unknown client {msg.client}")
        self.presence.enter(msg.client)
        try:
            return self._handle(msg)
        finally:
            self.presence.exit(msg.client)

    def _handle(self, msg: Message) -> Message:
        if isinstance(msg, ForwardActivations):
            self.boundary.activations(msg.client, msg.step, msg.hidden, msg.lengths)
            if msg.train:
                self.schedule.wait_turn(msg.client)
            with self.lock:
                return self._forward(msg)
        if isinstance(msg, Gradients):
            with self.lock:
                reply = self._backward(msg)
            self.schedule.done(msg.client)
            return reply
        if isinstance(msg, Control) and msg.command == "join":  # schedule calls stay outside the trunk lock
            self.schedule.rejoin(msg.client)
        if isinstance(msg, Control) and msg.command == "bye":
            self.schedule.leave(msg.client)
        with self.lock:
            reply = self._control(msg)
        if isinstance(reply, Control) and reply.command == "not_ready":
            self.schedule.check_stale()
        return reply

    def _on_drop(self, client: int) -> None:
        """A client was dropped: forget its pending step; rounds it held up may now complete."""
        with self.lock:
            if self.pending.pop(client, None) is not None:
                log.warning("client %d: pending step dropped", client)
            for round_ in self.aggregator.recheck():
                self._round_done(round_)

    def max_message_bytes(self) -> int:
        """The largest message an honest client sends this server (fp32): activations at the limits, or an update."""
        update = 4 * sum(math.prod(shape) for shape in self.aggregator.layout.values())
        return self.boundary.limits.message_bytes(extra=update)

    def _round_done(self, round_: int) -> None:
        log.info("round %d averaged", round_)
        if self.checkpoint is not None:
            ckpt.save(Path(self.checkpoint), self.state_dict())

    def state_dict(self) -> dict:
        return {"trunk": trainable_state(self.trunk), "optim": self.stepper.state_dict(), "steps": self.steps,
                **self.aggregator.state_dict()}

    def restore(self, state: dict) -> None:
        load_trainable_state(self.trunk, state["trunk"])
        self.stepper.load_state_dict(state["optim"])
        self.steps = state["steps"]
        self.aggregator.load_state_dict(state)
        log.warning("resumed from checkpoint %s: round %d done, %d trunk steps", self.checkpoint,
                    state["round"], self.steps)

    def _control(self, msg: Message) -> Message:
        if isinstance(msg, Aggregation):
            late = msg.round <= self.aggregator.latest()[0]  # fields are typed by the codec
            try:
                closed = self.aggregator.submit(msg.client, msg.round, msg.tensors, msg.num_examples)
            except ProtocolError as exc:
                raise self.boundary.refuse("update", "update", str(exc)) from None
            if closed:
                self._round_done(msg.round)
            elif msg.client not in self.schedule.active and msg.round > self.aggregator.latest()[0]:
                self.schedule.rejoin(msg.client)  # dropped mid-round, it trained on: the round waits for it again
            return Control(msg.client, msg.step, command="ack",
                           payload={"late": True, "open_round": self.aggregator.latest()[0] + 1} if late else {})
        if isinstance(msg, Control) and msg.command == "join":
            round_, aggregate = self.aggregator.latest()
            if aggregate is None:
                return Control(msg.client, msg.step, command="joined", payload={"round": round_})
            return Aggregation(msg.client, msg.step, tensors=aggregate, round=round_)
        if isinstance(msg, Control) and msg.command == "fetch_aggregate":
            round_ = msg.payload.get("round", -1)  # an integer: the codec checked every field's type
            result = self.aggregator.result(round_)
            latest, newest = self.aggregator.latest()
            if result is None and round_ < latest:  # long closed and forgotten: it fell behind, give it the newest
                round_, result = latest, newest
            if result is None:
                return Control(msg.client, msg.step, command="not_ready", payload={"round": round_})
            return Aggregation(msg.client, msg.step, tensors=result, round=round_)
        if isinstance(msg, Control) and msg.command == "bye":
            self.presence.finish(msg.client)
            if self.presence.over(None):
                self.finished.set()
            return Control(msg.client, msg.step, command="ack")
        raise self.boundary.refuse("unexpected", f"client {msg.client}", f"unexpected {msg.kind} message"
                                   + (f" ({msg.command!r})" if isinstance(msg, Control) else ""))

    def _forward(self, msg: ForwardActivations) -> ReturnedActivations:
        if not msg.train:
            with torch.no_grad():
                return ReturnedActivations(msg.client, msg.step, hidden=self.trunk(msg.hidden, msg.lengths))
        h1 = msg.hidden.detach().requires_grad_(True)
        h2 = self.trunk(h1, msg.lengths)
        self.boundary.computed(msg.client, msg.step, "trunk output", h2)
        if msg.client in self.pending:
            log.warning("client %d: dropping unfinished step %d", msg.client, self.pending[msg.client][0])
        self.pending[msg.client] = (msg.step, h1, h2)
        return ReturnedActivations(msg.client, msg.step, hidden=h2.detach())

    def _backward(self, msg: Gradients) -> Gradients:
        step, h1, h2 = self.pending.get(msg.client, (None, None, None))
        if step is None or step != msg.step:
            self.boundary.count("aborted")
            raise StepAborted(f"client {msg.client} step {msg.step}: no forward pass pending for this step (its "
                              "turn expired or the server restarted): redo the step")
        self.boundary.gradient(msg.client, msg.step, msg.grad, h2.shape)
        self.stepper.zero_grad()
        h2.backward(msg.grad.to(h2.dtype), retain_graph=True)  # kept until the step is known to be sound
        try:
            self.boundary.computed(msg.client, msg.step, "input gradient", h1.grad)
            grads = [p.grad for p in self.stepper.params if p.grad is not None]
            if grads:  # one norm over every trunk gradient: non-finite if any element is
                self.boundary.computed(msg.client, msg.step, "trunk gradient", torch.nn.utils.get_total_norm(grads))
        except ProtocolError:
            self.stepper.zero_grad()
            h1.grad = None
            raise
        del self.pending[msg.client]
        self.stepper.step()
        self.steps += 1
        return Gradients(msg.client, msg.step, grad=h1.grad)
