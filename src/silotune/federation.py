"""Wire a trunk server and N clients together: the same parties for every transport.

``build_parties`` loads each party's own stages from disk (the server only the trunk,
each client only its head and tail), applies the fine-tuning method to the parts that
train, and connects each client to the server through a transport made by
``connect(server)`` (in-process by default).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .adapters import AdapterSettings, apply_method, trained_layers
from .client.runtime import SplitClient, adapter_state
from .models.partition import load_stage
from .privacy.defences import PrivacySettings
from .server.aggregation import AggregationSettings, Aggregator
from .server.boundary import Limits
from .server.trunk import TrunkServer
from .train.optim import OptimSettings
from .transport.base import Transport
from .transport.inprocess import InProcessTransport


@dataclass
class SplitSettings:
    head_blocks: int = 2
    tail_blocks: int = 2


def _layers(stage, adapters: AdapterSettings, split: SplitSettings) -> set[int]:
    return trained_layers(stage.config, adapters, split.head_blocks, split.tail_blocks)


def run_limits(cfg) -> Callable[[object], Limits]:
    """The boundary limits of a run (``RunConfig``), given the model's config."""
    return lambda model_config: Limits.resolve(cfg.boundary, model_config, cfg.train.batch_size,
                                               cfg.train.eval_batch_size, cfg.data.max_length,
                                               cfg.federation.local_steps)


def build_server(model_dir: Path, split: SplitSettings, adapters: AdapterSettings,
                 optim: OptimSettings, n_clients: int, seed: int,
                 client_timeout: float | None = None, checkpoint: Path | None = None, *,
                 limits: Callable[[object], Limits] | None = None,
                 aggregation: AggregationSettings | None = None) -> TrunkServer:
    """The trunk server. It also builds the clients' initial head and tail (public base weights, the
    same seeded adapters) to know the adapter layout every update must match, never trusting a client's."""
    trunk = load_stage(model_dir, "trunk", split.head_blocks, split.tail_blocks)
    apply_method(trunk, adapters, seed, _layers(trunk, adapters, split))
    with torch.random.fork_rng():  # building them must not move the run's random stream
        start = adapter_state(*build_client_parts(model_dir, split, adapters, seed))
    lim = limits(trunk.config) if limits else Limits.unbounded(trunk.config)
    aggregator = Aggregator(n_clients, {k: tuple(v.shape) for k, v in start.items()}, start, aggregation,
                            max_examples=lim.max_examples)
    return TrunkServer(trunk, n_clients, optim, aggregator, client_timeout, checkpoint, lim)


def build_client_parts(model_dir: Path, split: SplitSettings, adapters: AdapterSettings, seed: int):
    """The head and tail every client starts from (identical initial adapters)."""
    head = load_stage(model_dir, "head", split.head_blocks, split.tail_blocks)
    tail = load_stage(model_dir, "tail", split.head_blocks, split.tail_blocks)
    apply_method(head, adapters, seed, _layers(head, adapters, split))
    apply_method(tail, adapters, seed, _layers(tail, adapters, split))
    return head, tail


def build_parties(model_dir: Path, split: SplitSettings, adapters: AdapterSettings, optim: OptimSettings,
                  n_clients: int, seed: int = 0, wire_dtype: torch.dtype = torch.float32,
                  privacy: PrivacySettings | None = None,
                  connect: Callable[[TrunkServer], Transport] | None = None,
                  client_timeout: float | None = None, limits: Callable[[object], Limits] | None = None,
                  aggregation: AggregationSettings | None = None) -> tuple[TrunkServer, list[SplitClient]]:
    server = build_server(model_dir, split, adapters, optim, n_clients, seed, client_timeout,
                          limits=limits, aggregation=aggregation)
    connect = connect or (lambda s: InProcessTransport(s, wire_dtype))
    head, tail = build_client_parts(model_dir, split, adapters, seed)
    clients = []
    for i in range(n_clients):
        h, t = (head, tail) if i == n_clients - 1 else (copy.deepcopy(head), copy.deepcopy(tail))
        clients.append(SplitClient(i, h, t, connect(server), optim, privacy=privacy, seed=seed))
    return server, clients
