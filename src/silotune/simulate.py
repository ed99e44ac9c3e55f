"""The simulation recipe: N clients and a trunk server, next to a centralized run.

Both runs use the same model, method, data, seed and training batches: the centralized
run trains the whole model (one stage holding every block) on the clients' batches in
the order the sequential schedule serves them (client 0's first, client 1's first, ...),
so a federation of one client equals it step for step. The federation is the real
client and server code wired through the in-process transport, each client in its own
thread (the server's schedule orders their steps); with the hierarchical schedule each
trunk replica and its clients run in their own process, the replicas joined by a gloo
(or NCCL) process group. ``run`` returns the metrics and writes the run folder.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .adapters import apply_method, trained_layers
from .client.loop import run_concurrently
from .compute import Compute, fp32_trainables
from .config import RunConfig
from .data import partition_dirichlet, partition_iid
from .data.settings import load_configured_task
from .errors import ConfigError
from .eval.loop import evaluate
from .federation import build_parties, run_limits
from .generation import LocalDecoder, split_decoder
from .models.loading import load_tokenizer, resolve_model
from .models.partition import load_stage
from .protocol.codec import wire_dtype
from .server import replicas as hier
from .tracking import Tracking
from .train.batching import BatchStream, encode_example
from .train.loss import lm_loss
from .train.optim import Stepper, trainable

log = logging.getLogger(__name__)


def budget(cfg: RunConfig) -> dict:
    """Steps for each side so that both see the same number of training examples."""
    n = cfg.federation.clients
    steps_per_client = math.ceil(cfg.train.steps / n)
    rounds = math.ceil(steps_per_client / cfg.federation.local_steps)
    return {"centralized_steps": steps_per_client * n, "steps_per_client": steps_per_client,
            "rounds": rounds, "examples": steps_per_client * n * cfg.train.batch_size}


def shards(cfg: RunConfig, train) -> list[list[int]]:
    n = cfg.federation.clients
    if cfg.data.partition == "dirichlet":
        labels = [e.label if e.label is not None else 0 for e in train]
        return partition_dirichlet(labels, n, cfg.data.alpha, cfg.train.seed)
    return partition_iid(len(train), n, cfg.train.seed)


def client_stream(cfg: RunConfig, tok, rows, idx: list[int], client_id: int) -> BatchStream:
    """Client ``client_id``'s endless batches over its shard ``idx``: the same in every process."""
    pad = tok if isinstance(tok, int) else tok.pad_token_id
    return BatchStream([rows[i] for i in idx], cfg.train.batch_size, pad, cfg.train.seed + 1 + client_id)


def sequential_order(streams: list, steps_per_client: int):
    """The clients' batches in the order the sequential schedule trains them: one step of each in turn."""
    for _ in range(steps_per_client):
        for stream in streams:
            yield next(stream)


def run_federated(cfg: RunConfig, model_dir: Path, tok, task, rows, parts, plan, progress=True,
                  connect=None, streams=None, tracking: Tracking | None = None) -> dict:
    """The federation: real clients and trunk server over the in-process transport.

    ``connect(server) -> Transport`` replaces the transport (the audit taps the server's
    side of it) and ``streams`` the clients' batch streams (the audit records which
    examples went into each step); neither changes what is computed. ``tracking``: the
    run's TensorBoard parties (``tracking.py``; None: none)."""
    if streams is None:
        streams = [client_stream(cfg, tok, rows, idx, k) for k, idx in enumerate(parts)]
    track = tracking or Tracking.off()
    track.open([f"client-{k}" for k in range(cfg.federation.clients)] + ["server", "federated"])
    bars: list = []  # made at the first step, so that set-up errors print alone
    bar_lock = threading.Lock()
    live: set[int] = set()  # clients whose steps were tracked as they happened (not other replicas')

    def on_event(client, event, value):
        if event == "step":
            with bar_lock:
                if not bars:
                    bars.append(tqdm(total=plan["centralized_steps"], desc=f"federated ({cfg.federation.schedule})",
                                     disable=not progress, unit="step"))
                bars[0].update(1)
                bars[0].set_postfix(client=client.id, loss=f"{value.loss:.3f}")
                live.add(client.id)
            track.party(f"client-{client.id}").train_step(client.step, value.loss, value.seconds,
                                                          client.transport.stats)
        elif event == "averaged":
            track.party(f"client-{client.id}").client_round(client.step, value)

    def on_parties(server, clients):
        server.on_round = lambda r: track.party("server").server_round(server.steps, r, len(server.schedule.active),
                                                                       dict(server.rejected))

    if cfg.federation.schedule == "hierarchical":
        server, clients, client_losses, wire, extra = _run_hierarchical(cfg, model_dir, streams, plan, on_event,
                                                                        on_parties)
        train_time = extra.pop("train_seconds")  # from when every replica had loaded its parts
    else:
        server, clients = _parties(cfg, model_dir, connect)
        on_parties(server, clients)
        if cfg.tee.enabled:  # every client attests the enclave and opens its session before it sends anything
            for client in clients:
                client.transport.connect()
        start = time.perf_counter()
        client_losses = run_concurrently(clients, streams, plan["steps_per_client"], cfg.federation.local_steps,
                                         on_event)
        train_time = time.perf_counter() - start
        wire = [_wire(c) for c in clients]
        extra = {}
    if bars:
        bars[0].update(plan["centralized_steps"] - bars[0].n)  # other replicas' steps (their own processes)
        bars[0].close()
    curve = [losses[s] for s in range(plan["steps_per_client"]) for losses in client_losses if s < len(losses)]
    total_steps = sum(len(losses) for losses in client_losses)
    metrics = evaluate(clients[0].logits, tok, task, cfg.data.max_length, cfg.train.eval_batch_size,
                       cfg.train.max_new_tokens, decoder=split_decoder(clients[0], not cfg.tee.enabled),
                       progress=progress, desc="evaluation (federated)")
    train_bytes = sum(w["up"] + w["down"] for w in wire)
    if cfg.tee.enabled:
        extra["tee"] = server.runtime.stats()  # backend, measurement, offload FLOPs and masks
    per_client = []
    for cid, (idx, losses, w) in enumerate(zip(parts, client_losses, wire)):
        last = losses[-cfg.federation.local_steps:]
        per_client.append({"client": cid, "examples": len(idx), "steps": len(losses),
                           "label_counts": task.label_counts(idx),
                           "final_loss": sum(last) / max(len(last), 1),
                           "bytes_up": w["up"], "bytes_down": w["down"]})
    schedule = server.schedule
    extra.setdefault("trunk_passes", getattr(schedule, "passes", server.steps))
    result = {"metrics": metrics, "curve": curve, "train_seconds": train_time, "steps": total_steps,
              "examples": total_steps * cfg.train.batch_size, "rounds": plan["rounds"],
              "samples_per_second": total_steps * cfg.train.batch_size / max(train_time, 1e-9),
              "bytes_per_step": train_bytes / max(total_steps, 1), "clients": per_client,
              "schedule": cfg.federation.schedule, "trunk_steps": server.steps, **extra,
              "_parties": (server, clients)}
    _track_federated(track, result, client_losses, live, server)
    return result


def _track_federated(track: Tracking, result: dict, client_losses: list[list[float]], live: set[int], server) -> None:
    """A finished federation's curves and totals: the losses of clients trained in other processes (hierarchical
    replicas), the whole run's loss curve, scores, wire bytes and times, the server's refusals."""
    for cid, losses in enumerate(client_losses):
        if cid not in live:
            track.party(f"client-{cid}").curve(losses)
    federated = track.party("federated")
    federated.curve(result["curve"])
    federated.run_summary(len(result["curve"]), result)
    track.party("server").refusals(server.steps, dict(server.rejected))


def _wire(client) -> dict:
    s = client.transport.stats
    return dict(up=s.bytes_up, down=s.bytes_down, messages=s.messages)


def _parties(cfg: RunConfig, model_dir: Path, connect=None, replicas=None):
    torch.manual_seed(cfg.train.seed)
    return build_parties(model_dir, cfg.split, cfg.adapters, cfg.optim, cfg.federation.clients, cfg.train.seed,
                         wire_dtype(cfg.federation.wire_dtype), cfg.privacy, connect, limits=run_limits(cfg),
                         aggregation=cfg.aggregation, federation=cfg.federation,
                         compute=Compute.resolve(cfg.compute), replicas=replicas, tee=cfg.tee)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _replica(rank: int, world: int, init: str, cfg: RunConfig, model_dir: Path, streams, plan, on_event=None,
             on_parties=None):
    """One trunk replica and its group's clients (threads), joined to the other replicas' processes;
    ``on_parties(server, clients)`` sees them once built."""
    compute = Compute.resolve(cfg.compute)
    if compute.device.type == "cuda" and torch.cuda.device_count() > 1:
        compute = Compute(torch.device("cuda", rank % torch.cuda.device_count()), compute.dtype)
        cfg.compute.device = str(compute.device)
    hier.init_group(rank, world, compute.device, init)
    replicas = hier.Replicas(rank, world)
    server, clients = _parties(cfg, model_dir, replicas=replicas)
    if on_parties is not None:
        on_parties(server, clients)
    torch.distributed.barrier()  # every replica loaded: training starts together (and is timed from here)
    start = time.perf_counter()
    losses = run_concurrently(clients, [streams[c.id] for c in clients], plan["steps_per_client"],
                              cfg.federation.local_steps, on_event)
    replicas.train_seconds = time.perf_counter() - start
    return server, clients, losses, replicas


def _replica_process(rank, world, init, cfg, model_dir, streams, plan, threads, queue) -> None:
    torch.set_num_threads(threads)
    try:
        server, clients, losses, replicas = _replica(rank, world, init, cfg, model_dir, streams, plan)
        queue.put((rank, {c.id: (loss, _wire(c)) for c, loss in zip(clients, losses)},
                   server.steps, replicas.fingerprints, None))
    except BaseException as exc:
        queue.put((rank, {}, 0, [], f"{type(exc).__name__}: {exc}"))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _run_hierarchical(cfg: RunConfig, model_dir: Path, streams, plan, on_event, on_parties):
    """M replica processes (this one is replica 0); returns replica 0's parties and every client's losses."""
    import torch.multiprocessing as mp

    world, n = cfg.federation.replicas, cfg.federation.clients
    hier.groups(n, world)  # refuses impossible assignments before any process starts
    threads = max(1, (os.cpu_count() or 1) // world)
    init = f"tcp://127.0.0.1:{_free_port()}"
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_replica_process, args=(r, world, init, cfg, model_dir, streams, plan, threads, queue),
                         daemon=True) for r in range(1, world)]
    for p in procs:
        p.start()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        server, clients, losses, replicas = _replica(0, world, init, cfg, model_dir, streams, plan, on_event,
                                                     on_parties)
        results = {c.id: (loss, _wire(c)) for c, loss in zip(clients, losses)}
        steps, prints = server.steps, {0: replicas.fingerprints}
        for _ in procs:
            rank, got, trunk_steps, fingerprints, error = queue.get(timeout=600)
            if error:
                raise RuntimeError(f"replica {rank} failed: {error}")
            results.update(got)
            steps += trunk_steps
            prints[rank] = fingerprints
    finally:
        torch.set_num_threads(before)
        for p in procs:
            p.join(timeout=30)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    client_losses = [results[k][0] for k in range(n)]
    wire = [results[k][1] for k in range(n)]
    return server, clients, client_losses, wire, {
        "replicas": world, "replica_syncs": len(prints[0]), "trunk_steps_all_replicas": steps,
        "train_seconds": replicas.train_seconds,
        "replica_fingerprints": [prints[r] for r in range(world)]}  # equal lists: identical trunks at every sync


def centralized_model(cfg: RunConfig, model_dir: Path, compute: Compute):
    """The whole model as one stage, with the run's adapters on the blocks the split run trains."""
    model = load_stage(model_dir, "full", dtype=compute.dtype, device=compute.device)
    apply_method(model, cfg.adapters, cfg.train.seed,
                 trained_layers(model.config, cfg.adapters, cfg.split.head_blocks, cfg.split.tail_blocks))
    model.to(compute.device)
    fp32_trainables(model)
    return model


def run_centralized(cfg: RunConfig, model_dir: Path, tok, task, rows, plan, progress=True, parts=None,
                    tracking: Tracking | None = None) -> dict:
    """The whole model trained on the federation's batches, in the sequential schedule's order
    (``parts``: the clients' shards; None: one stream over all rows); ``tracking``: the run's TensorBoard parties."""
    track = (tracking or Tracking.off()).party("centralized")
    seed = cfg.train.seed
    torch.manual_seed(seed)
    compute = Compute.resolve(cfg.compute)
    model = centralized_model(cfg, model_dir, compute)
    stepper = Stepper(trainable(model), cfg.optim)
    if parts is None:
        batches = iter(BatchStream(rows, cfg.train.batch_size, tok.pad_token_id, seed))
    else:
        streams = [client_stream(cfg, tok, rows, idx, k) for k, idx in enumerate(parts)]
        batches = sequential_order(streams, plan["steps_per_client"])
    curve = []
    start = time.perf_counter()
    for _ in tqdm(range(plan["centralized_steps"]), desc="centralized", disable=not progress, unit="step"):
        step_start = time.perf_counter()
        batch = {k: compute.to_device(v) for k, v in next(batches).items()}
        stepper.zero_grad()
        loss = lm_loss(model(batch["input_ids"], batch["lengths"]), batch["labels"])
        loss.backward()
        stepper.step()
        curve.append(loss.item())
        track.train_step(len(curve), curve[-1], time.perf_counter() - step_start)
    train_time = time.perf_counter() - start
    with torch.no_grad():
        metrics = evaluate(lambda b: model(*(compute.to_device(b[k]) for k in ("input_ids", "lengths"))).float().cpu(),
                           tok, task, cfg.data.max_length, cfg.train.eval_batch_size, cfg.train.max_new_tokens,
                           decoder=LocalDecoder(model), progress=progress, desc="evaluation (centralized)")
    result = {"metrics": metrics, "curve": curve, "train_seconds": train_time,
              "steps": plan["centralized_steps"], "examples": plan["centralized_steps"] * cfg.train.batch_size,
              "samples_per_second": plan["centralized_steps"] * cfg.train.batch_size / max(train_time, 1e-9),
              "_model": model}
    track.run_summary(len(curve), result)
    return result


def prepare_data(cfg: RunConfig, tok):
    """(task, encoded training rows, client shards): identical in every process for a config."""
    try:
        task = load_configured_task(cfg.data, cfg.train.seed)
    except ValueError as exc:
        raise ConfigError(f"data: {exc}") from None
    add_eos = task.spec.kind == "generation"
    rows = [encode_example(tok, e, cfg.data.max_length, add_eos) for e in task.train]
    return task, rows, shards(cfg, task.train)


def run(cfg: RunConfig, progress: bool = True) -> dict:
    """Run the federation (and the centralized baseline) and write the run folder."""
    from .report import write_run

    model_dir = resolve_model(cfg.model)
    tok = load_tokenizer(model_dir)
    task, rows, parts = prepare_data(cfg, tok)
    plan = budget(cfg)
    log.info("task %s: %d train / %d test examples; %d clients; %s", task.spec.name, len(task.train),
             len(task.test), cfg.federation.clients, plan)
    result = {"task": task.spec.name, "kind": task.spec.kind, "model": str(cfg.model),
              "train_examples": len(task.train), "test_examples": len(task.test), "plan": plan}
    with Tracking(cfg.tracking, Path(cfg.output)) as tracking:
        result["federated"] = run_federated(cfg, model_dir, tok, task, rows, parts, plan, progress, tracking=tracking)
        if cfg.centralized:
            result["centralized"] = run_centralized(cfg, model_dir, tok, task, rows, plan, progress, parts, tracking)
    write_run(cfg, result, Path(cfg.output))
    close = getattr(result["federated"]["_parties"][0].runtime, "close", None)
    if close is not None:  # an enclave process
        close()
    return result
