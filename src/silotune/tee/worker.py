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
  duplex pipe. Requests and answers are small pickled messages; the masked inputs and the products
  go through a shared-memory region (an anonymous ``memfd`` the enclave creates, seals against
  resizing and passes to the worker over the pipe): the enclave copies the masked input in (it is
  computed in enclave memory first, so the region never holds anything but masked inputs and the
  worker's own products), the worker multiplies in place and the enclave copies the product out.
  Where there is no ``memfd`` (or with ``shared_memory=False``), and for weights, tensors travel
  over the pipe as raw bytes after a (dtype, shape, size) header, as they would on a network. A
  worker that dies raises ``WorkerError`` on the next (or the pending) call instead of hanging;
  ``close()`` shuts it down cleanly.

Cost of the process boundary, over an in-process worker, for the offloaded products of one step of
SmolLM2-135M's trunk (392 calls of 256 rows, about 1.2 GB each way in float64) on a 2-core CPU:
about 1 s when the tensors were pickled (five copies per transfer), 0.6 s as raw bytes over the
socket, 0.3 s through the shared region (two copies and one round trip of small messages per call).

With ``record=True`` a worker keeps every tensor it received, in order (``received()``): the
worker's view, for audits and tests (weights included, as op ``"load"``).
"""

from __future__ import annotations

import math
import mmap
import multiprocessing as mp
import os
import select
import socket
import threading
import time
import weakref
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from ..errors import SiloTuneError

try:
    import fcntl
except ImportError:  # not on POSIX: no shared region (see shared_memory_available)
    fcntl = None

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

    def handle(self, op: str, name: str, tensor: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor | None:
        """Load a weight (None), or the product of ``tensor`` with one (into ``out`` when given, which must
        then be contiguous and of the product's shape and dtype)."""
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
        wt = w.t() if op == "forward" else w
        if out is None:
            out = x @ wt
        elif out.device == w.device:
            torch.matmul(x, wt, out=out)
        else:
            out.copy_(x @ wt)
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
#
# Wire format: each request is one small pickled message ``(op, name, meta)`` on the pipe and each answer
# one ``(status, meta)``. A tensor sent over the pipe (a weight to load; masked inputs and products without
# a shared region) travels right after its message as raw bytes, ``meta = (dtype name, shape, nbytes)``: from
# the tensor's own memory into the socket and from the socket straight into the receiving tensor's memory,
# no pickling. With a shared region (``region``: its size, then its descriptor as SCM_RIGHTS data), the ops
# ``forward_shared`` / ``backward_shared`` carry ``(dtype name, shape, input offset, output offset)`` and the
# answer ``(dtype name, output shape, output offset)``, which the enclave checks against what it expects
# before reading. Lists of tensors (``received``, audits only) are pickled.

def _encode(t: torch.Tensor) -> tuple[str, tuple[int, ...], bytes]:
    """A tensor as (dtype name, shape, raw bytes), pickled with ``received``'s answer."""
    t = t.detach().to("cpu").contiguous()
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return str(t.dtype).removeprefix("torch."), tuple(t.shape), raw


def _decode(payload: tuple[str, tuple[int, ...], bytes]) -> torch.Tensor:
    dtype_name, shape, raw = payload
    dtype = getattr(torch, dtype_name)
    if not raw:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape)


def _bytes_of(t: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, without a copy (the view keeps the tensor alive)."""
    if not t.numel():
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _outgoing(t: torch.Tensor) -> tuple[tuple[str, tuple[int, ...], int], memoryview]:
    """(meta, raw bytes) of a tensor to send; copies only what is not a contiguous CPU tensor already."""
    t = t.detach().to("cpu").contiguous()
    return (str(t.dtype).removeprefix("torch."), tuple(t.shape), t.numel() * t.element_size()), _bytes_of(t)


def _incoming(meta) -> tuple[torch.Tensor, memoryview]:
    """A fresh tensor for ``meta`` and a writable view of its bytes, to receive into."""
    dtype_name, shape, nbytes = meta
    dtype = getattr(torch, str(dtype_name), None)
    if not isinstance(dtype, torch.dtype):
        raise WorkerError(f"worker: unknown dtype {dtype_name!r}")
    t = torch.empty(tuple(shape), dtype=dtype)
    if t.numel() * t.element_size() != nbytes:
        raise WorkerError(f"worker: {nbytes} bytes for a {dtype_name} tensor of shape {tuple(shape)}")
    return t, _bytes_of(t)


def _matches(meta, want: tuple[str, tuple[int, ...], int]) -> bool:
    try:
        dtype_name, shape, nbytes = meta
        return (dtype_name, tuple(shape), nbytes) == want
    except (TypeError, ValueError):
        return False


SHARED = {"forward_shared": "forward", "backward_shared": "backward"}  # products through the shared region
_ALIGN = 64


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


def shared_memory_available() -> bool:
    """Whether products can go through a shared-memory region (Linux: memfd, passed over the socket)."""
    return hasattr(os, "memfd_create") and hasattr(socket, "send_fds")


def _new_region(size: int) -> tuple[int, mmap.mmap]:
    """An anonymous shared-memory file of ``size`` bytes (sealed against resizing where the kernel can, so
    the worker cannot shrink it under the enclave's feet) and the enclave's mapping of it."""
    fd = os.memfd_create("silotune-tee-region", os.MFD_CLOEXEC | getattr(os, "MFD_ALLOW_SEALING", 0))
    try:
        os.ftruncate(fd, size)
        try:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
        except (AttributeError, OSError):
            pass
        return fd, mmap.mmap(fd, size)
    except BaseException:
        os.close(fd)
        raise


def _in_region(region: torch.Tensor, offset: int, dtype: torch.dtype, shape) -> torch.Tensor:
    """The tensor of ``dtype`` and ``shape`` stored at ``offset`` bytes into the region (a uint8 tensor)."""
    shape = tuple(int(d) for d in shape)
    nbytes = math.prod(shape) * dtype.itemsize
    if offset < 0 or offset % _ALIGN or any(d < 0 for d in shape) or offset + nbytes > region.numel():
        raise WorkerError(f"worker: {dtype} {shape} at {offset} does not fit the shared region ({region.numel()} bytes)")
    return region[offset:offset + nbytes].view(dtype).view(shape)


def _read_into(fd: int, view: memoryview) -> None:
    """Fill ``view`` from the pipe (blocking); EOFError if the other side went away."""
    got = 0
    while got < len(view):
        n = os.readv(fd, [view[got:]])
        if n == 0:
            raise EOFError
        got += n


def _write_all(fd: int, view: memoryview) -> None:
    sent = 0
    while sent < len(view):
        sent += os.write(fd, view[sent:])


def _serve(conn, device, record, threads) -> None:
    """The worker process: answer requests until told to close or the pipe breaks."""
    if threads:
        torch.set_num_threads(threads)
    m = _Multiplier(device, record)
    fd = conn.fileno()
    region = None  # the shared region (uint8 tensor over the mapping), once the enclave sent one
    conn.send(("ready", None))
    while True:
        try:
            op, name, meta = conn.recv()
            tensor = None
            if op in OPS:  # its tensor follows as raw bytes
                tensor, view = _incoming(meta)
                _read_into(fd, view)
            elif op == "region":  # a shared-memory file follows, passed as a descriptor
                with socket.socket(fileno=os.dup(fd)) as sock:
                    _, fds, _, _ = socket.recv_fds(sock, 1, 1)
                if len(fds) != 1:
                    raise WorkerError("worker: no shared region came with the request")
                try:
                    region = torch.frombuffer(mmap.mmap(fds[0], int(meta)), dtype=torch.uint8)
                finally:
                    os.close(fds[0])
        except (EOFError, OSError):  # the enclave went away
            return
        except Exception as exc:  # a malformed request: the stream cannot be trusted any more
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
            return
        answer = None
        try:
            if op == "close":
                conn.send(("ok", None))
                return
            if op == "received":
                ops = tuple(meta)
                conn.send(("ok", [(r.op, r.name, _encode(r.tensor)) for r in m.view if r.op in ops]))
            elif op == "clear":
                m.view.clear()
                conn.send(("ok", None))
            elif op == "flops":
                conn.send(("ok", m.flops))
            elif op == "exit":  # tests: die without answering, as a crashed worker would
                os._exit(3)
            elif op == "region":
                conn.send(("ok", None))
            elif op in SHARED:  # the input and the product in the shared region: nothing to copy
                if region is None:
                    raise WorkerError("worker: no shared region")
                dtype_name, shape, offset, out_offset = meta
                dtype = getattr(torch, str(dtype_name), None)
                if not isinstance(dtype, torch.dtype) or len(shape) != 2:
                    raise WorkerError(f"worker: bad request {meta!r}")
                w = m.weights.get(name)
                d = None if w is None else (w.shape[0] if SHARED[op] == "forward" else w.shape[1])
                x = _in_region(region, offset, dtype, shape)
                out = None if d is None else _in_region(region, out_offset, dtype, (shape[0], d))
                m.handle(SHARED[op], name, x, out)  # refuses an unknown layer or a wrong shape
                conn.send(("ok", (dtype_name, (int(shape[0]), int(d)), out_offset)))
            elif op in OPS:
                out = m.handle(op, name, tensor)
                answer = None if out is None else _outgoing(out)
            else:
                raise WorkerError(f"worker: unknown op {op!r}")
        except Exception as exc:  # report, keep serving
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
            continue
        if op in OPS:
            try:
                conn.send(("ok", None if answer is None else answer[0]))
                if answer is not None:
                    _write_all(fd, answer[1])
            except OSError:
                return


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


def _reap(process, conn, sock=None) -> None:
    try:
        conn.close()
        if sock is not None:
            sock.close()
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
    ``shared_memory``: products through a shared region (None: where ``memfd`` is available),
    or as raw bytes over the pipe (False).
    """

    def __init__(self, device: str | None = None, record: bool = False, threads: int | None = None,
                 timeout: float | None = None, start_timeout: float = 300.0, poll: float = 0.05,
                 shared_memory: bool | None = None):
        if shared_memory and not shared_memory_available():
            raise WorkerError("tee worker: no shared memory here (needs os.memfd_create and socket.send_fds)")
        self.shared_memory = shared_memory_available() if shared_memory is None else shared_memory
        self._region: torch.Tensor | None = None  # the shared region, a uint8 tensor over our mapping
        self.process, self._conn = spawn(_serve, (device, record, threads), "silotune-tee-worker", daemon=True)
        # the pipe's socket again, for raw tensor bytes sent and received without blocking (MSG_DONTWAIT per
        # call: the descriptor itself stays blocking for the Connection)
        self._sock = socket.socket(fileno=os.dup(self._conn.fileno()))
        self.timeout, self.poll = timeout, poll
        self._lock = threading.Lock()
        self._closed = False
        self._broken: str | None = None
        self._shapes: dict[str, tuple[int, ...]] = {}  # the loaded weights' shapes: what an answer must be
        self._finalizer = weakref.finalize(self, _reap, self.process, self._conn, self._sock)
        status, _ = self._wait("start", "", self._deadline(start_timeout), start_timeout)
        if status != "ready":
            self._fail("start", "", f"unexpected first message {status!r}")

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def _fail(self, op, name, why) -> None:
        self._broken = why
        self._region = None
        _reap(self.process, self._conn, self._sock)
        where = f"{op} {name!r}" if name else op
        raise WorkerError(f"tee worker (pid {self.pid}) {why} during {where}")

    def _died(self, op, name) -> None:
        self.process.join(1)
        self._fail(op, name, f"died (exit code {self.process.exitcode})")

    @staticmethod
    def _deadline(timeout):
        return None if timeout is None else time.monotonic() + timeout

    def _ready(self, op, name, deadline, timeout, write: bool = False) -> None:
        """Wait until the pipe can be read (or written), checking every ``poll`` s that the worker is
        alive and the deadline not passed."""
        while not (select.select([], [self._sock], [], self.poll)[1] if write else self._conn.poll(self.poll)):
            if not self.process.is_alive():
                if not write and self._conn.poll(0):  # it answered, then exited
                    return
                self._died(op, name)
            if deadline is not None and time.monotonic() > deadline:
                self._fail(op, name, f"gave no answer within {timeout:g} s")

    def _wait(self, op, name, deadline, timeout):
        self._ready(op, name, deadline, timeout)
        try:
            return self._conn.recv()
        except (EOFError, OSError):
            self._died(op, name)

    def _send_raw(self, view: memoryview, op, name, deadline) -> None:
        sent = 0
        while sent < len(view):
            try:
                sent += self._sock.send(view[sent:], socket.MSG_DONTWAIT)
            except BlockingIOError:  # the worker has not read what came before yet
                self._ready(op, name, deadline, self.timeout, write=True)

    def _recv_raw(self, view: memoryview, op, name, deadline) -> None:
        got = 0
        while got < len(view):
            try:
                n = self._sock.recv_into(view[got:], len(view) - got, socket.MSG_DONTWAIT)
            except BlockingIOError:
                self._ready(op, name, deadline, self.timeout)
                continue
            if n == 0:  # EOF: it died while answering
                self._died(op, name)
            got += n

    def _request(self, op: str, name: str, send, receive=None):
        """One request under the lock: ``send(deadline)`` writes it, the answer is waited for (within
        ``timeout``), and ``receive(meta, deadline)`` turns an "ok" answer's meta into the result."""
        with self._lock:
            if self._closed:
                raise WorkerError("tee worker is closed")
            if self._broken:
                raise WorkerError(f"tee worker (pid {self.pid}) is unusable: it {self._broken}")
            deadline = self._deadline(self.timeout)
            try:
                send(deadline)
            except OSError:  # broken pipe, connection reset: it is gone
                self._died(op, name)
            status, value = self._wait(op, name, deadline, self.timeout)
            if status == "ok" and receive is not None:
                try:
                    value = receive(value, deadline)
                except OSError:
                    self._died(op, name)
        if status == "error":
            raise WorkerError(f"tee worker refused {op} {name!r}: {value}")
        return value

    def _call(self, op: str, name: str = "", payload=None, tensor: torch.Tensor | None = None, answer=None):
        """One request: ``payload`` pickled, or ``tensor`` as raw bytes; ``answer`` (shape, dtype): the tensor
        expected back as raw bytes (anything else, from a worker that may lie, breaks the stream: WorkerError)."""

        def send(deadline):
            if tensor is None:
                self._conn.send((op, name, payload))
            else:
                meta, view = _outgoing(tensor)
                self._conn.send((op, name, meta))
                self._send_raw(view, op, name, deadline)

        def receive(meta, deadline):
            shape, dtype = answer
            want = (str(dtype).removeprefix("torch."), tuple(shape), math.prod(shape) * dtype.itemsize)
            if not _matches(meta, want):
                self._fail(op, name, f"answered {meta!r} where {want!r} was expected")
            out, view = _incoming(want)
            self._recv_raw(view, op, name, deadline)
            return out

        return self._request(op, name, send, None if answer is None else receive)

    def _shared_region(self, nbytes: int, deadline) -> torch.Tensor:
        """The shared region, replaced by a larger one (handed to the worker) if it holds fewer than ``nbytes``."""
        if self._region is not None and self._region.numel() >= nbytes:
            return self._region
        size = -(-max(nbytes, 2 * (0 if self._region is None else self._region.numel()), 1 << 22) // 4096) * 4096
        fd, mapping = _new_region(size)
        try:
            self._conn.send(("region", "", size))
            socket.send_fds(self._sock, [b"r"], [fd])
        finally:
            os.close(fd)
        status, value = self._wait("region", "", deadline, self.timeout)
        if status != "ok":
            self._fail("region", "", f"refused the shared region: {value}")
        self._region = torch.frombuffer(mapping, dtype=torch.uint8)  # the old region goes with its last view
        return self._region

    def load(self, name, weight):
        self._call("load", name, tensor=weight)
        self._shapes[name] = tuple(weight.shape)

    def _product(self, op, name, masked):
        shape = self._shapes.get(name)
        rows = masked.shape[0] if masked.dim() else 0
        d = None if shape is None or len(shape) != 2 else (shape[0] if op == "forward" else shape[1])
        if not self.shared_memory or d is None or masked.dim() != 2:
            # raw bytes over the socket; an unknown layer or a wrong shape is refused by the worker
            out = self._call(op, name, tensor=masked, answer=((rows, d if d is not None else -1), masked.dtype))
            return out.to(masked.device)
        # through the shared region: the masked input copied in, the product copied out; the region
        # only ever holds what the worker may see (masked inputs, its own products)
        dtype_name = str(masked.dtype).removeprefix("torch.")
        out_offset = _aligned(masked.numel() * masked.element_size())
        want = (dtype_name, (rows, d), out_offset)

        def send(deadline):
            region = self._shared_region(out_offset + rows * d * masked.element_size(), deadline)
            _in_region(region, 0, masked.dtype, masked.shape).copy_(masked.detach())
            self._conn.send((op + "_shared", name, (dtype_name, tuple(masked.shape), 0, out_offset)))

        def receive(meta, deadline):
            if not _matches(meta, want):
                self._fail(op, name, f"answered {meta!r} where {want!r} was expected")
            return _in_region(self._region, out_offset, masked.dtype, (rows, d)).clone()

        return self._request(op, name, send, receive).to(masked.device)

    def forward(self, name, masked):
        return self._product("forward", name, masked)

    def backward(self, name, masked_grad):
        return self._product("backward", name, masked_grad)

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
            self._region = None
            self._finalizer()


__all__ = ["Worker", "InProcessWorker", "ProcessWorker", "Received", "WorkerError", "OPS"]
