"""Message <-> bytes, the one wire format every transport carries.

A message becomes one safetensors blob: its tensors (float tensors cast to the wire
dtype, e.g. bf16 to halve the bytes) plus a JSON header of its other fields in the
safetensors metadata. No pickle: decoding never runs code. Decoded float tensors come
back in the receiver's compute dtype (fp32).

Decoding treats every byte as hostile: the header is parsed and checked (JSON objects
without repeated keys, known dtypes, shapes torch can allocate) before safetensors reads
the tensors, and every field is then checked against its message type
(``messages.check_fields``). Whatever the bytes, the outcome is a well-typed message or
a ProtocolError naming the problem.
"""

from __future__ import annotations

import collections
import dataclasses
import json

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..errors import ProtocolError
from .messages import MESSAGE_TYPES, Message, TensorDict, check_fields, field_types

WIRE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# safetensors dtypes a message may carry (floats any wire dtype or fp64, integer lengths, masks)
TENSOR_DTYPES = ("F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL")
MAX_DIMS = 8
MAX_ELEMENTS = 2**40  # far past any message the transport limit admits; keeps torch's size arithmetic in range


def wire_dtype(name: str) -> torch.dtype:
    if name not in WIRE_DTYPES:
        raise ProtocolError(f"unknown wire dtype {name!r} (expected one of {', '.join(WIRE_DTYPES)})")
    return WIRE_DTYPES[name]


def wire_dtype_name(dtype: torch.dtype) -> str:
    """The config name of a wire dtype (``wire_dtype``'s inverse)."""
    for name, value in WIRE_DTYPES.items():
        if value == dtype:
            return name
    raise ProtocolError(f"{dtype} is not a wire dtype (expected one of {', '.join(WIRE_DTYPES)})")


def encode(msg: Message, dtype: torch.dtype = torch.float32) -> bytes:
    tensors: dict[str, torch.Tensor] = {}
    fields: dict = {}
    for f in dataclasses.fields(msg):
        value = getattr(msg, f.name)
        if isinstance(value, torch.Tensor):
            tensors[f.name] = value
        elif isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values()):
            tensors.update({f"{f.name}/{k}": v for k, v in value.items()})
            fields[f.name] = {"__tensors__": sorted(value)}
        else:
            fields[f.name] = value
    wire = {k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).contiguous()
            for k, v in tensors.items()}
    return st_save(wire, metadata={"kind": msg.kind, "fields": json.dumps(fields)})


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """JSON object hook: a key given twice is refused (two parsers could keep different copies)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        twice = next(k for k, n in collections.Counter(k for k, _ in pairs).items() if n > 1)
        raise ProtocolError(f"message JSON gives the key {twice[:40]!r} twice")
    return out


_JSON = json.JSONDecoder(object_pairs_hook=_unique_keys)


def _json(text: bytes | str, what: str):
    try:
        return _JSON.decode(text.decode("utf-8") if isinstance(text, bytes) else text)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError; RecursionError: nested too deep
        raise ProtocolError(f"{what} is not valid JSON") from None


def _check_entry(name: str, entry) -> None:
    """A header's tensor entry: a dtype we carry and a shape torch can allocate (offsets: safetensors checks)."""
    if not isinstance(entry, dict):
        raise ProtocolError(f"message header entry {name[:40]!r} is not a tensor description")
    dtype, shape = entry.get("dtype"), entry.get("shape")
    if not isinstance(dtype, str) or dtype not in TENSOR_DTYPES:
        raise ProtocolError(f"tensor {name[:40]!r} has an unsupported dtype "
                            f"(expected one of {', '.join(TENSOR_DTYPES)})")
    size = 1
    for d in shape if isinstance(shape, list) and len(shape) <= MAX_DIMS else [-1]:
        if type(d) is not int or d < 0:  # type(): a JSON true is a bool, not a dimension
            size = -1
            break
        size *= max(d, 1)  # torch's strides multiply the non-zero sizes even when one is zero
    if not 0 < size <= MAX_ELEMENTS:
        raise ProtocolError(f"tensor {name[:40]!r} has an impossible shape (at most {MAX_DIMS} dimensions "
                            f"and {MAX_ELEMENTS} elements)")


def _header(blob: bytes) -> tuple[dict, dict]:
    """(tensor entries, metadata) of a blob's safetensors header, checked before safetensors reads it."""
    if len(blob) < 8:
        raise ProtocolError("message too short to be a SiloTune message")
    n = int.from_bytes(blob[:8], "little")
    if n > len(blob) - 8:
        raise ProtocolError(f"message header length {n} runs past the end of the {len(blob)} byte message")
    header = _json(bytes(blob[8:8 + n]), "message header")
    if not isinstance(header, dict):
        raise ProtocolError("message header is not a JSON object")
    meta = header.pop("__metadata__", None)
    if not isinstance(meta, dict):
        raise ProtocolError("message header has no metadata object")
    for name, entry in header.items():
        _check_entry(name, entry)
    return header, meta


def decode(blob: bytes, compute_dtype: torch.dtype = torch.float32) -> Message:
    """The message in ``blob``; ProtocolError (and nothing else) for any bytes that are not a valid message."""
    entries, meta = _header(blob)
    kind = meta.get("kind")
    if not isinstance(kind, str) or kind not in MESSAGE_TYPES:
        shown = repr(kind[:40]) if isinstance(kind, str) else f"of type {type(kind).__name__}"
        raise ProtocolError(f"unknown message kind {shown} (expected one of {', '.join(MESSAGE_TYPES)})")
    cls = MESSAGE_TYPES[kind]
    if not isinstance(meta.get("fields"), str):
        raise ProtocolError(f"malformed {kind} message: no JSON text of its fields")
    fields = _json(meta["fields"], f"malformed {kind} message: its field text")
    if not isinstance(fields, dict):
        raise ProtocolError(f"malformed {kind} message: its fields are not a JSON object")
    try:
        tensors = st_load(blob)
    except SafetensorError as exc:
        raise ProtocolError(f"malformed {kind} message: bad tensor data ({exc})") from None
    if tensors.keys() != entries.keys():
        raise ProtocolError(f"malformed {kind} message: tensor table disagrees with its header")
    tensors = {k: v.to(compute_dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    types = field_types(cls)
    values = {}
    for name, value in fields.items():
        if types.get(name) == TensorDict and isinstance(value, dict) and "__tensors__" in value:
            value = _gather(kind, name, value, tensors)
        values[name] = value
    for name, tensor in tensors.items():
        if name in values:
            raise ProtocolError(f"malformed {kind} message: field {name[:40]!r} sent twice")
        values[name] = tensor
    check_fields(cls, values)
    return cls(**values)


def _gather(kind: str, name: str, ref: dict, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Pop the tensors a ``{"__tensors__": [keys]}`` reference names, as {key: tensor}."""
    keys = ref["__tensors__"]
    if len(ref) != 1 or not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise ProtocolError(f"malformed {kind} message: field {name!r} has a malformed tensor list")
    out = {}
    for key in keys:
        tensor = tensors.pop(f"{name}/{key}", None)
        if tensor is None:
            raise ProtocolError(f"malformed {kind} message: field {name!r} names a missing tensor {key[:40]!r}")
        out[key] = tensor
    return out


def tensor_bytes(msg: Message) -> int:
    """Bytes of the tensor payload alone at its current dtype (the floor any codec must pay)."""
    total = 0
    for f in dataclasses.fields(msg):
        value = getattr(msg, f.name)
        values = value.values() if isinstance(value, dict) else [value]
        total += sum(v.numel() * v.element_size() for v in values if isinstance(v, torch.Tensor))
    return total
