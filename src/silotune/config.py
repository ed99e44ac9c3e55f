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
from .errors import ConfigError
from .federation import FederationSettings, SplitSettings
from .privacy.defences import PrivacySettings
from .server.aggregation import AggregationSettings
from .server.boundary import BoundarySettings
from .tee.settings import TeeSettings
from .train.optim import OptimSettings


@dataclass
class DataSettings:
    task: str = "rotten_tomatoes"
    choices: list[str] | None = None
    max_train: int | None = None
    max_test: int | None = 500
    max_length: int = 128
    partition: str = "iid"  # iid | dirichlet
    alpha: float = 0.5


@dataclass
class TrainSettings:
    steps: int = 240  # optimizer steps of the centralized run; the federation spends the same examples
    batch_size: int = 8
    seed: int = 0
    eval_batch_size: int = 32
    max_new_tokens: int = 32  # generation tasks


@dataclass
class DeploySettings:
    address: str = "127.0.0.1:50051"  # where the server listens and clients connect
    keys: str = "keys"  # folder written by 'silotune keys'
    tls: bool = True
    mutual_tls: bool = True  # also require a client certificate signed by the deployment CA
    client_timeout: float = 120.0  # seconds a turn lasts (from when it is granted) before its holder is dropped
    poll_seconds: float = 0.05  # how often a client asks whether the round's average is ready
    grace_seconds: float = 600.0  # the server ends once every client finished or was gone this long
    auth_seconds: float = 10.0  # a call must name a live session (or finish its handshake) within this
    receive_seconds: float = 300.0  # a whole request must arrive within this after authenticating
    max_pending_per_peer: int = 4  # calls one connection may have open before authenticating
    max_pending: int = 16  # calls all connections together may have open before authenticating
    handshake_window: float = 300.0  # seconds a signed handshake hello stays valid (clock skew allowed)
    allow_insecure_keys: bool = False  # only warn (instead of refusing) on private key files group/others can read


@dataclass
class RunConfig:
    model: str = "smollm2"
    split: SplitSettings = field(default_factory=SplitSettings)
    adapters: AdapterSettings = field(default_factory=AdapterSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    data: DataSettings = field(default_factory=DataSettings)
    federation: FederationSettings = field(default_factory=FederationSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    aggregation: AggregationSettings = field(default_factory=AggregationSettings)
    boundary: BoundarySettings = field(default_factory=BoundarySettings)
    deploy: DeploySettings = field(default_factory=DeploySettings)
    compute: ComputeSettings = field(default_factory=ComputeSettings)
    tee: TeeSettings = field(default_factory=TeeSettings)
    centralized: bool = True
    output: str = "runs/latest"


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
    for key in ("client_timeout", "grace_seconds", "auth_seconds", "receive_seconds", "handshake_window",
                "poll_seconds"):
        if getattr(cfg.deploy, key) <= 0:
            bad(f"deploy.{key}", "must be positive")
    for key in ("max_pending_per_peer", "max_pending"):
        if getattr(cfg.deploy, key) < 1:
            bad(f"deploy.{key}", "must be at least 1")
    cfg.federation.validate(bad)
    cfg.compute.validate(bad)
    if cfg.data.partition not in ("iid", "dirichlet"):
        bad("data.partition", f"must be iid or dirichlet, got {cfg.data.partition!r}")
    if cfg.data.alpha <= 0:
        bad("data.alpha", "must be positive")
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
    if cfg.tee.enabled and cfg.federation.schedule == "hierarchical":
        bad("tee.mode", "the enclave trunk runs one replica: use the sequential or client-batch schedule")
    if cfg.federation.wire_dtype not in ("fp32", "bf16", "fp16"):
        bad("federation.wire_dtype", "must be fp32, bf16 or fp16")


def to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)
