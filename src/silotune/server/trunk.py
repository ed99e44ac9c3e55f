"""The trunk server: runs the middle blocks for every client and trains its own adapters.

It only ever sees a client's head output ``h1`` and the gradient ``dL/dh2`` it sends
back, never tokens, labels, logits or the loss. It also hosts the federated average of
the clients' adapters. One ``handle`` entry point serves every transport.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import torch

from ..adapters import load_trainable_state, trainable_state
from ..errors import ProtocolError
from ..models.partition import Stage
from ..protocol.messages import Aggregation, Control, ForwardActivations, Gradients, Message, ReturnedActivations
from ..train.optim import OptimSettings, Stepper, trainable
from . import checkpoint as ckpt
from .aggregation import FedAvg
from .schedules import Sequential

log = logging.getLogger(__name__)


class TrunkServer:
    def __init__(self, trunk: Stage, n_clients: int, optim: OptimSettings, client_timeout: float | None = None,
                 checkpoint: Path | None = None):
        self.trunk = trunk
        self.schedule = Sequential(n_clients, client_timeout, on_drop=self._on_drop)
        self.lock = threading.RLock()  # one trunk: transports may call from many threads
        self.hidden_size = trunk.config.hidden_size
        self.n_clients = n_clients
        self.stepper = Stepper(trainable(trunk), optim)
        self.aggregator = FedAvg(n_clients, expected=lambda: set(self.schedule.active))
        self.checkpoint = checkpoint
        self.pending: dict[int, tuple[int, torch.Tensor, torch.Tensor]] = {}
        self.steps = 0
        self.finished_clients: set[int] = set()
        self.finished = threading.Event()  # set once every client has said goodbye
        if checkpoint is not None and Path(checkpoint).is_file():
            self.restore(ckpt.load(Path(checkpoint)))

    def handle(self, msg: Message) -> Message:
        if not 0 <= msg.client < self.n_clients:
            raise ProtocolError(f"message from unknown client {msg.client}")
        if isinstance(msg, ForwardActivations):
            self._check_activations(msg)
            if msg.train:
                self.schedule.wait_turn(msg.client)
            with self.lock:
                return self._forward(msg)
        if isinstance(msg, Gradients):
            self.schedule.touch(msg.client)
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

    def _round_done(self, round_: int) -> None:
        log.info("round %d averaged", round_)
        if self.checkpoint is not None:
            ckpt.save(Path(self.checkpoint), self.state_dict())

    def state_dict(self) -> dict:
        round_, aggregate = self.aggregator.latest()
        return {"trunk": trainable_state(self.trunk), "optim": self.stepper.state_dict(), "steps": self.steps,
                "round": round_, "aggregate": aggregate or {}}

    def restore(self, state: dict) -> None:
        load_trainable_state(self.trunk, state["trunk"])
        self.stepper.load_state_dict(state["optim"])
        self.steps = state["steps"]
        if state["round"] >= 0:
            self.aggregator.results[state["round"]] = state["aggregate"]
        log.warning("resumed from checkpoint %s: round %d done, %d trunk steps", self.checkpoint,
                    state["round"], self.steps)

    def _control(self, msg: Message) -> Message:
        if isinstance(msg, Aggregation):
            if self.aggregator.submit(msg.client, msg.round, msg.tensors, msg.num_examples):
                self._round_done(msg.round)
            return Control(msg.client, msg.step, command="ack")
        if isinstance(msg, Control) and msg.command == "join":
            round_, aggregate = self.aggregator.latest()
            if aggregate is None:
                return Control(msg.client, msg.step, command="joined", payload={"round": round_})
            return Aggregation(msg.client, msg.step, tensors=aggregate, round=round_)
        if isinstance(msg, Control) and msg.command == "fetch_aggregate":
            round_ = int(msg.payload.get("round", -1))
            result = self.aggregator.result(round_)
            if result is None:
                return Control(msg.client, msg.step, command="not_ready", payload={"round": round_})
            return Aggregation(msg.client, msg.step, tensors=result, round=round_)
        if isinstance(msg, Control) and msg.command == "bye":
            self.finished_clients.add(msg.client)
            if len(self.finished_clients) == self.n_clients:
                self.finished.set()
            return Control(msg.client, msg.step, command="ack")
        raise ProtocolError(f"client {msg.client}: unexpected {msg.kind} message")

    def _check_activations(self, msg: ForwardActivations) -> None:
        h, lengths = msg.hidden, msg.lengths
        if h is not None and not h.is_floating_point():
            raise ProtocolError(f"client {msg.client} step {msg.step}: activations must be floating point, "
                                f"got {h.dtype}")
        if h is None or h.ndim != 3 or h.shape[-1] != self.hidden_size:
            raise ProtocolError(f"client {msg.client} step {msg.step}: activations must be (B, T, "
                                f"{self.hidden_size}), got {tuple(h.shape) if h is not None else None}")
        if lengths is None or lengths.shape != (h.shape[0],) or lengths.is_floating_point():
            raise ProtocolError(f"client {msg.client} step {msg.step}: lengths must be ({h.shape[0]},) integers")
        if int(lengths.min()) < 1 or int(lengths.max()) > h.shape[1]:
            raise ProtocolError(f"client {msg.client} step {msg.step}: lengths outside 1..{h.shape[1]}")

    def _forward(self, msg: ForwardActivations) -> ReturnedActivations:
        if not msg.train:
            with torch.no_grad():
                return ReturnedActivations(msg.client, msg.step, hidden=self.trunk(msg.hidden, msg.lengths))
        h1 = msg.hidden.detach().requires_grad_(True)
        h2 = self.trunk(h1, msg.lengths)
        if msg.client in self.pending:
            log.warning("client %d: dropping unfinished step %d", msg.client, self.pending[msg.client][0])
        self.pending[msg.client] = (msg.step, h1, h2)
        return ReturnedActivations(msg.client, msg.step, hidden=h2.detach())

    def _backward(self, msg: Gradients) -> Gradients:
        if msg.client not in self.pending:
            raise ProtocolError(f"client {msg.client} step {msg.step}: gradients without a forward pass")
        step, h1, h2 = self.pending[msg.client]
        if step != msg.step:
            raise ProtocolError(f"client {msg.client}: gradients for step {msg.step}, pending step is {step}")
        if msg.grad is None or msg.grad.shape != h2.shape or not msg.grad.is_floating_point():
            raise ProtocolError(f"client {msg.client} step {msg.step}: gradient must be a float tensor of shape "
                                f"{tuple(h2.shape)}, got {None if msg.grad is None else (tuple(msg.grad.shape), msg.grad.dtype)}")
        del self.pending[msg.client]
        self.stepper.zero_grad()
        h2.backward(msg.grad.to(h2.dtype))
        self.stepper.step()
        self.steps += 1
        return Gradients(msg.client, msg.step, grad=h1.grad)
