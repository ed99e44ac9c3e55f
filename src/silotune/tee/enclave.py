"""The trunk in a server-side enclave: an enclave process, and the host's stand-in for its runtime.

With ``tee.mode: server`` the trunk server's host never holds the trunk. ``EnclaveRuntime`` has the
trunk runtime's interface (``infer``, ``forward``, ``backward``, ``steps``, state) so the handler and
the schedules do not know the difference, and forwards every call over a pipe to the enclave
process. The enclave process (``_serve``) loads the trunk with its adapters and optimizer, runs the
ordinary ``TrunkRuntime`` on it, and sends the frozen base weights' products to the untrusted worker
(``worker.py``) under one-time-pad masks (``masking.py``); attention, norms and activations stay in
the enclave. Passes stay in the enclave: the host gets each client's ``h2`` rows and a pass id.

Attestation: the enclave measures its code and configuration and, asked with a client's fresh
challenge, answers with a new ephemeral X25519 key and a quote binding the two
(``attestation.py``); clients check it before they send anything. The simulated backend's
platform key is made inside the enclave process, and the backend gives no hardware protection: the
host's operator can read this process's memory.

After each backward the enclave refills its mask pool for the next pass of the same size while the
clients compute their tails and heads (``tee.precompute``), so the online unmasking is elementwise;
the precomputation costs as many FLOPs as the offloaded products (counted in ``stats()``).
"""

from __future__ import annotations

import itertools
import logging
import threading
import weakref
from dataclasses import asdict

import torch

from ..errors import ProtocolError, SiloTuneError
from .settings import TeeSettings
from .worker import spawn

log = logging.getLogger(__name__)


class EnclaveError(SiloTuneError):
    """The enclave process failed, died or stopped answering."""


def _refusal(err: ProtocolError) -> tuple[str, str, str]:
    return getattr(err, "refusal", ("protocol", "enclave", str(err)))


def enclave_config(spec: dict) -> dict:
    """What the enclave's measurement covers besides its code: the settings that decide what it does."""
    return {k: spec[k] for k in ("split", "adapters", "optim", "seed", "tee", "model_files", "aggregation")}


def _boundary(spec: dict, model_config):
    """The enclave's boundary checks: the host's limits; a refusal becomes a ProtocolError carrying its reason,
    which the host's boundary counts."""
    from ..server.boundary import Boundary, Limits

    class EnclaveBoundary(Boundary):
        def refuse(self, reason: str, where: str, detail: str) -> ProtocolError:
            err = ProtocolError(f"{where}: {detail}")
            err.refusal = (reason, where, detail)
            return err

    limits = Limits(**spec["limits"]) if spec.get("limits") else Limits.unbounded(model_config)
    return EnclaveBoundary(limits)


def _build(spec: dict):
    from ..adapters import AdapterSettings, LoraSettings, PrefixSettings, SpfSettings, apply_method, trained_layers
    from ..compute import Compute, fp32_trainables
    from ..models.partition import load_stage
    from ..server.runtime import TrunkRuntime
    from ..train.optim import OptimSettings
    from .masking import MaskPool, offload_linears
    from .worker import InProcessWorker, ProcessWorker

    a, c = spec["split"]["head_blocks"], spec["split"]["tail_blocks"]
    ad = dict(spec["adapters"])
    adapters = AdapterSettings(method=ad["method"], parts=ad["parts"], lora=LoraSettings(**ad["lora"]),
                               prefix=PrefixSettings(**ad["prefix"]), spf=SpfSettings(**ad["spf"]))
    compute = Compute(torch.device(spec["device"]), getattr(torch, spec["dtype"]))
    trunk = load_stage(spec["model_dir"], "trunk", a, c, compute.dtype, compute.device)
    apply_method(trunk, adapters, spec["seed"], trained_layers(trunk.config, adapters, a, c))
    fp32_trainables(trunk)
    tee = TeeSettings(**spec["tee"])
    worker = pool = None
    if tee.offload:
        worker = (ProcessWorker(record=spec["record"]) if tee.worker == "process"
                  else InProcessWorker(record=spec["record"]))
        pool = MaskPool(tee.masks())
        offload_linears(trunk, worker, pool)
    boundary = _boundary(spec, trunk.config)
    return TrunkRuntime(trunk, OptimSettings(**spec["optim"]), boundary, compute), worker, pool, tee, boundary


class _Enclave:
    """Inside the enclave process: the runtime, its passes, the clients' sessions, the mask pool and the attester.

    What clients sealed (``SealedTensor``) is opened and checked here and the answers sealed here; a plain
    tensor (a tool or test driving the runtime directly) is used as it is."""

    def __init__(self, spec: dict):
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        from ..protocol.codec import wire_dtype
        from .attestation import Attester, SimulatedBackend
        from .channel import EnclaveSessions

        self.runtime, self.worker, self.pool, self.tee, boundary = _build(spec)
        # the simulated platform's key: it stands for the hardware vendor's (never part of the measurement)
        self.backend = SimulatedBackend(Ed25519PrivateKey.from_private_bytes(spec["platform_key"]))
        self.attester = Attester.for_enclave(self.backend, enclave_config(spec))
        enrolled = {int(k): bytes.fromhex(v) for k, v in spec.get("enrolled", {}).items()}
        self.sessions = EnclaveSessions(self.attester, enrolled, boundary, wire_dtype(spec.get("wire_dtype", "fp32")),
                                        spec.get("handshake_window", 300.0))
        self.aggregator = None
        if spec.get("federation"):  # the clients' FedAvg happens in here: their updates arrive sealed
            from ..server.aggregation import AggregationSettings, Aggregator

            fed = spec["federation"]
            self.aggregator = Aggregator(fed["n_clients"], fed["layout"], fed["start"],
                                         AggregationSettings(**spec["aggregation"]), max_examples=fed["max_examples"])
        self.passes: dict[int, tuple] = {}
        self.ids = itertools.count()
        self.refill = 0  # rows of masks to precompute once the current request is answered

    def _open(self, h1, lengths, shape=None):
        """(tensor, lengths) of a part: opened and checked if sealed."""
        from ..protocol.messages import SealedTensor

        if not isinstance(h1, SealedTensor):
            return h1, lengths
        msg = self.sessions.open(h1, shape)
        return (msg.hidden, msg.lengths) if h1.of == "forward" else (msg.grad, None)

    def _seal(self, sealed, client: int, step: int, t: torch.Tensor, of: str):
        """``t`` as the enclave's answer: sealed for the client if what it answers was sealed."""
        from ..protocol.messages import Gradients, ReturnedActivations

        if not sealed:
            return t
        reply = ReturnedActivations(client, step, hidden=t) if of == "returned" else Gradients(client, step, grad=t)
        return self.sessions.seal(client, reply)

    def forward(self, parts, dead):
        from ..protocol.messages import SealedTensor
        from ..server.runtime import Part

        for pid in dead:
            self.passes.pop(pid, None)
        opened, refused = [], {}
        for i, (client, step, h1, lengths) in enumerate(parts):
            try:
                opened.append((i, Part(client, step, *self._open(h1, lengths))))
            except ProtocolError as exc:
                refused[i] = _refusal(exc)
        pass_ = self.runtime.forward([p for _, p in opened]) if opened else None
        index = {i: j for j, (i, _) in enumerate(opened)}
        outputs = [None] * len(parts)
        for i, j in index.items():
            if j in pass_.refused:
                refused[i] = _refusal(pass_.refused[j])
            else:
                client, step, h1, _ = parts[i]
                outputs[i] = self._seal(isinstance(h1, SealedTensor), client, step, pass_.output(j), "returned")
        pid = next(self.ids)
        self.passes[pid] = (pass_, index, parts)
        self.refill = sum(p.h1.shape[0] * p.h1.shape[1] for _, p in opened)
        return pid, outputs, refused

    def backward(self, pid, grads):
        from ..protocol.messages import SealedTensor

        entry = self.passes.pop(pid, None)
        if entry is None:
            raise EnclaveError(f"enclave: no pass {pid} (already stepped or dropped)")
        pass_, index, parts = entry
        out, opened = {}, {}
        for i, g in grads.items():
            try:
                opened[index[i]] = self._open(g, None, pass_.shape(index[i]))[0]
            except ProtocolError as exc:
                out[i] = _refusal(exc)
        results = self.runtime.backward(pass_, opened) if opened else {}
        for i, j in index.items():
            if j not in results:
                continue
            v = results[j]
            if isinstance(v, torch.Tensor):
                client, step = parts[i][:2]
                out[i] = self._seal(isinstance(grads[i], SealedTensor), client, step, v, "gradients")
            else:
                out[i] = _refusal(v)
        return out, self.runtime.steps

    def infer(self, h1, lengths):
        from ..protocol.messages import SealedTensor

        sealed = isinstance(h1, SealedTensor)
        client, step = (h1.client, h1.step) if sealed else (0, 0)
        hidden, lengths = self._open(h1, lengths)
        return self._seal(sealed, client, step, self.runtime.infer(hidden, lengths), "returned")

    # ---- FedAvg of the clients' heads and tails, inside the enclave ----
    def _who(self, expected, participants):
        self.aggregator.expected = lambda: set(expected)  # the host's schedule decides who a round waits for
        self.aggregator.participants = lambda: set(participants)

    def agg_submit(self, sealed, expected, participants):
        """(status, closed or the refusal's text): not the pipe's generic refusal, since the host's handler
        counts a refused update once, as "update", whatever refused it (as for a plain update)."""
        self._who(expected, participants)
        try:
            msg = self.sessions.open(sealed)
            return ("ok", self.aggregator.submit(sealed.client, sealed.round, msg.tensors, msg.num_examples))
        except ProtocolError as exc:
            return ("refused", str(exc))

    def agg_recheck(self, expected, participants):
        self._who(expected, participants)
        return self.aggregator.recheck()

    def agg_latest(self):
        round_, aggregate = self.aggregator.latest()
        return round_, aggregate is not None

    def agg_has(self, round_):
        return self.aggregator.result(round_) is not None

    def agg_seal(self, client, step, round_):
        """Round ``round_``'s average sealed for ``client`` (answering its message of ``step``)."""
        from ..protocol.messages import Aggregation

        return self.sessions.seal(client, Aggregation(client, step, tensors=self.aggregator.result(round_), round=round_))

    # ---- state that leaves the enclave only sealed (``sealing.py``) ----
    def _seal_state(self, state: dict) -> bytes:
        from .sealing import seal_state

        m = self.attester.measurement
        return seal_state(state, self.backend.sealing_key(m), m)

    def _open_state(self, blob: bytes) -> dict:
        from .sealing import open_state

        m = self.attester.measurement
        return open_state(blob, self.backend.sealing_key(m), m)

    def agg_state(self):
        return self._seal_state(self.aggregator.state_dict()), self.aggregator.latest()[0]

    def agg_load(self, blob: bytes):
        self.aggregator.load_state_dict(self._open_state(blob))

    def sealed_state(self):
        """The runtime's state sealed for this enclave, and its step count."""
        return self._seal_state(self.runtime.state_dict()), self.runtime.steps

    def load_sealed(self, blob: bytes):
        self.runtime.load_state_dict(self._open_state(blob))

    def stats(self):
        out = {"backend": self.backend.name, "hardware_protection": self.backend.hardware_protection,
               "description": self.backend.describe(), "measurement": self.attester.measurement.hex(),
               "offload": self.pool is not None}
        if self.pool is not None:
            out.update(self.pool.stats.summary())
            out["offloaded_layers"] = len(self.pool.names())
        return out

    def view(self):
        return [asdict(r) for r in self.worker.received()] if self.worker is not None else []

    def close(self):
        if self.worker is not None:
            self.worker.close()


def _serve(conn, spec: dict) -> None:
    torch.set_num_threads(spec["threads"])
    try:
        enclave = _Enclave(spec)
    except BaseException as exc:  # report the failure to load, then end
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", None))
    ops = {"forward": enclave.forward, "backward": enclave.backward, "hello": enclave.sessions.hello,
           "infer": enclave.infer, "stats": enclave.stats,
           "view": enclave.view, "state": enclave.runtime.state_dict, "steps": lambda: enclave.runtime.steps,
           "load": enclave.runtime.load_state_dict, "sealed_state": enclave.sealed_state,
           "load_sealed": enclave.load_sealed, "agg_submit": enclave.agg_submit, "agg_recheck": enclave.agg_recheck,
           "agg_latest": enclave.agg_latest, "agg_has": enclave.agg_has, "agg_seal": enclave.agg_seal,
           "agg_state": enclave.agg_state, "agg_load": enclave.agg_load}
    try:
        while True:
            try:
                op, args = conn.recv()
            except EOFError:
                return
            if op == "close":
                conn.send(("ok", None))
                return
            try:
                conn.send(("ok", ops[op](*args)))
            except ProtocolError as exc:  # a refusal (a client's message failed a check): the host counts it
                conn.send(("refused", _refusal(exc)))
            except BaseException as exc:
                conn.send(("error", f"{type(exc).__name__}: {exc}"))
            if enclave.refill and enclave.tee.precompute and enclave.pool is not None and op == "backward":
                enclave.pool.precompute(enclave.refill)  # the next pass's masks, while the clients compute
    finally:
        enclave.close()


class RemotePass:
    """The host's handle on a pass kept in the enclave (``runtime.Pass``'s interface for schedules)."""

    def __init__(self, pid: int, parts, outputs, refused: dict[int, ProtocolError]):
        self.pid, self.parts, self._outputs, self.refused = pid, parts, outputs, refused

    def output(self, i: int) -> torch.Tensor:
        if i in self.refused:
            raise self.refused[i]
        return self._outputs[i]

    def shape(self, i: int) -> tuple[int, ...]:
        return tuple(self.parts[i].h1.shape)


def _stop(process, conn) -> None:
    try:
        conn.close()
    finally:
        process.join(timeout=5)
        if process.is_alive():
            process.kill()


class EnclaveRuntime:
    """The trunk runtime's interface, served by an enclave process (``tee.mode: server``)."""

    def __init__(self, spec: dict, boundary, tee: TeeSettings, host_trunk=None):
        """``spec``: what the enclave builds (see ``enclave_spec``); ``boundary``: the host's, which counts
        the enclave's refusals; ``host_trunk()``: builds a host copy of the trunk for ``trunk`` once the
        enclave releases its adapters (``tee.release_trunk``)."""
        self.boundary, self.tee, self._host_trunk = boundary, tee, host_trunk
        self.process, self._conn = spawn(_serve, (spec,), "silotune-enclave")  # not daemonic: it starts the worker
        self._lock = threading.Lock()
        self._dead: list[int] = []  # passes the schedules dropped: freed in the enclave with the next forward
        self._steps = 0
        self._finalizer = weakref.finalize(self, _stop, self.process, self._conn)
        self._reply("start", spec.get("start_timeout", 600.0))

    # ---- the pipe ----
    def _reply(self, op: str, timeout: float):
        waited = 0.0
        while not self._conn.poll(0.05):
            waited += 0.05
            if not self.process.is_alive():
                raise EnclaveError(f"enclave process died during {op} (exit code {self.process.exitcode})")
            if waited > timeout:
                raise EnclaveError(f"enclave: no answer to {op} within {timeout:.0f}s")
        try:
            status, value = self._conn.recv()
        except (EOFError, OSError):
            raise EnclaveError(f"enclave process died during {op} (exit code {self.process.exitcode})") from None
        if status == "error":
            raise EnclaveError(f"enclave, {op}: {value}")
        if status == "refused":
            raise self.boundary.refuse(*value)
        return value

    def _call(self, op: str, *args):
        with self._lock:
            try:
                self._conn.send((op, args))
            except (BrokenPipeError, OSError):
                raise EnclaveError(f"enclave process is gone (exit code {self.process.exitcode})") from None
            return self._reply(op, self.tee.timeout)

    # ---- the trunk runtime's interface ----
    @property
    def steps(self) -> int:
        return self._steps

    sealed = True  # clients' activations and gradients reach this runtime sealed (``tee/channel.py``)

    def infer(self, h1, lengths):
        """The trunk's output for ``h1`` without training: sealed for its client if ``h1`` is a ``SealedTensor``."""
        return self._call("infer", h1, lengths)

    def forward(self, parts) -> RemotePass:
        dead, self._dead = self._dead, []
        pid, outputs, refused = self._call("forward", [(p.client, p.step, p.h1, p.lengths) for p in parts], dead)
        errors = {i: self.boundary.refuse(*r) for i, r in refused.items()}
        handle = RemotePass(pid, parts, outputs, errors)
        weakref.finalize(handle, self._dead.append, pid)  # freed in the enclave if never stepped
        return handle

    def backward(self, pass_: RemotePass, grads: dict[int, torch.Tensor]) -> dict:
        out, self._steps = self._call("backward", pass_.pid, grads)
        return {i: (self.boundary.refuse(*v) if isinstance(v, tuple) else v) for i, v in out.items()}

    def state_dict(self) -> dict:
        """The trunk's state for a checkpoint: in the clear with ``tee.release_trunk``, else sealed for this
        enclave (``sealed_trunk``: bytes only an enclave with the same measurement on this platform can open)."""
        if self.tee.release_trunk:
            return self._call("state")
        from .channel import as_tensor

        blob, steps = self._call("sealed_state")
        return {"sealed_trunk": as_tensor(blob), "steps": steps}

    def sealed_state(self) -> bytes:
        """The trunk's state sealed for this enclave, whatever ``tee.release_trunk`` says."""
        return self._call("sealed_state")[0]

    def load_state_dict(self, state: dict) -> None:
        if "sealed_trunk" in state:
            from .channel import as_bytes

            self._call("load_sealed", as_bytes(state["sealed_trunk"]))
        elif not self.tee.release_trunk:
            raise EnclaveError("the enclave keeps its trunk adapters (tee.release_trunk: false) and restores only "
                               "state it sealed; this checkpoint holds a trunk in the clear")
        else:
            self._call("load", state)
        self._steps = state["steps"]

    @property
    def trunk(self):
        """A host copy of the trunk with the enclave's released adapters (None unless ``tee.release_trunk``)."""
        if not self.tee.release_trunk or self._host_trunk is None:
            return None
        from ..adapters import load_trainable_state

        stage = self._host_trunk()
        load_trainable_state(stage, self.state_dict()["trunk"])
        return stage

    # ---- TEE-specific ----
    def hello(self, client: int, data: bytes) -> bytes:
        """Relay a client's hello to the enclave; its welcome (the enclave's quote, and its half of the key
        exchange) comes back. The session's keys exist only inside the enclave."""
        return self._call("hello", client, data)

    def stats(self) -> dict:
        """The backend, the measurement, and the offload's FLOP and mask counters."""
        return self._call("stats")

    def worker_view(self) -> list[dict]:
        """Every tensor the worker received (only when the enclave was started with ``record``)."""
        return self._call("view")

    def close(self) -> None:
        if self.process.is_alive():
            try:
                self._call("close")
            except EnclaveError:
                pass
        self._finalizer()


class SealedAggregate:
    """The host's handle on a round's average, which only the enclave holds: ``seal_for`` asks it for a copy
    sealed for one client."""

    def __init__(self, aggregator: EnclaveAggregator, round_: int):
        self.aggregator, self.round = aggregator, round_

    def seal_for(self, client: int, step: int) -> bytes:
        return self.aggregator.runtime._call("agg_seal", client, step, self.round)


class EnclaveAggregator:
    """The aggregation strategy's interface (``server/aggregation.py``), served by the enclave: in TEE mode the
    clients' updates arrive sealed and are averaged inside the enclave; the host learns rounds, never tensors.
    The host's schedule still decides whom a round waits for (``expected``, ``participants``)."""

    sealed = True

    def __init__(self, runtime: EnclaveRuntime, n_clients: int, layout: dict[str, tuple[int, ...]]):
        self.runtime, self.n_clients, self.layout = runtime, n_clients, layout
        self.expected = lambda: set(range(n_clients))
        self.participants = lambda: self.expected()

    def _who(self) -> tuple[list[int], list[int]]:
        return sorted(self.expected()), sorted(self.participants())

    def submit(self, client: int, round_: int, tensors, num_examples=None) -> bool:
        """``tensors``: the client's update as it sealed it (a ``SealedTensor``); its example count is inside."""
        status, value = self.runtime._call("agg_submit", tensors, *self._who())
        if status == "refused":
            raise ProtocolError(value)
        return value

    def recheck(self) -> list[int]:
        return self.runtime._call("agg_recheck", *self._who())

    def latest(self):
        round_, has = self.runtime._call("agg_latest")
        return round_, (SealedAggregate(self, round_) if has else None)

    def result(self, round_: int):
        return SealedAggregate(self, round_) if self.runtime._call("agg_has", round_) else None

    def state_dict(self) -> dict:
        from .channel import as_tensor

        blob, round_ = self.runtime._call("agg_state")
        return {"sealed_aggregator": as_tensor(blob), "round": round_}

    def load_state_dict(self, state: dict) -> None:
        from .channel import as_bytes

        if "sealed_aggregator" not in state:
            raise EnclaveError("the enclave averages the clients' updates and restores only aggregation state it "
                               "sealed; this checkpoint holds it in the clear")
        self.runtime._call("agg_load", as_bytes(state["sealed_aggregator"]))


def enclave_spec(model_dir, split, adapters, optim, seed: int, compute, tee: TeeSettings, *,
                 platform_key: bytes = b"", threads: int | None = None, record: bool = False,
                 enrolled: dict[int, bytes] | None = None, limits=None, wire_dtype: str = "fp32",
                 handshake_window: float = 300.0, aggregation=None, federation: dict | None = None) -> dict:
    """Everything the enclave process needs to build its trunk, as plain data; ``enclave_config`` of it is
    measured. Not measured: ``platform_key`` (the simulated platform's raw Ed25519 private key), ``enrolled``
    (client id -> Ed25519 public key: who may open a session), ``limits`` (the boundary's ``Limits``; None:
    shape checks only), the wire dtype of its sealed answers and the hello freshness window. ``aggregation``
    (``AggregationSettings``, measured) and ``federation`` (``n_clients``, ``layout``, ``start``: the clients'
    initial adapters, ``max_examples``) make it average the clients' updates too."""
    from pathlib import Path

    from ..server.aggregation import AggregationSettings

    model_dir = Path(model_dir)
    files = sorted(p.name for p in model_dir.iterdir() if p.suffix in (".json", ".safetensors"))
    return {"model_dir": str(model_dir), "model_files": files, "split": asdict(split), "adapters": asdict(adapters),
            "optim": asdict(optim), "seed": seed, "tee": asdict(tee), "device": str(compute.device),
            "dtype": str(compute.dtype).removeprefix("torch."), "record": record, "platform_key": platform_key,
            "threads": threads or max(1, torch.get_num_threads()),
            "enrolled": {str(k): v.hex() for k, v in (enrolled or {}).items()},
            "limits": asdict(limits) if limits is not None else None, "wire_dtype": wire_dtype,
            "handshake_window": handshake_window,
            "aggregation": asdict(aggregation or AggregationSettings()), "federation": federation}


def expected_measurement(spec: dict) -> bytes:
    """The measurement a client expects: its own copy of the enclave code, and the run's configuration."""
    from .attestation import enclave_code_files, measurement

    return measurement(enclave_code_files(), enclave_config(spec))


__all__ = ["EnclaveRuntime", "EnclaveAggregator", "EnclaveError", "RemotePass", "enclave_spec", "enclave_config", "expected_measurement"]
