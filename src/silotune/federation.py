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
from .client.runtime import SplitClient
from .models.partition import load_stage
from .privacy.defences import PrivacySettings
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


def build_server(model_dir: Path, split: SplitSettings, adapters: AdapterSettings,
                 optim: OptimSettings, n_clients: int, seed: int,
                 client_timeout: float | None = None, checkpoint: Path | None = None) -> TrunkServer:
    trunk = load_stage(model_dir, "trunk", split.head_blocks, split.tail_blocks)
    apply_method(trunk, adapters, seed, _layers(trunk, adapters, split))
    return TrunkServer(trunk, n_clients, optim, client_timeout, checkpoint)


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
                  client_timeout: float | None = None) -> tuple[TrunkServer, list[SplitClient]]:
    server = build_server(model_dir, split, adapters, optim, n_clients, seed, client_timeout)
    connect = connect or (lambda s: InProcessTransport(s, wire_dtype))
    head, tail = build_client_parts(model_dir, split, adapters, seed)
    clients = []
    for i in range(n_clients):
        h, t = (head, tail) if i == n_clients - 1 else (copy.deepcopy(head), copy.deepcopy(tail))
        clients.append(SplitClient(i, h, t, connect(server), optim, privacy=privacy, seed=seed))
    return server, clients
