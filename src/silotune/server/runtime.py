"""The trunk runtime: forward, backward and the optimizer of the server's stage, nothing else.

It runs one *pass* over the ``h1`` of one or several clients (a schedule decides which):
their activations are right-padded to the longest sequence and concatenated along the
batch, the trunk runs once, and each client gets its own rows back, cut to its length.
The backward takes each client's ``dL/dh2`` for its rows (zeros for a client that sent
none), runs one backward and one optimizer step, and returns each client its rows of
``dL/dh1``. Samples never mix in a transformer block (masks are rebuilt from the
per-sample lengths), so a client's rows are what a pass of its batch alone would give.

The trunk's own output and gradients must stay finite: a client whose rows overflow is
refused (``ProtocolError``) and the others in the pass go on, found by re-running the
backward one client at a time (only under attack: an honest pass never takes that path);
when the trunk's gradient is not finite the step is refused and the trunk is unchanged.

The stage lives on the runtime's device in its compute dtype (``compute.Compute``);
everything it returns is a CPU float32 tensor for the wire.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..adapters import load_trainable_state, trainable_state
from ..compute import Compute
from ..errors import ProtocolError
from ..models.partition import Stage
from ..train.optim import OptimSettings, Stepper, trainable
from .boundary import Boundary


@dataclass
class Part:
    """One client's share of a pass: its ``h1`` (B, T, H) and per-sample lengths (B,)."""

    client: int
    step: int
    h1: torch.Tensor
    lengths: torch.Tensor

    @property
    def where(self) -> str:
        return f"client {self.client} step {self.step}"


@dataclass
class Pass:
    """A trunk forward kept for its backward. ``refused[i]`` holds the error of a part whose
    rows overflowed (it takes no further part), ``rows[i]`` the batch rows of part i."""

    parts: list[Part]
    rows: list[slice]
    h1: torch.Tensor | None = None
    h2: torch.Tensor | None = None
    refused: dict[int, ProtocolError] = field(default_factory=dict)

    def output(self, i: int) -> torch.Tensor:
        """Part i's ``h2`` (CPU float32, its own sequence length); raises its refusal."""
        if i in self.refused:
            raise self.refused[i]
        return _wire(self.h2[self.rows[i], : self.parts[i].h1.shape[1]])

    def shape(self, i: int) -> tuple[int, ...]:
        """The shape of the ``dL/dh2`` part i must send."""
        return tuple(self.parts[i].h1.shape)


def _wire(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float32)


class TrunkRuntime:
    def __init__(self, trunk: Stage, optim: OptimSettings, boundary: Boundary, compute: Compute | None = None):
        self.trunk = trunk
        self.compute = compute or Compute.default()
        self.stepper = Stepper(trainable(trunk), optim)
        self.boundary = boundary
        self.steps = 0  # optimizer steps taken
        self.lock = threading.RLock()  # one trunk: passes, steps and snapshots never interleave

    def _inputs(self, parts: list[Part]) -> tuple[torch.Tensor, torch.Tensor, list[slice]]:
        if len(parts) == 1:
            return self.compute.inputs(parts[0].h1), self.compute.to_device(parts[0].lengths), [slice(None)]
        width = max(p.h1.shape[1] for p in parts)
        hs = [F.pad(p.h1, (0, 0, 0, width - p.h1.shape[1])) for p in parts]  # right padding, masked by lengths
        rows, at = [], 0
        for p in parts:
            rows.append(slice(at, at + p.h1.shape[0]))
            at += p.h1.shape[0]
        lengths = torch.cat([p.lengths for p in parts])
        return self.compute.inputs(torch.cat(hs)), self.compute.to_device(lengths), rows

    @torch.no_grad()
    def infer(self, h1: torch.Tensor, lengths: torch.Tensor, cache=None) -> torch.Tensor:
        """Evaluation and generation: ``h2`` without keeping a graph or touching the optimizer; with a ``cache``
        (``models.kvcache.KVCache``) the tokens continue the cached ones and are appended to it."""
        with self.lock:
            return _wire(self.trunk(self.compute.inputs(h1), self.compute.to_device(lengths), cache))

    def forward(self, parts: list[Part]) -> Pass:
        """One trunk pass over the parts' concatenated ``h1``; parts whose rows overflow are refused."""
        with self.lock:
            h1, lengths, rows = self._inputs(parts)
            h1 = h1.detach().requires_grad_(True)
            h2 = self.trunk(h1, lengths)
            bad = [i for i, r in enumerate(rows) if not bool(torch.isfinite(h2[r]).all())]
            if not bad:
                return Pass(parts, rows, h1, h2)
        refused = {i: self._refuse(parts[i], "trunk output") for i in bad}
        rest = [i for i in range(len(parts)) if i not in refused]
        if not rest:
            return Pass(parts, rows, refused=refused)
        inner = self.forward([parts[i] for i in rest])  # the rest, without the overflowing rows
        out = Pass(parts, [slice(0, 0)] * len(parts), inner.h1, inner.h2, refused)
        for j, i in enumerate(rest):
            if j in inner.refused:
                out.refused[i] = inner.refused[j]
            out.rows[i] = inner.rows[j]
        return out

    def _refuse(self, part: Part, name: str) -> ProtocolError:
        return self.boundary.refuse("non_finite", part.where,
                                    f"{name} overflowed to non-finite values: step refused, trunk unchanged")

    def backward(self, pass_: Pass, grads: dict[int, torch.Tensor]) -> dict[int, torch.Tensor | ProtocolError]:
        """One backward and one optimizer step from ``grads`` (part index -> ``dL/dh2``, already checked
        by the boundary); returns each part's ``dL/dh1``, or the error that refused it."""
        with self.lock:
            sent = sorted(i for i in grads if i not in pass_.refused)
            out: dict[int, torch.Tensor | ProtocolError] = {}
            if self._run_backward(pass_, grads, sent):
                if len(sent) > 1:  # someone's gradient overflowed the trunk: find who, one at a time
                    out.update({i: self._refuse(pass_.parts[i], "trunk gradient") for i in sent
                                if self._run_backward(pass_, grads, [i])})
                    sent = [i for i in sent if i not in out]
                if sent and (len(out) == 0 or self._run_backward(pass_, grads, sent)):
                    out.update({i: self._refuse(pass_.parts[i], "trunk gradient") for i in sent})
                    sent = []
            if not sent:
                self.stepper.zero_grad()
                return out
            self.stepper.step()
            self.steps += 1
            for i in sent:
                out[i] = _wire(pass_.h1.grad[pass_.rows[i], : pass_.parts[i].h1.shape[1]])
            return out

    def _run_backward(self, pass_: Pass, grads: dict[int, torch.Tensor], which: list[int]) -> bool:
        """Backward with the gradients of parts ``which`` only (zeros elsewhere); True if it overflowed."""
        self.stepper.zero_grad()
        if not which:
            return False
        pass_.h1.grad = None
        if len(pass_.parts) == 1 and not pass_.refused:
            full = self.compute.inputs(grads[which[0]]).to(pass_.h2.dtype)
        else:
            full = torch.zeros_like(pass_.h2)
            for i in which:
                g = grads[i]
                full[pass_.rows[i], : g.shape[1]] = self.compute.inputs(g).to(full.dtype)
        pass_.h2.backward(full, retain_graph=True)  # kept until the step is known to be sound
        return self._unsound(pass_)

    def _unsound(self, pass_: Pass) -> bool:
        if not bool(torch.isfinite(pass_.h1.grad).all()):
            return True
        grads = [p.grad for p in self.stepper.params if p.grad is not None]
        return bool(grads) and not bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))

    # ---- state: checkpoints and replica averaging ----
    def state_dict(self) -> dict:
        with self.lock:
            return {"trunk": trainable_state(self.trunk), "optim": self.stepper.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        with self.lock:
            load_trainable_state(self.trunk, state["trunk"])
            self.stepper.load_state_dict(state["optim"])
            self.steps = state["steps"]
