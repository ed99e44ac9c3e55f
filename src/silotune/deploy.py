"""Real deployments: key material, the trunk server process and a client process over gRPC.

``silotune keys`` writes everything a deployment needs into one folder:

    server/identity.pem  server/tls.key  server/tls.crt  server/enrolled.json   (stay on the server)
    clients/client-K.pem  clients/client-K.crt  clients/client-K.key  (one set per data owner)
    ca.crt  server.pub                                         (public: every client gets these)

The server and the clients run the same runtimes as the simulation (``federation.py``,
``client/loop.py``); only the transport is gRPC instead of in-process.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

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
from .protocol.messages import Control
from .report import adapters_blob
from .server import checkpoint as ckpt
from .server import replicas as hier
from .tee.attestation import AttestationPolicy, SimulatedBackend, SimulatedVerifier
from .tee.channel import SealedTransport
from .tee.enclave import enclave_spec, expected_measurement
from .tracking import Tracker, party_tracker

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


def _wait_for_stop() -> None:
    """Block until Ctrl-C or SIGTERM (the latter only when called from the main thread)."""
    import signal

    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass


def serve(cfg: RunConfig, address: str | None = None, fresh: bool = False, keep_serving: bool = False) -> Path:
    """Run the trunk server until every client has finished or been gone longer than
    ``deploy.grace_seconds``; writes the trunk adapters and ``summary.json`` (who finished, who
    dropped, refusals by reason) and returns the adapters' path.

    With ``federation.schedule: hierarchical`` this is one trunk replica (its rank from
    torchrun's environment): it listens on the address's port + rank, serves the clients
    k with k mod M = rank, and writes under ``OUTPUT/server/replica-R/``.
    It resumes from its ``checkpoint.pt`` when one exists (unless ``fresh``). With ``keep_serving`` it writes the
    trunk adapters once training is over, then goes on serving split generation (``silotune generate --id``)
    until Ctrl-C or SIGTERM."""
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
    tracker = _server_tracker(cfg, trunk, servicer, out_dir, replicas)
    server, port = start_server(servicer, address, tls, client_ca=client_ca)
    channel = ("mutual TLS + " if client_ca else "TLS + ") if tls else ""
    who = f"replica {replicas.rank} of {replicas.world}, " if replicas else ""
    log.info("trunk on %s; schedule %s", compute.describe(), cfg.federation.schedule)
    log.info("silotune server (%s%s) listening on port %d (%sAEAD), waiting for clients %s", who,
             cfg.federation.schedule, port, channel, trunk.schedule.members)
    out = None  # the trunk adapters' file, once written
    try:
        while not trunk.finished.wait(0.5):
            if trunk.presence.over(d.grace_seconds):  # the rest have been gone past the grace period
                break
        if keep_serving:
            out = write_trunk(cfg, trunk, out_dir)
            log.info("training done (%d trunk steps; trunk adapters in %s): serving generation on port %d until "
                     "interrupted (Ctrl-C or SIGTERM)", trunk.steps, out, port)
            _wait_for_stop()
    finally:
        server.stop(grace=2)
        servicer.close()
        if replicas is not None and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    out = out or write_trunk(cfg, trunk, out_dir)
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
    tracker.refusals(trunk.steps, refused)
    tracker.close()
    ended = "all clients finished" if not presence["dropped"] else \
        f"clients {presence['dropped']} dropped (gone > {d.grace_seconds:.0f}s), the others finished"
    log.info("%s; %d trunk steps; rejected: %s", ended, trunk.steps, refused or "none")
    return out


def _server_tracker(cfg: RunConfig, trunk, servicer, out_dir: Path, replicas) -> Tracker:
    """The server's TensorBoard run (``OUTPUT/server/tensorboard``), fed at every averaged round; a resumed server
    continues its curves from the checkpoint's trunk step."""
    party = "server" if replicas is None else f"server-replica-{replicas.rank}"
    resumed = trunk.aggregator.latest()[0] >= 0
    tracker = party_tracker(cfg.tracking, party, out_dir / "tensorboard", trunk.steps + 1 if resumed else 0)
    trunk.on_round = lambda round_: tracker.server_round(trunk.steps, round_, len(trunk.schedule.active),
                                                         servicer.refusals())
    return tracker


def write_trunk(cfg: RunConfig, trunk, out_dir: Path) -> Path:
    """Write the trunk server's trained adapters; returns the file. ``trunk.sealed`` when the enclave keeps them
    (``tee.release_trunk: false``: only it can open the file), else ``trunk.safetensors``, marked releasable
    (``silotune export`` may assemble it into a client's model) only when ``deploy.release_trunk_adapters``."""
    if cfg.tee.enabled and not cfg.tee.release_trunk:
        out = out_dir / "trunk.sealed"
        atomic_write(out, trunk.runtime.sealed_state())
    else:
        out = out_dir / "trunk.safetensors"
        atomic_write(out, adapters_blob([trunk.trunk], cfg.adapters.method, cfg,
                                        releasable=cfg.deploy.release_trunk_adapters))
    return out


def connect_client(cfg: RunConfig, client_id: int, server: str | None, model_dir: Path, compute: Compute):
    """Client ``client_id``'s transport to its deployment's server (its replica's, in a hierarchical one): gRPC with
    TLS (mutual by default) and its AEAD session; in TEE mode sealed to the enclave, attested before anything is
    sent. ``server``: host:port (None: ``deploy.address``)."""
    from .transport.grpc_client import GrpcTransport

    keys = Path(cfg.deploy.keys)
    if not 0 <= client_id < cfg.federation.clients:
        raise CryptoError(f"client id {client_id} outside 0..{cfg.federation.clients - 1}")
    identity = Identity.load(keys / "clients" / f"client-{client_id}.pem", cfg.deploy.allow_insecure_keys)
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
        log.info("client %d: enclave attested (%s, measurement %s; simulated: no hardware protection); activations "
                 "and gradients sealed to it", client_id, quote.backend, quote.measurement.hex()[:16])
    return transport


def run_client(cfg: RunConfig, client_id: int, server: str | None = None, progress: bool = True) -> Path:
    """Train one data owner's head and tail against a remote trunk server; returns its adapters' path.

    Each step shows on a progress bar when stderr is a terminal (and ``progress``), else as an INFO log line;
    losses, step times, wire bytes and rounds go to TensorBoard (``OUTPUT/client-ID/tensorboard``). With
    ``tracking.client_eval`` the client scores its final model on the task's test examples before it says goodbye."""
    from .simulate import budget, client_stream, prepare_data

    if not 0 <= client_id < cfg.federation.clients:
        raise CryptoError(f"client id {client_id} outside 0..{cfg.federation.clients - 1}")
    model_dir = resolve_model(cfg.model)
    tok = load_tokenizer(model_dir)
    task, rows, parts = prepare_data(cfg, tok)
    idx = parts[client_id]
    compute = Compute.resolve(cfg.compute)
    head, tail = build_client_parts(model_dir, cfg.split, cfg.adapters, cfg.train.seed, compute)
    transport = connect_client(cfg, client_id, server, model_dir, compute)
    client = SplitClient(client_id, head, tail, transport, cfg.optim, cfg.privacy, cfg.train.seed, compute)
    stream = client_stream(cfg, tok, rows, idx, client_id)
    plan = budget(cfg)
    first_round = client.join()
    done = min(first_round * cfg.federation.local_steps, plan["steps_per_client"])
    if first_round:
        log.info("client %d: joining at round %d (latest average loaded)", client_id, first_round)
        for _ in range(done):  # skip the batches of the rounds already averaged
            next(stream)
    out_dir = Path(cfg.output) / f"client-{client_id}"
    tracker = party_tracker(cfg.tracking, f"client-{client_id}", out_dir / "tensorboard", done + 1 if done else 0)
    show = progress and sys.stderr.isatty()  # a bar on a terminal; one log line per step in a log file
    done = _train_client(cfg, client, stream, plan["steps_per_client"], first_round, done, tracker, show)
    if cfg.tracking.client_eval:  # out of the rotation first: the schedule's turns must not wait for it
        transport.call(Control(client_id, client.step, command="trained"))
        _evaluate_client(cfg, client, tok, task, tracker, done, show)
    client.finish()
    out = out_dir / "adapters.safetensors"
    atomic_write(out, adapters_blob([client.head, client.tail], cfg.adapters.method, cfg))
    tracker.close()
    log.info("client %d: %d steps, %.1f MB on the wire; adapters in %s", client_id, client.step,
             transport.stats.total / 1e6, out)
    transport.close()
    return out


def _train_client(cfg: RunConfig, client: SplitClient, stream, steps: int, first_round: int, done: int,
                  tracker: Tracker, show: bool) -> int:
    """A client's training loop to its end (``done`` steps already averaged); each step on the progress bar
    (``show``) or in an INFO line, and in TensorBoard at the step's position in the client's run. Returns the
    steps done."""
    level = logging.DEBUG if show else logging.INFO
    bar = tqdm(total=steps, initial=done, desc=f"client {client.id}", unit="step", disable=not show)
    with bar, logging_redirect_tqdm() if show else contextlib.nullcontext():
        for event, value in client_run(client, stream, steps, cfg.federation.local_steps, first_round, done):
            if event == "step":
                done += 1
                log.log(level, "client %d step %d loss %.4f", client.id, client.step, value.loss)
                tracker.train_step(done, value.loss, value.seconds, client.transport.stats)
                bar.set_postfix(loss=f"{value.loss:.3f}", refresh=False)
                bar.update(1)
            elif event == "averaged":
                tracker.client_round(done, value)
            elif event == "wait":
                time.sleep(cfg.deploy.poll_seconds)
    return done


def _evaluate_client(cfg: RunConfig, client: SplitClient, tok, task, tracker: Tracker, step: int, show: bool) -> None:
    """Score the client's final head and tail, with the server's trunk as it is now, on the task's test examples."""
    from .eval.loop import evaluate
    from .generation import split_decoder
    from .report import score_line

    metrics = evaluate(client.logits, tok, task, cfg.data.max_length, cfg.train.eval_batch_size,
                       cfg.train.max_new_tokens, decoder=split_decoder(client, not cfg.tee.enabled), progress=show,
                       desc=f"client {client.id} evaluation")
    tracker.evaluation(step, metrics)
    log.info("client %d: %s on %d test examples", client.id, score_line(metrics), metrics["n"])
