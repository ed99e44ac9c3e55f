"""The server's boundary checks: what a client's activations and gradients must be before the trunk runs.

Every tensor a client sends is hostile until checked: it must be a floating-point
tensor of the expected shape, finite, and within the run's limits on batch size and
sequence length; the per-sample lengths must be integers within the sequence. A
message that fails is refused with one ``ProtocolError`` line naming the client, the
step and what was wrong, and counted by reason; nothing in the trunk is touched.

The limits come from the run's configuration (``boundary:``), by default the run's own
largest batch and ``data.max_length``, capped by the model's context length: an honest
client never sends more, so anything larger is an attack on the server's memory.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from dataclasses import dataclass

import torch

from ..errors import ProtocolError
from ..protocol.messages import EnclaveMessage, SealedTensor

log = logging.getLogger(__name__)

HELLO_BYTES = 1024  # an enclave hello is 128 bytes
SEALED_OVERHEAD = 16 << 10  # a sealed message's header, JSON and tag beyond its tensors' bytes


@dataclass
class BoundarySettings:
    """The ``boundary:`` config section: the largest batch and sequence a client may send."""

    max_batch: int | None = None
    """The largest batch a client may send; null: the run's largest (``train.batch_size``, ``train.eval_batch_size``)."""
    max_length: int | None = None
    """The longest sequence a client may send; null: ``data.max_length``, capped by the model's context length."""
    max_generations: int = 2
    """The generation caches one client may hold on the server at once."""
    cache_mb: float = 512.0
    """The memory the server's generation caches may take, all clients together (MiB)."""
    cache_idle_seconds: float = 120.0
    """A generation cache unused this long (seconds) is dropped."""

    def validate(self, bad) -> None:
        for key in ("max_batch", "max_length"):
            value = getattr(self, key)
            if value is not None and value < 1:
                bad(f"boundary.{key}", "must be at least 1 (or null for the run's own value)")
        if self.max_generations < 0:
            bad("boundary.max_generations", "must be at least 0 (0: no cached generation)")
        for key in ("cache_mb", "cache_idle_seconds"):
            if not getattr(self, key) > 0:
                bad(f"boundary.{key}", "must be positive")


@dataclass
class Limits:
    """Resolved limits the trunk server enforces."""

    max_batch: int
    max_length: int
    hidden: int
    max_examples: int | None = None  # per FedAvg update: the examples a client can train on in one round
    max_generations: int = 2  # live generation caches per client
    cache_bytes: int = 512 << 20  # generation caches, all clients together
    cache_idle_seconds: float = 120.0

    @classmethod
    def resolve(cls, settings: BoundarySettings, model_config, batch_size: int, eval_batch_size: int,
                max_length: int, local_steps: int) -> Limits:
        context = (getattr(model_config, "max_position_embeddings", None)
                   or getattr(model_config, "n_positions", None) or max_length)
        max_batch = settings.max_batch or max(batch_size, eval_batch_size)
        return cls(max_batch=max_batch, max_length=min(settings.max_length or max_length, context),
                   hidden=model_config.hidden_size, max_examples=local_steps * max_batch,
                   max_generations=settings.max_generations, cache_bytes=int(settings.cache_mb * (1 << 20)),
                   cache_idle_seconds=settings.cache_idle_seconds)

    @classmethod
    def unbounded(cls, model_config) -> Limits:
        """Shape checks only (for tests and tools that build a server without a run config)."""
        context = getattr(model_config, "max_position_embeddings", None) or getattr(model_config, "n_positions", 4096)
        return cls(max_batch=1 << 16, max_length=context, hidden=model_config.hidden_size)

    def message_bytes(self, extra: int = 0) -> int:
        """Largest honest message: fp32 activations at the limits (+ ``extra``, e.g. an adapter update)."""
        return max(self.max_batch * self.max_length * self.hidden * 4, extra) + (64 << 10)


class Boundary:
    """Checks incoming tensors against the limits; counts refusals by reason."""

    def __init__(self, limits: Limits, update_bytes: int | None = None):
        """``update_bytes``: the size of an honest FedAvg update in float32 (bounds sealed updates; None: unbounded)."""
        self.limits, self.update_bytes = limits, update_bytes
        self.rejected: Counter[str] = Counter()
        self._lock = threading.Lock()

    def count(self, reason: str) -> None:
        with self._lock:
            self.rejected[reason] += 1

    def refuse(self, reason: str, where: str, detail: str) -> ProtocolError:
        self.count(reason)
        log.warning("refused (%s) %s: %s", reason, where, detail)
        return ProtocolError(f"{where}: {detail}")

    def _tensor(self, t, name: str, where: str, float_only: bool = True) -> torch.Tensor:
        if not isinstance(t, torch.Tensor):
            raise self.refuse("malformed", where, f"{name} missing")
        if float_only and not t.is_floating_point():
            raise self.refuse("dtype", where, f"{name} must be floating point, got {t.dtype}")
        if float_only and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise self.refuse("non_finite", where, f"{name} holds {bad} non-finite values (NaN or Inf)")
        return t

    def activations(self, client: int, step: int, hidden, lengths) -> None:
        """``h1`` (B, T, H) and ``lengths`` (B,) from a client's forward message."""
        where, lim = f"client {client} step {step}", self.limits
        if isinstance(hidden, torch.Tensor) and (hidden.ndim != 3 or hidden.shape[-1] != lim.hidden):
            raise self.refuse("shape", where, f"activations must be (B, T, {lim.hidden}), got {tuple(hidden.shape)}")
        if isinstance(hidden, torch.Tensor):
            b, t, _ = hidden.shape
            if b < 1 or t < 1:
                raise self.refuse("shape", where, f"activations must hold at least one token, got {tuple(hidden.shape)}")
            if b > lim.max_batch:
                raise self.refuse("limit", where, f"batch of {b} exceeds the limit of {lim.max_batch} "
                                  "(boundary.max_batch)")
            if t > lim.max_length:
                raise self.refuse("limit", where, f"sequence of {t} tokens exceeds the limit of {lim.max_length} "
                                  "(boundary.max_length)")
        if isinstance(lengths, torch.Tensor) and isinstance(hidden, torch.Tensor):
            if lengths.shape != (hidden.shape[0],) or lengths.is_floating_point() or lengths.dtype == torch.bool:
                raise self.refuse("shape", where, f"lengths must be ({hidden.shape[0]},) integers, got "
                                  f"{tuple(lengths.shape)} {lengths.dtype}")
            if int(lengths.min()) < 1 or int(lengths.max()) > hidden.shape[1]:
                raise self.refuse("shape", where, f"lengths outside 1..{hidden.shape[1]}")
        elif isinstance(hidden, torch.Tensor):
            raise self.refuse("malformed", where, "lengths missing")
        self._tensor(hidden, "activations", where)

    def sealed(self, msg: EnclaveMessage) -> SealedTensor:
        """What the host can check of a message a client sealed to the enclave (TEE mode): its kind, that it is
        bytes, the declared batch and sequence within the limits and the size within what they allow. The
        enclave checks the rest once it has opened it."""
        where, lim = f"client {msg.client} step {msg.step}", self.limits
        if msg.of not in ("hello", "forward", "gradients", "update"):
            raise self.refuse("malformed", where, f"a client cannot send an enclave {msg.of!r} message")
        data = msg.data
        if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8 or data.ndim != 1:
            raise self.refuse("malformed", where, f"enclave {msg.of}: data must be bytes (a 1-D uint8 tensor)")
        if msg.of == "hello":
            if data.numel() > HELLO_BYTES:
                raise self.refuse("oversized", where, f"enclave hello of {data.numel()} bytes")
            return SealedTensor(msg.client, msg.step, msg.of, data.numpy().tobytes(), ())
        if msg.of == "update":
            if self.update_bytes is not None and data.numel() > self.update_bytes + SEALED_OVERHEAD:
                raise self.refuse("oversized", where, f"sealed update of {data.numel()} bytes (at most "
                                  f"{self.update_bytes + SEALED_OVERHEAD})")
            return SealedTensor(msg.client, msg.step, msg.of, data.numpy().tobytes(), (), round=msg.round)
        if not 1 <= msg.rows <= lim.max_batch:
            raise self.refuse("limit", where, f"sealed batch of {msg.rows} outside 1..{lim.max_batch} "
                              "(boundary.max_batch)")
        if not 1 <= msg.tokens <= lim.max_length:
            raise self.refuse("limit", where, f"sealed sequence of {msg.tokens} tokens outside 1..{lim.max_length} "
                              "(boundary.max_length)")
        bound = msg.rows * msg.tokens * lim.hidden * 4 + msg.rows * 8 + SEALED_OVERHEAD
        if data.numel() > bound:
            raise self.refuse("oversized", where, f"sealed {msg.of} of {data.numel()} bytes for "
                              f"({msg.rows}, {msg.tokens}, {lim.hidden}) (at most {bound})")
        return SealedTensor(msg.client, msg.step, msg.of, data.numpy().tobytes(), (msg.rows, msg.tokens, lim.hidden),
                            msg.train)

    def gradient(self, client: int, step: int, grad, shape: tuple[int, ...]) -> None:
        """``dL/dh2`` from a client: the shape of the ``h2`` it answers, float, finite."""
        where = f"client {client} step {step}"
        if isinstance(grad, torch.Tensor) and tuple(grad.shape) != tuple(shape):
            raise self.refuse("shape", where, f"gradient must have shape {tuple(shape)}, got {tuple(grad.shape)}")
        self._tensor(grad, "gradient", where)

    def computed(self, client: int, step: int, name: str, t: torch.Tensor) -> None:
        """The trunk's own output or gradients from a client's input: refuse the step if they overflowed."""
        if not bool(torch.isfinite(t).all()):
            raise self.refuse("non_finite", f"client {client} step {step}",
                              f"{name} overflowed to non-finite values: step refused, trunk unchanged")
