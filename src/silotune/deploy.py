"""Real deployments: key material, the trunk server process and a client process over gRPC.

``silotune keys`` writes everything a deployment needs into one folder:

    server/identity.pem  server/tls.key  server/tls.crt  server/enrolled.json   (stay on the server)
    clients/client-K.pem  clients/client-K.crt  clients/client-K.key  (one set per data owner)
    ca.crt  server.pub                                         (public: every client gets these)

The server and the clients run the same runtimes as the simulation (``federation.py``,
``client/loop.py``); only the transport is gRPC instead of in-process.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch

from .atomic import atomic_write
from .client.loop import client_run
from .client.runtime import SplitClient
from .compute import Compute
from .config import RunConfig
from .crypto import Identity, load_enrollment, save_enrollment
from .crypto.certs import make_tls
from .crypto.identity import CryptoError, read_private_key
from .errors import ConfigError
from .federation import build_client_parts, build_server, run_limits
from .models.loading import load_tokenizer, resolve_model
from .protocol.codec import wire_dtype
from .report import adapters_blob
from .server import checkpoint as ckpt
from .server import replicas as hier
from .tee.attestation import AttestationPolicy, SimulatedBackend, SimulatedVerifier
from .tee.channel import SealedTransport
from .tee.enclave import enclave_spec, expected_measurement

log = logging.getLogger(__name__)


def make_keys(out: str | Path, n_clients: int, hosts: list[str]) -> Path:
    out = Path(out)
    server = Identity.generate()
    server.save(out / "server" / "identity.pem")
    clients = {}
    for k in range(n_clients):
        ident = Identity.generate()
        ident.save(out / "clients" / f"client-{k}.pem")
        clients[k] = ident.public
    save_enrollment(out / "server" / "enrolled.json", clients)
    tls = make_tls(hosts, n_clients)
    for k in range(n_clients):
        atomic_write(out / "clients" / f"client-{k}.crt", tls[f"client-{k}.crt"])
        atomic_write(out / "clients" / f"client-{k}.key", tls[f"client-{k}.key"], mode=0o600)
    atomic_write(out / "server" / "tls.crt", tls["server.crt"])
    atomic_write(out / "server" / "tls.key", tls["server.key"], mode=0o600)
    atomic_write(out / "ca.crt", tls["ca.crt"])
    atomic_write(out / "server.pub", server.public.hex() + "\n")
    platform = SimulatedBackend.generate()  # TEE mode's simulated platform: stands for the hardware vendor's key
    platform.save(out / "server" / "platform.pem")
    atomic_write(out / "platform.pub", platform.public_key.hex() + "\n")
    return out


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CryptoError(f"{path} not found (create the deployment keys with 'silotune keys')") from None


def server_public(keys: Path, name: str = "server.pub") -> bytes:
    text = _read(keys / name).decode().strip()
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise CryptoError(f"{keys / name}: not a hex public key") from None


def enclave_policy(cfg: RunConfig, model_dir: Path, compute: Compute) -> AttestationPolicy:
    """What a client of a TEE-mode server trusts: the simulated platform's public key (``keys/platform.pub``)
    and the measurement of the enclave this configuration builds, computed from its own copy of the code."""
    spec = enclave_spec(model_dir, cfg.split, cfg.adapters, cfg.optim, cfg.train.seed, compute, cfg.tee,
                        aggregation=cfg.aggregation)
    return AttestationPolicy(SimulatedVerifier(server_public(Path(cfg.deploy.keys), "platform.pub")),
                             expected_measurement(spec))


def _join_replicas(cfg: RunConfig, compute: Compute) -> tuple[hier.Replicas, Compute]:
    """This process's replica of a hierarchical deployment, from torch.distributed's environment."""
    found = hier.env_rank()
    if found is None:
        raise ConfigError("federation.schedule: hierarchical: start the trunk replicas with torchrun "
                          f"(torchrun --nproc-per-node {cfg.federation.replicas} --no-python silotune server ...) "
                          "or set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT for each")
    rank, world = found
    if world != cfg.federation.replicas:
        raise ConfigError(f"federation.replicas is {cfg.federation.replicas} but WORLD_SIZE is {world}")
    hier.groups(cfg.federation.clients, world)
    if compute.device.type == "cuda" and torch.cuda.device_count() > 1:  # one GPU per local replica
        compute = Compute(torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count()),
                          compute.dtype)
    hier.init_group(rank, world, compute.device, timeout_s=cfg.deploy.grace_seconds)
    return hier.Replicas(rank, world), compute


def serve(cfg: RunConfig, address: str | None = None, fresh: bool = False) -> Path:
    """Run the trunk server until every client has finished or been gone longer than
    ``deploy.grace_seconds``; writes the trunk adapters and ``summary.json`` (who finished, who
    dropped, refusals by reason) and returns the adapters' path.

    With ``federation.schedule: hierarchical`` this is one trunk replica (its rank from
    torchrun's environment): it listens on the address's port + rank, serves the clients
    k with k mod M = rank, and writes under ``OUTPUT/server/replica-R/``.
    It resumes from its ``checkpoint.pt`` when one exists (unless ``fresh``)."""
    from .transport.admission import AdmissionSettings
    from .transport.grpc_server import SiloTuneServicer, start_server

    keys = Path(cfg.deploy.keys)
    identity = Identity.load(keys / "server" / "identity.pem", allow_insecure=cfg.deploy.allow_insecure_keys)
    enrolled = load_enrollment(keys / "server" / "enrolled.json")
    model_dir = resolve_model(cfg.model)
    compute, replicas, out_dir = Compute.resolve(cfg.compute), None, Path(cfg.output) / "server"
    address = address or cfg.deploy.address
    if cfg.federation.schedule == "hierarchical":
        replicas, compute = _join_replicas(cfg, compute)
        address, out_dir = hier.replica_address(address, replicas.rank), out_dir / f"replica-{replicas.rank}"
    checkpoint = out_dir / "checkpoint.pt"
    if fresh:
        ckpt.remove(checkpoint)  # and checkpoint.pt.prev
    trunk = build_server(model_dir, cfg.split, cfg.adapters, cfg.optim, cfg.federation.clients, cfg.train.seed,
                         cfg.deploy.client_timeout, checkpoint, limits=run_limits(cfg), aggregation=cfg.aggregation,
                         federation=cfg.federation, compute=compute, replicas=replicas, tee=cfg.tee,
                         platform=SimulatedBackend.load(keys / "server" / "platform.pem", cfg.deploy.allow_insecure_keys)
                         if cfg.tee.enabled else None, enrolled=enrolled,
                         wire_dtype=wire_dtype(cfg.federation.wire_dtype))
    d = cfg.deploy
    admission = AdmissionSettings(auth_seconds=d.auth_seconds, receive_seconds=d.receive_seconds,
                                  per_peer=d.max_pending_per_peer, total=d.max_pending)
    servicer = SiloTuneServicer(trunk, identity, enrolled, wire_dtype(cfg.federation.wire_dtype),
                                max_message_bytes=trunk.max_message_bytes(), admission=admission,
                                handshake_window=d.handshake_window)
    tls = (_read(keys / "server" / "tls.crt"),
           read_private_key(keys / "server" / "tls.key", cfg.deploy.allow_insecure_keys)) if cfg.deploy.tls else None
    client_ca = _read(keys / "ca.crt") if cfg.deploy.tls and cfg.deploy.mutual_tls else None
    if not client_ca:
        log.warning("mutual TLS is off: anyone who can reach %s can open calls (they are still refused before "
                    "any work is done for them); set deploy.mutual_tls: true to refuse them at the TLS layer",
                    address)
    server, port = start_server(servicer, address, tls, client_ca=client_ca)
    channel = ("mutual TLS + " if client_ca else "TLS + ") if tls else ""
    who = f"replica {replicas.rank} of {replicas.world}, " if replicas else ""
    log.info("trunk on %s; schedule %s", compute.describe(), cfg.federation.schedule)
    print(f"silotune server ({who}{cfg.federation.schedule}) listening on port {port} ({channel}AEAD), "
          f"waiting for clients {trunk.schedule.members}", flush=True)
    try:
        while not trunk.finished.wait(0.5):
            if trunk.presence.over(d.grace_seconds):  # the rest have been gone past the grace period
                break
    finally:
        server.stop(grace=2)
        servicer.close()
        if replicas is not None and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if cfg.tee.enabled and not cfg.tee.release_trunk:  # the enclave keeps its trunk: only it can open this file
        out = out_dir / "trunk.sealed"
        atomic_write(out, trunk.runtime.sealed_state())
    else:
        out = out_dir / "trunk.safetensors"
        atomic_write(out, adapters_blob([trunk.trunk], cfg.adapters.method))
    presence = trunk.presence.report(d.grace_seconds)
    refused = servicer.refusals()
    summary = {"schedule": cfg.federation.schedule, "trunk_steps": trunk.steps,
               "trunk_passes": getattr(trunk.schedule, "passes", trunk.steps),
               "rounds": trunk.aggregator.latest()[0] + 1, **presence,
               "turns_expired": trunk.schedule.dropped, "refused": refused}
    if replicas is not None:
        summary.update(replica=replicas.rank, replicas=replicas.world, replica_syncs=replicas.syncs)
    if cfg.tee.enabled:  # the enclave's backend, measurement and offload counters; then it ends
        summary["tee"] = trunk.runtime.stats()
        trunk.runtime.close()
    atomic_write(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    ended = "all clients finished" if not presence["dropped"] else \
        f"clients {presence['dropped']} dropped (gone > {d.grace_seconds:.0f}s), the others finished"
    print(f"{ended}; {trunk.steps} trunk steps; rejected: {refused or 'none'}", flush=True)
    return out


def run_client(cfg: RunConfig, client_id: int, server: str | None = None) -> Path:
    """Train one data owner's head and tail against a remote trunk server; returns its adapters' path."""
    from .simulate import budget, client_stream, prepare_data
    from .transport.grpc_client import GrpcTransport

    keys = Path(cfg.deploy.keys)
    if not 0 <= client_id < cfg.federation.clients:
        raise CryptoError(f"client id {client_id} outside 0..{cfg.federation.clients - 1}")
    identity = Identity.load(keys / "clients" / f"client-{client_id}.pem", cfg.deploy.allow_insecure_keys)
    model_dir = resolve_model(cfg.model)
    tok = load_tokenizer(model_dir)
    task, rows, parts = prepare_data(cfg, tok)
    idx = parts[client_id]
    compute = Compute.resolve(cfg.compute)
    head, tail = build_client_parts(model_dir, cfg.split, cfg.adapters, cfg.train.seed, compute)
    address = server or cfg.deploy.address
    if cfg.federation.schedule == "hierarchical":  # its group's replica listens on the port + its rank
        address = hier.replica_address(address, hier.replica_of(client_id, cfg.federation.replicas))
    transport = GrpcTransport(address, client_id, identity, server_public(keys),
                              tls_root=_read(keys / "ca.crt") if cfg.deploy.tls else None,
                              wire_dtype=wire_dtype(cfg.federation.wire_dtype),
                              tls_client=(_read(keys / "clients" / f"client-{client_id}.crt"),
                                          read_private_key(keys / "clients" / f"client-{client_id}.key",
                                                           cfg.deploy.allow_insecure_keys))
                              if cfg.deploy.tls and cfg.deploy.mutual_tls else None)
    if cfg.tee.enabled:  # before anything is sent: the trunk must run in the enclave this configuration builds
        transport = SealedTransport(transport, client_id, identity, enclave_policy(cfg, model_dir, compute),
                                    wire_dtype(cfg.federation.wire_dtype))
        quote = transport.connect()
        print(f"client {client_id}: enclave attested ({quote.backend}, measurement {quote.measurement.hex()[:16]}; "
              "simulated: no hardware protection); activations and gradients sealed to it", flush=True)
    client = SplitClient(client_id, head, tail, transport, cfg.optim, cfg.privacy, cfg.train.seed, compute)
    stream = client_stream(cfg, tok, rows, idx, client_id)
    plan = budget(cfg)
    first_round = client.join()
    done = min(first_round * cfg.federation.local_steps, plan["steps_per_client"])
    if first_round:
        print(f"client {client_id}: joining at round {first_round} (latest average loaded)", flush=True)
        for _ in range(done):  # skip the batches of the rounds already averaged
            next(stream)
    for event, value in client_run(client, stream, plan["steps_per_client"], cfg.federation.local_steps,
                                   first_round, done):
        if event == "step":
            print(f"client {client_id} step {client.step} loss {value:.4f}", flush=True)
        elif event == "wait":
            time.sleep(cfg.deploy.poll_seconds)
    client.finish()
    out = Path(cfg.output) / f"client-{client_id}" / "adapters.safetensors"
    atomic_write(out, adapters_blob([client.head, client.tail], cfg.adapters.method))
    print(f"client {client_id}: {client.step} steps, {transport.stats.total / 1e6:.1f} MB on the wire; "
          f"adapters in {out}")
    transport.close()
    return out
