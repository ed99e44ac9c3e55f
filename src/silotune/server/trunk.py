"""The trunk server's message handler: the boundary checks, then dispatch to the roles.

It composes the roles of the server (see docs/architecture.md): the trunk runtime
(``runtime.py``: forward, backward, optimizer), the schedule (``schedules.py``: whose
steps run together and when), the aggregation strategy (``aggregation.py``) and the
checkpointer (``checkpoint.py``). It only ever sees a client's head output ``h1`` and the
gradient ``dL/dh2`` it sends back, never tokens, labels, logits or the loss; every
tensor is checked (``boundary.py``) before any role touches it. One ``handle`` entry
point serves every transport.
"""

from __future__ import annotations

import logging
import math
import threading
from pathlib import Path

from ..errors import ProtocolError, StepAborted
from ..protocol.messages import (
    Aggregation,
    Control,
    EnclaveMessage,
    ForwardActivations,
    Gradients,
    Message,
    ReturnedActivations,
)
from ..tee.channel import as_tensor as _u8
from . import checkpoint as ckpt
from .aggregation import Aggregator
from .boundary import Boundary
from .caches import GenerationCaches
from .presence import Presence
from .runtime import Part, TrunkRuntime
from .schedules import Schedule

log = logging.getLogger(__name__)


class TrunkServer:
    def __init__(self, runtime: TrunkRuntime, schedule: Schedule, aggregator: Aggregator, boundary: Boundary,
                 checkpoint: Path | None = None, replicas=None):
        """``replicas`` (``server/replicas.py``), in server-hierarchical training, keeps this trunk and the
        FedAvg rounds in step with the other replicas'; None for a single trunk."""
        self.runtime, self.schedule, self.aggregator, self.boundary = runtime, schedule, aggregator, boundary
        self.n_clients = aggregator.n_clients
        self.lock = threading.RLock()  # aggregation and control state
        schedule.on_drop = self._on_drop
        aggregator.expected = lambda: set(self.schedule.active)  # a round waits for the clients in the rotation
        aggregator.participants = lambda: set(self.schedule.members) - self.presence.finished
        self.presence = Presence(schedule.members)
        # split generation's trunk caches (none in an enclave: its sealed forwards carry no cache)
        self.caches = None if getattr(runtime, "sealed", False) else GenerationCaches(boundary, runtime.trunk)
        self.replicas = replicas
        if replicas is not None:
            replicas.attach(runtime, aggregator)
        self.checkpoint = checkpoint
        self.finished = threading.Event()  # set once every client has said goodbye
        self.on_round = None  # an observer (experiment tracking): on_round(round_) once a round is averaged and saved
        if checkpoint is not None and (found := ckpt.load_latest(Path(checkpoint))) is not None:
            self.restore(found[0])  # load_latest falls back to checkpoint.prev when the latest is corrupt

    @property
    def trunk(self):
        return self.runtime.trunk

    @property
    def steps(self) -> int:
        """Trunk optimizer steps taken."""
        return self.runtime.steps

    @property
    def rejected(self):
        """Refused messages by reason (boundary checks and protocol violations)."""
        return self.boundary.rejected

    def handle(self, msg: Message) -> Message:
        if not 0 <= msg.client < self.n_clients or msg.client not in self.schedule.members:
            raise self.boundary.refuse("unknown_client", "message", f"from unknown client {msg.client}")
        self.presence.enter(msg.client)
        self.schedule.seen(msg.client)
        try:
            return self._handle(msg)
        finally:
            self.presence.exit(msg.client)

    def _handle(self, msg: Message) -> Message:
        if isinstance(msg, EnclaveMessage):
            return self._enclave(msg)
        if isinstance(msg, (ForwardActivations, Gradients, Aggregation)) and getattr(self.runtime, "sealed", False):
            raise self.boundary.refuse("unsealed", f"client {msg.client} step {msg.step}",
                                       f"{msg.kind} in the clear to a trunk in an enclave: seal it to the enclave")
        if isinstance(msg, ForwardActivations):
            self.boundary.activations(msg.client, msg.step, msg.hidden, msg.lengths)
            if msg.cache:
                return ReturnedActivations(msg.client, msg.step, hidden=self._generate(msg))
            if msg.past:
                raise self.boundary.refuse("malformed", f"client {msg.client} step {msg.step}",
                                           "a forward without a generation cache cannot continue one (past > 0)")
            if not msg.train:
                return ReturnedActivations(msg.client, msg.step, hidden=self.runtime.infer(msg.hidden, msg.lengths))
            h2 = self.schedule.forward(Part(msg.client, msg.step, msg.hidden, msg.lengths))
            return ReturnedActivations(msg.client, msg.step, hidden=h2)
        if isinstance(msg, Gradients):
            def check(shape):
                self.boundary.gradient(msg.client, msg.step, msg.grad, shape)

            return Gradients(msg.client, msg.step, grad=self._backward(msg, msg.grad, check))
        if isinstance(msg, Control) and msg.command == "join":  # schedule calls stay outside the server lock
            self.schedule.rejoin(msg.client)
        if isinstance(msg, Control) and msg.command == "bye":
            self.schedule.leave(msg.client)
            if self.caches is not None:
                self.caches.release(msg.client)
        if isinstance(msg, Control) and msg.command == "release":
            return self._release(msg)
        if isinstance(msg, Control) and msg.command == "trained":  # done training, still evaluating: no turn for it
            self.schedule.leave(msg.client)
            return Control(msg.client, msg.step, command="ack")
        with self.lock:
            reply = self._control(msg)
        if isinstance(reply, Control) and reply.command == "not_ready":
            self.schedule.check_stale()
        return reply

    def _generate(self, msg: ForwardActivations):
        """One prefill or decode step of a client's split generation, on its request's trunk cache."""
        where = f"client {msg.client} step {msg.step}"
        if msg.train:
            raise self.boundary.refuse("malformed", where, "a training forward cannot use a generation cache")
        if self.caches is None or self.boundary.limits.max_generations == 0:
            raise self.boundary.refuse("unexpected", where, "this server keeps no generation caches "
                                       "(boundary.max_generations: 0): generate without a cache")
        return self.caches.run(msg.client, msg.step, msg.cache, msg.past, msg.hidden, msg.lengths, self.runtime.infer)

    def _release(self, msg: Control) -> Control:
        """A client ends a generation request: its trunk cache goes (releasing an unknown one is harmless)."""
        request = msg.payload.get("cache")
        if not isinstance(request, int) or isinstance(request, bool):
            raise self.boundary.refuse("malformed", f"client {msg.client}", "release names no generation cache")
        if self.caches is not None:
            self.caches.release(msg.client, request)
        return Control(msg.client, msg.step, command="ack")

    def _enclave(self, msg: EnclaveMessage) -> EnclaveMessage:
        """TEE mode: relay a client's hello, sealed activations or sealed gradients to the enclave, unread."""
        if not getattr(self.runtime, "sealed", False):
            raise self.boundary.refuse("unexpected", f"client {msg.client}",
                                       f"enclave {msg.of} to a server whose trunk runs in no enclave (tee.mode: none)")
        sealed = self.boundary.sealed(msg)
        if msg.of == "hello":
            return EnclaveMessage(msg.client, msg.step, of="welcome", data=_u8(self.runtime.hello(msg.client, sealed.data)))
        if msg.of == "update":
            with self.lock:
                return self._submit(msg.client, msg.step, msg.round, sealed, None)
        if msg.of == "forward":
            part = Part(msg.client, msg.step, sealed, None)
            out = self.schedule.forward(part) if msg.train else self.runtime.infer(sealed, None)
            return EnclaveMessage(msg.client, msg.step, of="returned", data=_u8(out), rows=msg.rows, tokens=msg.tokens)
        def check(shape):
            if (msg.rows, msg.tokens) != tuple(shape[:2]):
                raise self.boundary.refuse("shape", f"client {msg.client} step {msg.step}",
                                           f"sealed gradient declared ({msg.rows}, {msg.tokens}, ...), expected {shape}")

        out = self._backward(msg, sealed, check)
        return EnclaveMessage(msg.client, msg.step, of="gradients", data=_u8(out), rows=msg.rows, tokens=msg.tokens)

    def _backward(self, msg: Message, grad, check):
        """``msg``'s step's backward with ``grad`` (a tensor, or sealed to the enclave), once ``check(shape)``
        accepts it against the ``dL/dh2`` shape the step owes; StepAborted (counted) if no step is pending."""
        shape = self.schedule.grad_shape(msg.client, msg.step)
        try:
            if shape is None:
                raise StepAborted(f"client {msg.client} step {msg.step}: no forward pass pending for this step "
                                  "(it was dropped, or the server restarted): redo the step")
            check(shape)
            return self.schedule.backward(msg.client, msg.step, grad)
        except StepAborted:
            self.boundary.count("aborted")
            raise

    def _on_drop(self, client: int) -> None:
        """A client was dropped: rounds it held up may now complete; its generation caches go."""
        if self.caches is not None:
            self.caches.release(client)
        with self.lock:
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
        if self.on_round is not None:
            self.on_round(round_)

    def state_dict(self) -> dict:
        return {**self.runtime.state_dict(), **self.aggregator.state_dict()}

    def restore(self, state: dict) -> None:
        self.runtime.load_state_dict(state)
        self.aggregator.load_state_dict(state)
        log.warning("resumed from checkpoint %s: round %d done, %d trunk steps", self.checkpoint,
                    state["round"], self.steps)

    def _submit(self, client: int, step: int, round_: int, tensors, num_examples) -> Control:
        """A client's FedAvg update (``tensors``: sealed to the enclave in TEE mode, its example count inside)."""
        late = round_ <= self.aggregator.latest()[0]  # fields are typed by the codec
        try:
            closed = self.aggregator.submit(client, round_, tensors, num_examples)
        except ProtocolError as exc:
            raise self.boundary.refuse("update", "update", str(exc)) from None
        if closed:
            self._round_done(round_)
        elif client not in self.schedule.active and round_ > self.aggregator.latest()[0]:
            self.schedule.rejoin(client)  # dropped mid-round, it trained on: the round waits for it again
        return Control(client, step, command="ack",
                       payload={"late": True, "open_round": self.aggregator.latest()[0] + 1} if late else {})

    @staticmethod
    def _average(msg: Message, round_: int, aggregate) -> Message:
        """A round's average for the client that asked: sealed for it by the enclave in TEE mode."""
        if hasattr(aggregate, "seal_for"):
            return EnclaveMessage(msg.client, msg.step, of="aggregate", data=_u8(aggregate.seal_for(msg.client, msg.step)),
                                  round=round_)
        return Aggregation(msg.client, msg.step, tensors=aggregate, round=round_)

    def _control(self, msg: Message) -> Message:
        if isinstance(msg, Aggregation):
            return self._submit(msg.client, msg.step, msg.round, msg.tensors, msg.num_examples)
        if isinstance(msg, Control) and msg.command == "join":
            round_, aggregate = self.aggregator.latest()
            if aggregate is None:
                return Control(msg.client, msg.step, command="joined", payload={"round": round_})
            return self._average(msg, round_, aggregate)
        if isinstance(msg, Control) and msg.command == "fetch_aggregate":
            round_ = msg.payload.get("round", -1)  # an integer: the codec checked every field's type
            result = self.aggregator.result(round_)
            latest, newest = self.aggregator.latest()
            if result is None and round_ < latest:  # long closed and forgotten: it fell behind, give it the newest
                round_, result = latest, newest
            if result is None:
                return Control(msg.client, msg.step, command="not_ready", payload={"round": round_})
            return self._average(msg, round_, result)
        if isinstance(msg, Control) and msg.command == "bye":
            self.presence.finish(msg.client)
            if self.presence.over(None):
                self.finished.set()
            return Control(msg.client, msg.step, command="ack")
        raise self.boundary.refuse("unexpected", f"client {msg.client}", f"unexpected {msg.kind} message"
                                   + (f" ({msg.command!r})" if isinstance(msg, Control) else ""))
