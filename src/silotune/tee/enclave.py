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
import os
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


class _Refusals:
    """The enclave's stand-in for the boundary: a refusal becomes a ProtocolError carrying its reason,
    so the host's boundary counts it."""

    def refuse(self, reason: str, where: str, detail: str) -> ProtocolError:
        err = ProtocolError(f"{where}: {detail}")
        err.refusal = (reason, where, detail)
        return err


def _refusal(err: ProtocolError) -> tuple[str, str, str]:
    return getattr(err, "refusal", ("protocol", "enclave", str(err)))


def enclave_config(spec: dict) -> dict:
    """What the enclave's measurement covers besides its code: the settings that decide what it does."""
    return {k: spec[k] for k in ("split", "adapters", "optim", "seed", "tee", "model_files")}


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
    return TrunkRuntime(trunk, OptimSettings(**spec["optim"]), _Refusals(), compute), worker, pool, tee


class _Enclave:
    """Inside the enclave process: the runtime, its passes, the mask pool and the attester."""

    def __init__(self, spec: dict):
        from .attestation import Attester, SimulatedBackend

        self.runtime, self.worker, self.pool, self.tee = _build(spec)
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        # the simulated platform's key: it stands for the hardware vendor's (never part of the measurement)
        self.backend = SimulatedBackend(Ed25519PrivateKey.from_private_bytes(spec["platform_key"]))
        self.attester = Attester.for_enclave(self.backend, enclave_config(spec))
        self.passes: dict[int, object] = {}
        self.ids = itertools.count()
        self.refill = 0  # rows of masks to precompute once the current request is answered

    def forward(self, parts, dead):
        from ..server.runtime import Part

        for pid in dead:
            self.passes.pop(pid, None)
        pass_ = self.runtime.forward([Part(*p) for p in parts])
        outputs, refused = [], {i: _refusal(e) for i, e in pass_.refused.items()}
        for i in range(len(parts)):
            outputs.append(None if i in refused else pass_.output(i))
        pid = next(self.ids)
        self.passes[pid] = pass_
        self.refill = sum(p[2].shape[0] * p[2].shape[1] for p in parts)
        return pid, outputs, refused

    def backward(self, pid, grads):
        pass_ = self.passes.pop(pid, None)
        if pass_ is None:
            raise EnclaveError(f"enclave: no pass {pid} (already stepped or dropped)")
        out = self.runtime.backward(pass_, grads)
        return {i: (v if isinstance(v, torch.Tensor) else _refusal(v)) for i, v in out.items()}, self.runtime.steps

    def attest(self, challenge: bytes):
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

        key = X25519PrivateKey.generate()  # a real session would keep it for the key exchange
        public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return public, self.attester.quote(public, challenge).to_bytes()

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
    ops = {"forward": enclave.forward, "backward": enclave.backward, "attest": enclave.attest,
           "infer": lambda h1, lengths: enclave.runtime.infer(h1, lengths), "stats": enclave.stats,
           "view": enclave.view, "state": enclave.runtime.state_dict, "steps": lambda: enclave.runtime.steps,
           "load": enclave.runtime.load_state_dict}
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

    def infer(self, h1: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
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
        return {i: (v if isinstance(v, torch.Tensor) else self.boundary.refuse(*v)) for i, v in out.items()}

    def state_dict(self) -> dict:
        if not self.tee.release_trunk:
            raise EnclaveError("the enclave keeps its trunk adapters (tee.release_trunk: false): no state to save")
        return self._call("state")

    def load_state_dict(self, state: dict) -> None:
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
    def attest(self, challenge: bytes) -> tuple[bytes, bytes]:
        """(the enclave's fresh ephemeral key, its quote binding that key to ``challenge``)."""
        return self._call("attest", challenge)

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


def enclave_spec(model_dir, split, adapters, optim, seed: int, compute, tee: TeeSettings, *,
                 platform_key: bytes = b"", threads: int | None = None, record: bool = False) -> dict:
    """Everything the enclave process needs to build its trunk, as plain data; ``enclave_config`` of it is
    measured. ``platform_key``: the simulated platform's raw Ed25519 private key (not measured)."""
    from pathlib import Path

    model_dir = Path(model_dir)
    files = sorted(p.name for p in model_dir.iterdir() if p.suffix in (".json", ".safetensors"))
    return {"model_dir": str(model_dir), "model_files": files, "split": asdict(split), "adapters": asdict(adapters),
            "optim": asdict(optim), "seed": seed, "tee": asdict(tee), "device": str(compute.device),
            "dtype": str(compute.dtype).removeprefix("torch."), "record": record, "platform_key": platform_key,
            "threads": threads or max(1, torch.get_num_threads())}


def expected_measurement(spec: dict) -> bytes:
    """The measurement a client expects: its own copy of the enclave code, and the run's configuration."""
    from .attestation import enclave_code_files, measurement

    return measurement(enclave_code_files(), enclave_config(spec))


def verify_enclave(attest, policy) -> object:
    """A client's check before it sends anything: a fresh challenge, the enclave's quote over its new ephemeral
    key and that challenge (``attest(challenge) -> (ephemeral, quote)``: ``EnclaveRuntime.attest``, or a client
    asking over its transport), verified by ``policy`` (``attestation.AttestationPolicy``); returns the accepted
    quote, raises ``AttestationError``."""
    challenge = os.urandom(16)
    ephemeral, quote = attest(challenge)
    return policy.check(quote, ephemeral, challenge)


__all__ = ["EnclaveRuntime", "EnclaveError", "RemotePass", "enclave_spec", "enclave_config", "expected_measurement",
           "verify_enclave"]
