"""The simulation recipe: N clients and a trunk server in one process, next to a centralized run.

Both runs use the same model, method, data, seed and number of training examples. The
federation is the real client and server code wired through the in-process transport;
the centralized run trains the whole model (one stage holding every block) on the
union of the clients' data. ``run`` returns the metrics and writes the run folder.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .adapters import apply_method, trained_layers
from .client.loop import client_run
from .config import RunConfig
from .data import load_task, partition_dirichlet, partition_iid
from .errors import ConfigError
from .eval.loop import evaluate
from .federation import build_parties, run_limits
from .models.loading import load_tokenizer, resolve_model
from .models.partition import load_stage
from .protocol.codec import wire_dtype
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
    return BatchStream([rows[i] for i in idx], cfg.train.batch_size, tok.pad_token_id,
                       cfg.train.seed + 1 + client_id)


def run_federated(cfg: RunConfig, model_dir: Path, tok, task, rows, parts, plan, progress=True,
                  connect=None, streams=None) -> dict:
    """The federation: real clients and trunk server over the in-process transport.

    ``connect(server) -> Transport`` replaces the transport (the audit taps the server's
    side of it) and ``streams`` the clients' batch streams (the audit records which
    examples went into each step); neither changes what is computed."""
    seed = cfg.train.seed
    torch.manual_seed(seed)
    server, clients = build_parties(model_dir, cfg.split, cfg.adapters, cfg.optim, cfg.federation.clients,
                                    seed, wire_dtype(cfg.federation.wire_dtype), cfg.privacy, connect,
                                    limits=run_limits(cfg), aggregation=cfg.aggregation)
    if streams is None:
        streams = [client_stream(cfg, tok, rows, idx, k) for k, idx in enumerate(parts)]
    curve, client_losses = [], [[] for _ in clients]
    start = time.perf_counter()
    bar = tqdm(total=plan["centralized_steps"], desc="federated", disable=not progress, unit="step")
    runs = {c.id: client_run(c, stream, plan["steps_per_client"], cfg.federation.local_steps)
            for c, stream in zip(clients, streams)}
    while runs:  # round-robin: the sequential schedule, one client step at a time
        for cid in list(runs):
            try:
                event, value = next(runs[cid])
            except StopIteration:
                del runs[cid]
                continue
            if event == "step":
                client_losses[cid].append(value)
                curve.append(value)
                bar.update(1)
                bar.set_postfix(client=cid, loss=f"{value:.3f}")
    bar.close()
    train_time = time.perf_counter() - start
    wire = [dict(up=c.transport.stats.bytes_up, down=c.transport.stats.bytes_down,
                 messages=c.transport.stats.messages) for c in clients]
    done = {c.id: len(losses) for c, losses in zip(clients, client_losses)}
    total_steps = sum(done.values())
    metrics = evaluate(clients[0].logits, tok, task, cfg.data.max_length, cfg.train.eval_batch_size,
                       cfg.train.max_new_tokens)
    train_bytes = sum(w["up"] + w["down"] for w in wire)
    per_client = []
    for client, idx, losses, w in zip(clients, parts, client_losses, wire):
        labels = Counter(task.train[i].label for i in idx)
        last = losses[-cfg.federation.local_steps:]
        per_client.append({"client": client.id, "examples": len(idx), "steps": done[client.id],
                           "label_counts": {str(k): v for k, v in sorted(labels.items(), key=str)},
                           "final_loss": sum(last) / max(len(last), 1),
                           "bytes_up": w["up"], "bytes_down": w["down"]})
    return {"metrics": metrics, "curve": curve, "train_seconds": train_time, "steps": total_steps,
            "examples": total_steps * cfg.train.batch_size, "rounds": plan["rounds"],
            "bytes_per_step": train_bytes / max(total_steps, 1), "clients": per_client,
            "_parties": (server, clients)}


def run_centralized(cfg: RunConfig, model_dir: Path, tok, task, rows, plan, progress=True) -> dict:
    seed = cfg.train.seed
    torch.manual_seed(seed)
    model = load_stage(model_dir, "full")
    apply_method(model, cfg.adapters, seed,
                 trained_layers(model.config, cfg.adapters, cfg.split.head_blocks, cfg.split.tail_blocks))
    stepper = Stepper(trainable(model), cfg.optim)
    stream = BatchStream(rows, cfg.train.batch_size, tok.pad_token_id, seed)
    curve = []
    start = time.perf_counter()
    for _ in tqdm(range(plan["centralized_steps"]), desc="centralized", disable=not progress, unit="step"):
        batch = next(stream)
        stepper.zero_grad()
        loss = lm_loss(model(batch["input_ids"], batch["lengths"]), batch["labels"])
        loss.backward()
        stepper.step()
        curve.append(loss.item())
    train_time = time.perf_counter() - start
    with torch.no_grad():
        metrics = evaluate(lambda b: model(b["input_ids"], b["lengths"]), tok, task, cfg.data.max_length,
                           cfg.train.eval_batch_size, cfg.train.max_new_tokens)
    return {"metrics": metrics, "curve": curve, "train_seconds": train_time,
            "steps": plan["centralized_steps"], "examples": plan["centralized_steps"] * cfg.train.batch_size,
            "_model": model}


def prepare_data(cfg: RunConfig, tok):
    """(task, encoded training rows, client shards): identical in every process for a config."""
    try:
        task = load_task(cfg.data.task, seed=cfg.train.seed, max_train=cfg.data.max_train,
                         max_test=cfg.data.max_test, choices=cfg.data.choices)
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
    result["federated"] = run_federated(cfg, model_dir, tok, task, rows, parts, plan, progress)
    if cfg.centralized:
        result["centralized"] = run_centralized(cfg, model_dir, tok, task, rows, plan, progress)
    write_run(cfg, result, Path(cfg.output))
    return result
