"""Wire a trunk server and N clients together: the same parties for every transport.

``build_server`` assembles the server's roles (trunk runtime, schedule, aggregation
strategy, boundary checks, checkpoints); ``build_parties`` loads each party's own stages
from disk (the server only the trunk, each client only its head and tail), applies the
fine-tuning method to the parts that train, and connects each client to the server
through a transport made by ``connect(server)`` (in-process by default).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .adapters import AdapterSettings, apply_method, trained_layers
from .client.runtime import SplitClient, adapter_state
from .compute import Compute, fp32_trainables
from .crypto.identity import Identity
from .models.partition import load_config, load_stage
from .privacy.defences import PrivacySettings
from .protocol.codec import wire_dtype_name
from .server.aggregation import AggregationSettings, Aggregator
from .server.boundary import Boundary, Limits
from .server.replicas import Replicas
from .server.runtime import TrunkRuntime
from .server.schedules import SCHEDULES, ClientBatch, Schedule, Sequential
from .server.trunk import TrunkServer
from .tee.attestation import AttestationPolicy, SimulatedBackend
from .tee.channel import SealedTransport
from .tee.enclave import EnclaveAggregator, EnclaveRuntime, enclave_spec, expected_measurement
from .tee.settings import TeeSettings
from .train.optim import OptimSettings
from .transport.base import Transport
from .transport.inprocess import InProcessTransport


@dataclass
class SplitSettings:
    head_blocks: int = 2
    """``a``: the blocks the client runs after the embedding before it sends ``h1`` to the server (at least 1)."""
    tail_blocks: int = 2
    """``c``: the last blocks, run by the client on the server's ``h2`` before the final norm and the LM head (at least
    1)."""


@dataclass
class FederationSettings:
    clients: int = 4
    """N: the clients (data owners), each training on its own shard of the training examples."""
    schedule: str = "sequential"
    """How the server interleaves clients: ``sequential``, ``client-batch`` or ``hierarchical``."""
    local_steps: int = 10
    """R: FedAvg every R local steps of each client (and, when hierarchical, the trunk replicas are averaged)."""
    wire_dtype: str = "fp32"
    """The dtype activations and gradients travel in: ``fp32``, ``bf16`` or ``fp16`` (half the bytes)."""
    batch_clients: int = 4
    """client-batch: at most this many clients' steps share one trunk pass (K)."""
    batch_wait: float = 2.0
    """client-batch: seconds a gathering (or a backward) waits for the group's slower members."""
    replicas: int = 2
    """hierarchical: trunk replicas (M), each serving clients k with k mod M = its rank."""

    def validate(self, bad) -> None:
        if self.clients < 1:
            bad("federation.clients", "must be at least 1")
        if self.local_steps < 1:
            bad("federation.local_steps", "must be at least 1")
        if self.schedule not in SCHEDULES:
            bad("federation.schedule", f"unknown schedule {self.schedule!r} (available: {', '.join(SCHEDULES)})")
        if self.batch_clients < 1:
            bad("federation.batch_clients", "must be at least 1")
        if not self.batch_wait > 0:
            bad("federation.batch_wait", "must be positive (seconds)")
        if self.schedule == "hierarchical" and not 1 <= self.replicas <= self.clients:
            bad("federation.replicas", f"must be in 1..{self.clients} (every replica serves at least one client)")


def _layers(stage, adapters: AdapterSettings, split: SplitSettings) -> set[int]:
    return trained_layers(stage.config, adapters, split.head_blocks, split.tail_blocks)


def run_limits(cfg) -> Callable[[object], Limits]:
    """The boundary limits of a run (``RunConfig``), given the model's config."""
    return lambda model_config: Limits.resolve(cfg.boundary, model_config, cfg.train.batch_size,
                                               cfg.train.eval_batch_size, cfg.data.max_length,
                                               cfg.federation.local_steps)


def make_schedule(fed: FederationSettings | None, members, runtime: TrunkRuntime,
                  client_timeout: float | None) -> Schedule:
    """The configured schedule over ``members``; each replica of a hierarchical run serves its group in turn."""
    if fed is not None and fed.schedule == "client-batch":
        return ClientBatch(members, runtime, fed.batch_clients, fed.batch_wait, client_timeout)
    return Sequential(members, runtime, client_timeout)


def build_server(model_dir: Path, split: SplitSettings, adapters: AdapterSettings,
                 optim: OptimSettings, n_clients: int, seed: int,
                 client_timeout: float | None = None, checkpoint: Path | None = None, *,
                 limits: Callable[[object], Limits] | None = None,
                 aggregation: AggregationSettings | None = None, federation: FederationSettings | None = None,
                 compute: Compute | None = None, replicas: Replicas | None = None,
                 tee: TeeSettings | None = None, platform: SimulatedBackend | None = None,
                 enrolled: dict[int, bytes] | None = None, wire_dtype: torch.dtype = torch.float32) -> TrunkServer:
    """The trunk server (one replica of it, with ``replicas``). It also builds the clients' initial head and
    tail (public base weights, the same seeded adapters) to know the adapter layout every update must match,
    never trusting a client's. With ``tee.mode: server`` the trunk lives in an enclave process instead, whose
    quotes ``platform`` signs (the simulated platform; None: a fresh one), and which opens sessions with the
    ``enrolled`` clients (id -> Ed25519 public key) and seals its answers in ``wire_dtype``."""
    compute = compute or Compute.default()

    def build_trunk():
        trunk = load_stage(model_dir, "trunk", split.head_blocks, split.tail_blocks, compute.dtype, compute.device)
        apply_method(trunk, adapters, seed, _layers(trunk, adapters, split))
        trunk.to(compute.device)
        fp32_trainables(trunk)
        return trunk

    with torch.random.fork_rng():  # building them must not move the run's random stream
        start = adapter_state(*build_client_parts(model_dir, split, adapters, seed))
    model_config = load_config(model_dir)
    lim = limits(model_config) if limits else Limits.unbounded(model_config)
    layout = {k: tuple(v.shape) for k, v in start.items()}
    boundary = Boundary(lim, update_bytes=4 * sum(v.numel() for v in start.values()))
    if tee is not None and tee.enabled:  # the trunk and the clients' FedAvg in an enclave process
        platform = platform or SimulatedBackend.generate()  # stands for the hardware vendor's attestation key
        spec = enclave_spec(model_dir, split, adapters, optim, seed, compute, tee,
                            platform_key=platform.raw_private_key(), enrolled=enrolled, limits=lim,
                            wire_dtype=wire_dtype_name(wire_dtype), aggregation=aggregation,
                            federation={"n_clients": n_clients, "layout": layout, "start": start,
                                        "max_examples": lim.max_examples})
        runtime = EnclaveRuntime(spec, boundary, tee, build_trunk)
        runtime.attestation = AttestationPolicy(platform.verifier(), expected_measurement(spec))  # what clients check
        aggregator = EnclaveAggregator(runtime, n_clients, layout)
    else:
        aggregator = Aggregator(n_clients, layout, start, aggregation, max_examples=lim.max_examples)
        runtime = TrunkRuntime(build_trunk(), optim, boundary, compute)
    members = replicas.members(n_clients) if replicas is not None else n_clients
    schedule = make_schedule(federation, members, runtime, client_timeout)
    return TrunkServer(runtime, schedule, aggregator, boundary, checkpoint, replicas)


def build_client_parts(model_dir: Path, split: SplitSettings, adapters: AdapterSettings, seed: int,
                       compute: Compute | None = None):
    """The head and tail every client starts from (identical initial adapters), in the compute dtype."""
    dtype = compute.dtype if compute is not None else torch.float32
    head = load_stage(model_dir, "head", split.head_blocks, split.tail_blocks, dtype)
    tail = load_stage(model_dir, "tail", split.head_blocks, split.tail_blocks, dtype)
    apply_method(head, adapters, seed, _layers(head, adapters, split))
    apply_method(tail, adapters, seed, _layers(tail, adapters, split))
    return head, tail


def build_parties(model_dir: Path, split: SplitSettings, adapters: AdapterSettings, optim: OptimSettings,
                  n_clients: int, seed: int = 0, wire_dtype: torch.dtype = torch.float32,
                  privacy: PrivacySettings | None = None,
                  connect: Callable[[TrunkServer], Transport] | None = None,
                  client_timeout: float | None = None, limits: Callable[[object], Limits] | None = None,
                  aggregation: AggregationSettings | None = None, federation: FederationSettings | None = None,
                  compute: Compute | None = None, replicas: Replicas | None = None,
                  tee: TeeSettings | None = None) -> tuple[TrunkServer, list[SplitClient]]:
    """A trunk server and its clients (with ``replicas``: this replica and the clients of its group). With
    ``tee.mode: server`` each client gets an identity the enclave enrolls and a ``SealedTransport`` holding the
    policy its quote must meet; the clients open their sessions with the enclave on their first sealed call
    (``client.transport.connect()`` does it now)."""
    identities = {i: Identity.generate() for i in range(n_clients)} if tee is not None and tee.enabled else {}
    server = build_server(model_dir, split, adapters, optim, n_clients, seed, client_timeout,
                          limits=limits, aggregation=aggregation, federation=federation, compute=compute,
                          replicas=replicas, tee=tee, enrolled={i: k.public for i, k in identities.items()},
                          wire_dtype=wire_dtype)
    connect = connect or (lambda s: InProcessTransport(s, wire_dtype))

    def transport_for(i):
        if not identities:
            return connect(server)
        return SealedTransport(connect(server), i, identities[i], server.runtime.attestation, wire_dtype)

    head, tail = build_client_parts(model_dir, split, adapters, seed, compute)
    members = server.schedule.members
    clients = []
    for i in members:
        h, t = (head, tail) if i == members[-1] else (copy.deepcopy(head), copy.deepcopy(tail))
        clients.append(SplitClient(i, h, t, transport_for(i), optim, privacy=privacy, seed=seed, compute=compute))
    return server, clients
