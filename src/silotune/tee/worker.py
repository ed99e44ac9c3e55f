"""The untrusted worker of masked offload: it multiplies what it is sent by frozen weights.

In the TEE design (Huang et al., ICASSP 2024; Slalom, Tramer & Boneh 2019) the enclave keeps the
trainable structure and every non-linear op, and hands the bulk products of the frozen Linear
layers to a fast but untrusted device (the *worker*, a GPU in practice). The worker holds the
frozen weights by name and serves two products, on tensors the enclave has masked
(``silotune.tee.masking``):

* ``forward(name, masked)``: ``masked @ W.T`` (``masked`` = ``x + r``, rows of d_in);
* ``backward(name, masked_grad)``: ``masked_grad @ W`` (``masked_grad`` = ``g + s``, rows of d_out).

``W`` is stored ``(d_out, d_in)`` (the ``nn.Linear`` layout; GPT-2 Conv1D weights arrive
transposed). The worker never sees a mask alone, never unmasks and never computes ``r W^T``:
that is the enclave's job.

Two implementations behind one interface (``Worker``), so the enclave code never knows which:

* ``InProcessWorker``: same process (tests, and a GPU worker driven from the same process);
* ``ProcessWorker``: a separate process (``multiprocessing``, spawn start method) fed over a
  duplex pipe; tensors travel as raw bytes with their dtype and shape, exactly as they would on
  a network. A worker that dies raises ``WorkerError`` on the next (or the pending) call instead
  of hanging; ``close()`` shuts it down cleanly.

With ``record=True`` a worker keeps every tensor it received, in order (``received()``): the
worker's view, for audits and tests (weights included, as op ``"load"``).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
import weakref
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from ..errors import SiloTuneError

OPS = ("load", "forward", "backward")


class WorkerError(SiloTuneError):
    """The worker failed: it died, was closed, timed out, or refused a request."""


@dataclass(frozen=True)
class Received:
    """One tensor the worker received: the op, the layer name and the tensor itself."""

    op: str
    name: str
    tensor: torch.Tensor


class _Multiplier:
    """The worker's state and arithmetic, shared by both implementations."""

    def __init__(self, device: str | torch.device | None = None, record: bool = False):
        self.device = torch.device(device) if device is not None else None
        self.record = record
        self.weights: dict[str, torch.Tensor] = {}
        self.view: list[Received] = []
        self.flops = 0

    def handle(self, op: str, name: str, tensor: torch.Tensor) -> torch.Tensor | None:
        if op not in OPS:
            raise WorkerError(f"worker: unknown op {op!r}")
        if op == "load":
            if tensor.dim() != 2:
                raise WorkerError(f"worker: weight {name!r} must be 2-D (d_out, d_in), got shape {tuple(tensor.shape)}")
            w = tensor.detach().to(self.device or tensor.device, copy=True)
            self.weights[name] = w
            if self.record:
                self.view.append(Received(op, name, w))
            return None
        if name not in self.weights:
            raise WorkerError(f"worker: no weight named {name!r} (loaded: {len(self.weights)})")
        w = self.weights[name]
        if self.record:
            self.view.append(Received(op, name, tensor.detach().clone()))
        want = w.shape[1] if op == "forward" else w.shape[0]
        if tensor.dim() != 2 or tensor.shape[1] != want:
            raise WorkerError(f"worker: {op} {name!r} expects (rows, {want}), got {tuple(tensor.shape)}")
        if tensor.dtype != w.dtype:
            raise WorkerError(f"worker: {op} {name!r} got {tensor.dtype}, the weight is {w.dtype}")
        x = tensor.to(w.device)
        out = x @ w.t() if op == "forward" else x @ w
        self.flops += 2 * x.shape[0] * w.shape[0] * w.shape[1]
        return out


class Worker(ABC):
    """What the enclave may ask of a worker. Names are the layers' keys; weights are (d_out, d_in)."""

    @abstractmethod
    def load(self, name: str, weight: torch.Tensor) -> None:
        """Hand the worker the frozen weight of one layer (``(d_out, d_in)``, the offload dtype)."""

    @abstractmethod
    def forward(self, name: str, masked: torch.Tensor) -> torch.Tensor:
        """``masked @ W.T`` for rows ``masked`` of shape (n, d_in); the result on ``masked``'s device."""

    @abstractmethod
    def backward(self, name: str, masked_grad: torch.Tensor) -> torch.Tensor:
        """``masked_grad @ W`` for rows of shape (n, d_out); the result on ``masked_grad``'s device."""

    @abstractmethod
    def received(self, ops: tuple[str, ...] = OPS) -> list[Received]:
        """The worker's view: every tensor received (with ``record=True``), in order."""

    @abstractmethod
    def clear_received(self) -> None:
        """Forget the recorded view (keeps the weights)."""

    @abstractmethod
    def worker_flops(self) -> int:
        """Multiply-add FLOPs (2 per MAC) the worker has spent on forward and backward products."""

    def close(self) -> None:
        """Release the worker (a no-op in process)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class InProcessWorker(Worker):
    """A worker in the enclave's own process (tests; or a local GPU with ``device='cuda'``).

    It keeps its own copy of each weight, so it behaves like a separate party: changing the
    enclave's tensors afterwards does not change the worker's.
    """

    def __init__(self, device: str | torch.device | None = None, record: bool = False):
        self._m = _Multiplier(device, record)

    def load(self, name, weight):
        self._m.handle("load", name, weight)

    def forward(self, name, masked):
        return self._m.handle("forward", name, masked).to(masked.device)

    def backward(self, name, masked_grad):
        return self._m.handle("backward", name, masked_grad).to(masked_grad.device)

    def received(self, ops=OPS):
        return [r for r in self._m.view if r.op in ops]

    def clear_received(self):
        self._m.view.clear()

    def worker_flops(self):
        return self._m.flops


# ---- the separate-process worker ----

def _encode(t: torch.Tensor) -> tuple[str, tuple[int, ...], bytes]:
    """A tensor as (dtype name, shape, raw bytes), as it would travel on a network."""
    t = t.detach().to("cpu").contiguous()
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return str(t.dtype).removeprefix("torch."), tuple(t.shape), raw


def _decode(payload: tuple[str, tuple[int, ...], bytes]) -> torch.Tensor:
    dtype_name, shape, raw = payload
    dtype = getattr(torch, dtype_name)
    if not raw:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape)


def _serve(conn, device, record, threads) -> None:
    """The worker process: answer requests until told to close or the pipe breaks."""
    if threads:
        torch.set_num_threads(threads)
    m = _Multiplier(device, record)
    conn.send(("ready", None))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the enclave went away
            return
        op, name, payload = msg
        try:
            if op == "close":
                conn.send(("ok", None))
                return
            if op == "received":
                ops = tuple(payload)
                conn.send(("ok", [(r.op, r.name, _encode(r.tensor)) for r in m.view if r.op in ops]))
            elif op == "clear":
                m.view.clear()
                conn.send(("ok", None))
            elif op == "flops":
                conn.send(("ok", m.flops))
            elif op == "exit":  # tests: die without answering, as a crashed worker would
                import os

                os._exit(3)
            else:
                out = m.handle(op, name, _decode(payload))
                conn.send(("ok", None if out is None else _encode(out)))
        except Exception as exc:  # report, keep serving
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


def spawn(target, args: tuple, name: str, daemon: bool = False):
    """Start ``target(conn, *args)`` in a new process (spawn start method) and return (process, our end of a
    duplex pipe: a socket pair, so a dead peer gives EOF / EPIPE). The child's OpenMP threads sleep when idle
    (OMP_WAIT_POLICY=PASSIVE): enclave, worker and host share the cores, and threads that spin while their
    process waits for another's answer made every offloaded call 20x slower on a 2-core machine."""
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe(duplex=True)
    with _lock_env:
        before = os.environ.get("OMP_WAIT_POLICY")
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # inherited by the child at start
        try:
            process = ctx.Process(target=target, args=(child, *args), name=name, daemon=daemon)
            process.start()
        finally:
            if before is None:
                os.environ.pop("OMP_WAIT_POLICY", None)
            else:
                os.environ["OMP_WAIT_POLICY"] = before
    child.close()  # only the child holds its end, so its death closes the pipe
    return process, conn


_lock_env = threading.Lock()


def _reap(process, conn) -> None:
    try:
        conn.close()
    finally:
        if process.is_alive():
            process.kill()
            process.join(5)


class ProcessWorker(Worker):
    """A worker in a separate process (spawn start method), reached over a duplex pipe.

    ``timeout`` (seconds, None: no limit) bounds one request while the process is alive; a
    process that exits or is killed is noticed within ``poll`` seconds and reported as
    ``WorkerError`` naming its exit code, never as a hang. ``threads`` sets the worker's
    intra-op threads; ``device`` where it keeps the weights and multiplies ('cuda' on a GPU box).
    """

    def __init__(self, device: str | None = None, record: bool = False, threads: int | None = None,
                 timeout: float | None = None, start_timeout: float = 300.0, poll: float = 0.05):
        self.process, self._conn = spawn(_serve, (device, record, threads), "silotune-tee-worker", daemon=True)
        self.timeout, self.poll = timeout, poll
        self._lock = threading.Lock()
        self._closed = False
        self._broken: str | None = None
        self._finalizer = weakref.finalize(self, _reap, self.process, self._conn)
        status, _ = self._wait("start", "", start_timeout)
        if status != "ready":
            self._fail("start", "", f"unexpected first message {status!r}")

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def _fail(self, op, name, why) -> None:
        self._broken = why
        _reap(self.process, self._conn)
        where = f"{op} {name!r}" if name else op
        raise WorkerError(f"tee worker (pid {self.pid}) {why} during {where}")

    def _died(self, op, name) -> None:
        self.process.join(1)
        self._fail(op, name, f"died (exit code {self.process.exitcode})")

    def _wait(self, op, name, timeout):
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._conn.poll(self.poll):
            if not self.process.is_alive():
                if self._conn.poll(0):  # it answered, then exited
                    break
                self._died(op, name)
            if deadline is not None and time.monotonic() > deadline:
                self._fail(op, name, f"gave no answer within {timeout:g} s")
        try:
            return self._conn.recv()
        except (EOFError, OSError):
            self._died(op, name)

    def _call(self, op: str, name: str = "", payload=None):
        with self._lock:
            if self._closed:
                raise WorkerError("tee worker is closed")
            if self._broken:
                raise WorkerError(f"tee worker (pid {self.pid}) is unusable: it {self._broken}")
            try:
                self._conn.send((op, name, payload))
            except (BrokenPipeError, ConnectionResetError, OSError):
                self._died(op, name)
            status, value = self._wait(op, name, self.timeout)
        if status == "error":
            raise WorkerError(f"tee worker refused {op} {name!r}: {value}")
        return value

    def load(self, name, weight):
        self._call("load", name, _encode(weight))

    def forward(self, name, masked):
        return _decode(self._call("forward", name, _encode(masked))).to(masked.device)

    def backward(self, name, masked_grad):
        return _decode(self._call("backward", name, _encode(masked_grad))).to(masked_grad.device)

    def received(self, ops=OPS):
        return [Received(op, name, _decode(p)) for op, name, p in self._call("received", "", list(ops))]

    def clear_received(self):
        self._call("clear")

    def worker_flops(self):
        return self._call("flops")

    def close(self, timeout: float = 10.0) -> None:
        """Ask the worker to exit and wait for it (killed after ``timeout`` s); idempotent."""
        if self._closed:
            return
        with self._lock:
            self._closed = True
            if self.process.is_alive() and not self._broken:
                try:
                    self._conn.send(("close", "", None))
                    if self._conn.poll(timeout):
                        self._conn.recv()
                except (EOFError, OSError):
                    pass
                self.process.join(timeout)
            self._finalizer()


__all__ = ["Worker", "InProcessWorker", "ProcessWorker", "Received", "WorkerError", "OPS"]
