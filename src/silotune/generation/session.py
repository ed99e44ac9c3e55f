"""What ``silotune generate`` runs: a trained model's parties, set up to decode, simulated or deployed.

- ``simulated``: the three parties in this process over the in-process transport (messages encoded
  and counted as on the network), with a simulation run's trained adapters (``RUN_DIR/adapters``)
  loaded into the head, trunk and tail; ``which: centralized`` runs the centralized baseline's
  adapters on the whole model instead.
- ``deployed``: this data owner's head and tail (with its trained adapters when
  ``OUTPUT/client-ID/adapters.safetensors`` exists) against a running ``silotune server`` over
  gRPC, TLS and its AEAD session; the server's trunk cache lives for this request only.

Either way the decoder is the same (``decoders.split_decoder``): the client code never knows
where the server is.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ..config import RunConfig
from ..errors import ConfigError
from ..models.loading import load_tokenizer, resolve_model
from ..models.partition import load_config
from .decoders import Decoder, LocalDecoder, split_decoder

log = logging.getLogger(__name__)


@dataclass
class Session:
    decoder: Decoder
    tok: object
    max_length: int  # prompt + new tokens, as the server's boundary allows
    wire: object = None  # the transport's byte counters (None: no wire)
    close: object = None  # callable ending the session


def _use_cache(cfg: RunConfig) -> bool:
    """Caches on every party unless the config turns them off; never with a trunk in an enclave (it keeps none)."""
    return cfg.generate.use_cache and not cfg.tee.enabled


def _max_length(cfg: RunConfig, model_dir: Path) -> int:
    from ..federation import run_limits

    return run_limits(cfg)(load_config(model_dir)).max_length


def simulated(cfg: RunConfig, run_dir: str | Path | None, which: str = "federated") -> Session:
    """The run's parties in this process; ``run_dir`` None: the base model with fresh (untrained) adapters."""
    import torch

    from ..compute import Compute
    from ..export import load_trained, read_source
    from ..federation import build_parties
    from ..protocol.codec import wire_dtype

    model_dir = resolve_model(cfg.model)
    tok, max_length = load_tokenizer(model_dir), _max_length(cfg, model_dir)
    adapters = read_source(Path(run_dir), which) if run_dir is not None else None
    if adapters is None:
        log.warning("no run folder given: generating with the base model (untrained adapters)")
    compute = Compute.resolve(cfg.compute)
    if which == "centralized":
        from ..simulate import centralized_model

        model = centralized_model(cfg, model_dir, compute)
        if adapters is not None:
            load_trained(model, adapters)
        return Session(LocalDecoder(model), tok, max_length)
    from ..federation import run_limits

    torch.manual_seed(cfg.train.seed)
    server, (client,) = build_parties(model_dir, cfg.split, cfg.adapters, cfg.optim, 1, cfg.train.seed,
                                      wire_dtype(cfg.federation.wire_dtype), cfg.privacy, limits=run_limits(cfg),
                                      compute=compute, tee=cfg.tee)
    if adapters is not None:
        if cfg.tee.enabled:
            raise ConfigError("silotune generate: a TEE-mode trunk's trained adapters stay in its enclave; "
                              "generate against the running deployment instead")
        load_trained([client.head, server.trunk, client.tail], adapters)
    return Session(split_decoder(client, _use_cache(cfg)), tok, max_length, client.transport.stats)


def deployed(cfg: RunConfig, client_id: int, server: str | None = None) -> Session:
    """Client ``client_id`` of a deployment, connected to its running server."""
    from ..client.runtime import SplitClient
    from ..compute import Compute
    from ..deploy import connect_client
    from ..export import Adapters, load_trained, read_file, record_of
    from ..federation import build_client_parts

    model_dir = resolve_model(cfg.model)
    tok = load_tokenizer(model_dir)
    compute = Compute.resolve(cfg.compute)
    head, tail = build_client_parts(model_dir, cfg.split, cfg.adapters, cfg.train.seed, compute)
    mine = Path(cfg.output) / f"client-{client_id}" / "adapters.safetensors"
    if mine.is_file():
        tensors, metadata = read_file(mine)
        load_trained([head, tail], Adapters(tensors, record_of(mine, metadata, None), [mine]))
    else:
        log.warning("%s not found: generating with client %d's untrained head and tail", mine, client_id)
    transport = connect_client(cfg, client_id, server, model_dir, compute)
    client = SplitClient(client_id, head, tail, transport, cfg.optim, cfg.privacy, cfg.train.seed, compute)
    return Session(split_decoder(client, _use_cache(cfg)), tok, _max_length(cfg, model_dir), transport.stats,
                   close=getattr(transport, "close", None))


__all__ = ["Session", "simulated", "deployed"]
