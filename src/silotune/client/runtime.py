"""The client runtime: a data owner's head and tail, its optimizer, and one split step.

Tokens and labels never leave this object: only the head's output ``h1``, per-sample
lengths and the tail's gradient ``dL/dh2`` go to the server, through whatever transport
the client was given, each after the client's privacy defences (``privacy.defences``:
clipping and noise) have been applied.
"""

from __future__ import annotations

import logging

import torch

from ..adapters import load_trainable_state, trainable_state
from ..errors import ProtocolError, StepAborted
from ..models.partition import Stage
from ..privacy.defences import ClientDefence, PrivacySettings
from ..protocol.messages import Aggregation, Control, ForwardActivations, Gradients, ReturnedActivations
from ..train.batching import drop_last_token
from ..train.loss import lm_loss
from ..train.optim import OptimSettings, Stepper, trainable
from ..transport.base import Transport

log = logging.getLogger(__name__)


def adapter_state(head: Stage, tail: Stage) -> dict[str, torch.Tensor]:
    """A client's trainable head and tail tensors as one update, named ``head.*`` / ``tail.*``."""
    state = {f"head.{k}": v for k, v in trainable_state(head).items()}
    state.update({f"tail.{k}": v for k, v in trainable_state(tail).items()})
    return state


class SplitClient:
    def __init__(self, client_id: int, head: Stage, tail: Stage, transport: Transport,
                 optim: OptimSettings, privacy: PrivacySettings | None = None, seed: int = 0):
        self.id = client_id
        self.head, self.tail = head, tail
        if getattr(head.config, "tie_word_embeddings", False):
            tail.lm_head.weight = head.embed.weight  # one tensor, as in the unsplit model
        self.transport = transport
        self.stepper = Stepper(trainable(head, tail), optim)
        self.defence = ClientDefence(privacy, seed * 1000 + client_id)
        self.step = 0
        self.examples_seen = 0

    # ---- one U-shaped split step ----
    def _head(self, batch) -> torch.Tensor:
        return self.defence.activations(self.head(batch["input_ids"], batch["lengths"]), batch["lengths"])

    def _expect(self, reply, cls):
        if not isinstance(reply, cls):
            raise ProtocolError(f"client {self.id}: expected {cls.kind}, server sent {reply.kind}")
        return reply

    def train_step(self, batch, redo: int = 3) -> float:
        """One split step. It is redone (up to ``redo`` times) when the server dropped it (our turn
        expired: ``StepAborted``) or restarted in the middle of it (a new session)."""
        for attempt in range(redo + 1):
            epoch = self.transport.epoch
            try:
                return self._train_step(batch)
            except ProtocolError as exc:
                if attempt == redo or not (isinstance(exc, StepAborted) or self.transport.epoch != epoch):
                    raise
                log.warning("client %d: step %d was dropped by the server (%s); redoing it", self.id, self.step,
                            exc)
                self.step -= 1
                self.stepper.zero_grad()
        raise AssertionError("unreachable")

    def _train_step(self, batch) -> float:
        self.step += 1
        self.stepper.zero_grad()
        sent = drop_last_token(batch)  # the last token predicts nothing: never send it
        h1 = self._head(sent)
        reply = self._expect(self.transport.call(
            ForwardActivations(self.id, self.step, hidden=h1.detach(), lengths=sent["lengths"])),
            ReturnedActivations)
        h2 = reply.hidden.detach().requires_grad_(True)
        loss = lm_loss(self.tail(h2, sent["lengths"]), batch["labels"])
        loss.backward()
        grad = self.defence.gradients(h2.grad, sent["lengths"])
        reply = self._expect(self.transport.call(Gradients(self.id, self.step, grad=grad)), Gradients)
        if h1.requires_grad:
            h1.backward(reply.grad.to(h1.dtype))
        self.stepper.step()
        self.examples_seen += batch["input_ids"].shape[0]
        return loss.item()

    @torch.no_grad()
    def logits(self, batch) -> torch.Tensor:
        """Split inference: the full model's logits for a batch, without training."""
        h1 = self._head(batch)
        reply = self._expect(self.transport.call(
            ForwardActivations(self.id, self.step, hidden=h1, lengths=batch["lengths"], train=False)),
            ReturnedActivations)
        return self.tail(reply.hidden, batch["lengths"])

    # ---- federated averaging of head and tail adapters ----
    def adapter_state(self) -> dict[str, torch.Tensor]:
        return adapter_state(self.head, self.tail)

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        load_trainable_state(self.head, {k[5:]: v for k, v in state.items() if k.startswith("head.")})
        load_trainable_state(self.tail, {k[5:]: v for k, v in state.items() if k.startswith("tail.")})

    def push_update(self, round_: int, num_examples: int) -> None:
        """Send this client's adapters for ``round_``, weighted by the examples it trained on in the round."""
        self._expect(self.transport.call(Aggregation(
            self.id, self.step, tensors=self.adapter_state(), num_examples=num_examples, round=round_)), Control)

    def join(self) -> int:
        """Announce this client; load the latest average if a round is done. Returns the next round."""
        reply = self.transport.call(Control(self.id, self.step, command="join"))
        if isinstance(reply, Aggregation):
            self.load_adapter_state(reply.tensors)
            return reply.round + 1
        return int(self._expect(reply, Control).payload.get("round", -1)) + 1

    def finish(self) -> None:
        """Tell the server this client has finished training."""
        self._expect(self.transport.call(Control(self.id, self.step, command="bye")), Control)

    def pull_aggregate(self, round_: int) -> bool:
        """Load the round's average if the server has it; False while it is not ready."""
        reply = self.transport.call(Control(self.id, self.step, command="fetch_aggregate",
                                            payload={"round": round_}))
        if isinstance(reply, Control) and reply.command == "not_ready":
            return False
        self.load_adapter_state(self._expect(reply, Aggregation).tensors)
        return True
