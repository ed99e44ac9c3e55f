"""The client runtime: a data owner's head and tail, its optimizer, and one split step.

Tokens and labels never leave this object: only the head's output ``h1``, per-sample
lengths and the tail's gradient ``dL/dh2`` go to the server, through whatever transport
the client was given, each after the client's privacy defences (``privacy.defences``:
clipping and noise) have been applied.

The head and tail run on the client's device in its compute dtype (``compute.Compute``);
what goes to the transport is always a CPU float32 tensor (``to_wire``) and what comes back
is moved onto the device. The defences run on the wire tensor (CPU, float32), so a client's
noise stream does not depend on its device.
"""

from __future__ import annotations

import logging

import torch

from ..adapters import load_trainable_state, trainable_state
from ..compute import Compute, dtype_name, fp32_trainables, to_wire
from ..errors import ModelError, ProtocolError, StepAborted
from ..models.partition import Stage
from ..privacy.defences import ClientDefence, PrivacySettings
from ..protocol.messages import Aggregation, Control, ForwardActivations, Gradients, ReturnedActivations
from ..train.batching import drop_last_token
from ..train.loss import lm_loss
from ..train.optim import OptimSettings, Stepper, trainable
from ..transport.base import Transport

log = logging.getLogger(__name__)


def adapter_state(head: Stage, tail: Stage) -> dict[str, torch.Tensor]:
    """A client's trainable head and tail tensors as one update, named ``head.*`` / ``tail.*`` (CPU, float32)."""
    state = {f"head.{k}": to_wire(v) for k, v in trainable_state(head).items()}
    state.update({f"tail.{k}": to_wire(v) for k, v in trainable_state(tail).items()})
    return state


class SplitClient:
    def __init__(self, client_id: int, head: Stage, tail: Stage, transport: Transport,
                 optim: OptimSettings, privacy: PrivacySettings | None = None, seed: int = 0,
                 compute: Compute | None = None):
        """``compute``: where the head and tail run (default: where their weights are, in their dtype);
        the stages are moved to its device and must already hold their base weights in its dtype."""
        self.id = client_id
        self.head, self.tail = head, tail
        if getattr(head.config, "tie_word_embeddings", False):
            tail.lm_head.weight = head.embed.weight  # one tensor, as in the unsplit model
        self.compute = compute or Compute.of(head)
        for stage in (head, tail):
            if (found := Compute.of(stage).dtype) != self.compute.dtype:
                raise ModelError(f"client {client_id}: stage weights are {dtype_name(found)} but the compute dtype "
                                 f"is {dtype_name(self.compute.dtype)}: load the stages in the compute dtype")
            stage.to(self.compute.device)  # adapters made after loading (prefixes) are still on the CPU
        fp32_trainables(head, tail)  # adapters train in float32 over a bf16 base
        self.transport = transport
        self.stepper = Stepper(trainable(head, tail), optim)
        self.defence = ClientDefence(privacy, seed * 1000 + client_id)
        self.step = 0
        self.examples_seen = 0

    # ---- one U-shaped split step ----
    def _head(self, batch) -> torch.Tensor:
        """The head's output as it leaves the client: defended, on the CPU in float32, still differentiable."""
        h1 = self.head(self.compute.inputs(batch["input_ids"]), self.compute.to_device(batch["lengths"]))
        return self.defence.activations(h1.to("cpu", torch.float32), batch["lengths"].cpu())

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
            ForwardActivations(self.id, self.step, hidden=to_wire(h1), lengths=to_wire(sent["lengths"]))),
            ReturnedActivations)
        h2 = self.compute.inputs(reply.hidden).detach().requires_grad_(True)
        logits = self.tail(h2, self.compute.to_device(sent["lengths"]))
        loss = lm_loss(logits, self.compute.to_device(batch["labels"]))  # in float32
        loss.backward()
        grad = self.defence.gradients(to_wire(h2.grad), sent["lengths"].cpu())
        reply = self._expect(self.transport.call(Gradients(self.id, self.step, grad=to_wire(grad))), Gradients)
        if h1.requires_grad:  # h1 is the CPU float32 copy: autograd carries dL/dh1 back to the device and dtype
            h1.backward(reply.grad.to(h1.dtype))
        self.stepper.step()
        self.examples_seen += batch["input_ids"].shape[0]
        return loss.item()

    @torch.no_grad()
    def logits(self, batch) -> torch.Tensor:
        """Split inference: the full model's logits for a batch (CPU, float32), without training."""
        h1 = self._head(batch)
        reply = self._expect(self.transport.call(
            ForwardActivations(self.id, self.step, hidden=to_wire(h1), lengths=to_wire(batch["lengths"]), train=False)),
            ReturnedActivations)
        return to_wire(self.tail(self.compute.inputs(reply.hidden), self.compute.to_device(batch["lengths"])))

    # ---- federated averaging of head and tail adapters ----
    def adapter_state(self) -> dict[str, torch.Tensor]:
        return adapter_state(self.head, self.tail)

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load an aggregate (CPU float32): ``copy_`` moves each tensor onto its parameter's device and dtype."""
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
