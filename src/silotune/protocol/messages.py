"""The typed messages clients and the trunk server exchange; nothing else crosses the wire.

Tensors travel as tensors (dtype and shape preserved by the codec); everything else is
plain JSON-able metadata. A 4-D attention mask never travels: ``lengths`` is enough.

Every decoded message goes through ``check_fields`` first: one table-driven check of each
value against its dataclass field's declared type and bounds, so a hostile peer cannot
hand the server or a client a message whose fields have the wrong types.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..errors import ProtocolError

TensorDict = dict[str, torch.Tensor]

PAYLOAD_MAX_KEYS = 16
TEXT_MAX_CHARS = 1024  # payload strings and keys, tensor names
JSON_SAFE_INT = 2**53  # payload integers stay exact in any JSON reader


def bounded(lo: int, hi: int, **kwargs):
    """A dataclass field for an integer that must lie in [lo, hi]."""
    return field(metadata={"bounds": (lo, hi)}, **kwargs)


@dataclass
class Message:
    client: int = bounded(0, 2**31 - 1)
    step: int = bounded(0, 2**62)
    kind: ClassVar[str] = "message"


@dataclass
class ForwardActivations(Message):
    """Client -> server: the head's output ``h1`` (B, T, H) and per-sample lengths.

    Split generation (``train`` false) may name a ``cache``: a request id under which the server keeps the
    keys and values of its blocks for this client (``server/caches.py``), so that each decode step sends one
    hidden vector per sequence. ``past``: the slots the client knows the cache holds (0 opens it); the
    server refuses a step that does not continue its cache."""

    hidden: torch.Tensor = None
    lengths: torch.Tensor = None
    train: bool = True
    cache: int = bounded(0, 2**31 - 1, default=0)
    past: int = bounded(0, 2**31 - 1, default=0)
    kind: ClassVar[str] = "forward"


@dataclass
class ReturnedActivations(Message):
    """Server -> client: the trunk's output ``h2`` for the same batch."""

    hidden: torch.Tensor = None
    kind: ClassVar[str] = "returned"


@dataclass
class Gradients(Message):
    """Client -> server ``dL/dh2``; server -> client ``dL/dh1``."""

    grad: torch.Tensor = None
    kind: ClassVar[str] = "gradients"


@dataclass
class Aggregation(Message):
    """Client -> server: its adapter tensors and example count; server -> client: the average."""

    tensors: TensorDict = field(default_factory=dict)
    num_examples: int = bounded(0, 2**62, default=0)
    round: int = bounded(0, 2**31, default=0)
    kind: ClassVar[str] = "aggregation"


@dataclass
class Control(Message):
    """Session control: ``ack``, ``fetch_aggregate`` (payload: round), ``bye``, ``release`` (payload: cache, a
    generation request's id), ``error``.

    The payload holds at most 16 JSON scalars under string keys; a ``round`` in it is an
    integer, -1 meaning "none yet".
    """

    command: str = field(default="ack", metadata={"max_chars": 64})
    payload: dict = field(default_factory=dict, metadata={"bounds": {"round": (-1, 2**31), "cache": (0, 2**31 - 1)}})
    kind: ClassVar[str] = "control"


@dataclass
class EnclaveMessage(Message):
    """TEE mode: a message between a client and the server's enclave (``tee/channel.py``), which the
    server's host relays without being able to read it.

    ``of`` says what it carries: ``hello`` / ``welcome``, the attested handshake that opens the client's
    session with the enclave (public key material and the enclave's quote); ``forward``, ``returned``,
    ``gradients``, the U-split's messages, and ``update`` / ``aggregate``, a client's FedAvg update and
    the average it gets back, encoded and sealed under that session's keys. ``data``: those bytes
    (uint8). In the clear, what the host needs to schedule and bound them and what the ciphertext's size
    reveals anyway: a sealed tensor's ``rows`` and ``tokens`` (batch and sequence length), whether a
    forward trains, and the FedAvg ``round``. The enclave checks them against the message it opens.
    """

    of: str = field(default="forward", metadata={"max_chars": 16})
    data: torch.Tensor = None
    rows: int = bounded(0, 2**31 - 1, default=0)
    tokens: int = bounded(0, 2**31 - 1, default=0)
    train: bool = True
    round: int = bounded(0, 2**31, default=0)
    kind: ClassVar[str] = "enclave"


@dataclass
class SealedTensor:
    """The host's handle on a tensor sealed between a client and the enclave: the ciphertext and the shape
    it declares, passed through the schedules to the enclave unread (never a ``Message`` field)."""

    client: int
    step: int
    of: str
    data: bytes
    shape: tuple[int, ...]
    train: bool = True
    round: int = 0


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.kind: cls for cls in (ForwardActivations, ReturnedActivations, Gradients, Aggregation, Control, EnclaveMessage)
}


def _show(value) -> str:
    """A short description of a received value for an error line (never the whole value)."""
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor"
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"a {value.bit_length()}-bit integer"
    if isinstance(value, (dict, list)):
        return f"a {'JSON object' if isinstance(value, dict) else 'list'} of {len(value)}"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _text_problem(value, max_chars: int) -> str | None:
    if not isinstance(value, str):
        return f"must be a string, got {_show(value)}"
    if len(value) > max_chars:
        return f"must be at most {max_chars} characters, got {len(value)}"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "must be valid unicode text (it holds a lone surrogate)"
    return None


def _int_problem(value, bounds: tuple[int, int]) -> str | None:
    if not isinstance(value, int) or isinstance(value, bool):
        return f"must be an integer, got {_show(value)}"
    lo, hi = bounds
    if not lo <= value <= hi:
        return f"must be between {lo} and {hi}, got {_show(value)}"
    return None


def _check_int(value, meta) -> str | None:
    return _int_problem(value, meta.get("bounds", (-JSON_SAFE_INT, JSON_SAFE_INT)))


def _check_bool(value, meta) -> str | None:
    return None if isinstance(value, bool) else f"must be true or false, got {_show(value)}"


def _check_str(value, meta) -> str | None:
    return _text_problem(value, meta.get("max_chars", TEXT_MAX_CHARS))


def _check_tensor(value, meta) -> str | None:
    return None if value is None or isinstance(value, torch.Tensor) else f"must be a tensor, got {_show(value)}"


def _check_tensor_dict(value, meta) -> str | None:
    if not isinstance(value, dict):
        return f"must map names to tensors, got {_show(value)}"
    for key, tensor in value.items():
        problem = _text_problem(key, TEXT_MAX_CHARS)
        if problem:
            return f"names {problem}"
        if not isinstance(tensor, torch.Tensor):
            return f"must map names to tensors, got {_show(tensor)} under {_show(key)}"
    return None


def _check_payload(value, meta) -> str | None:
    if not isinstance(value, dict):
        return f"must be a JSON object, got {_show(value)}"
    if len(value) > PAYLOAD_MAX_KEYS:
        return f"must have at most {PAYLOAD_MAX_KEYS} keys, got {len(value)}"
    for key, item in value.items():
        problem = _text_problem(key, TEXT_MAX_CHARS)
        if problem:
            return f"keys {problem}"
        if key in meta.get("bounds", {}):
            problem = _int_problem(item, meta["bounds"][key])
        elif isinstance(item, str):
            problem = _text_problem(item, TEXT_MAX_CHARS)
        elif isinstance(item, float):
            problem = None if math.isfinite(item) else f"must be finite, got {item}"
        elif isinstance(item, int) and not isinstance(item, bool):
            problem = _int_problem(item, (-JSON_SAFE_INT, JSON_SAFE_INT))
        elif item is None or isinstance(item, bool):
            problem = None
        else:
            problem = f"must be a JSON scalar, got {_show(item)}"
        if problem:
            return f"entry {_show(key)} {problem}"
    return None


_CHECKS = {int: _check_int, bool: _check_bool, str: _check_str, torch.Tensor: _check_tensor,
           TensorDict: _check_tensor_dict, dict: _check_payload}


@functools.cache
def field_types(cls: type[Message]) -> dict[str, type]:
    """{field name: declared type} of a message class (annotations resolved)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def check_fields(cls: type[Message], values: dict) -> None:
    """ProtocolError unless ``values`` are fields of ``cls`` (required ones all there), each of its type and bounds."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in values:
        if name not in fields:
            raise ProtocolError(f"malformed {cls.kind} message: unknown field {_show(name)}")
    for name, spec in fields.items():
        if name not in values:
            if spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
                raise ProtocolError(f"malformed {cls.kind} message: field {name!r} is missing")
            continue
        problem = _CHECKS[field_types(cls)[name]](values[name], spec.metadata)
        if problem:
            raise ProtocolError(f"malformed {cls.kind} message: field {name!r} {problem}")
