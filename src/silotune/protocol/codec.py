"""Message <-> bytes, the one wire format every transport carries.

A message becomes one safetensors blob: its tensors (float tensors cast to the wire
dtype, e.g. bf16 to halve the bytes) plus a JSON header of its other fields in the
safetensors metadata. No pickle: decoding never runs code. Decoded float tensors come
back in the receiver's compute dtype (fp32).
"""

from __future__ import annotations

import dataclasses
import json

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..errors import ProtocolError
from .messages import MESSAGE_TYPES, Message

WIRE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def wire_dtype(name: str) -> torch.dtype:
    if name not in WIRE_DTYPES:
        raise ProtocolError(f"unknown wire dtype {name!r} (expected one of {', '.join(WIRE_DTYPES)})")
    return WIRE_DTYPES[name]


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


def _metadata(blob: bytes) -> dict:
    if len(blob) < 8:
        raise ProtocolError("message too short to be a SiloTune message")
    n = int.from_bytes(blob[:8], "little")
    try:
        return json.loads(blob[8:8 + n]).get("__metadata__", {})
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("message header is not valid JSON") from None


def decode(blob: bytes, compute_dtype: torch.dtype = torch.float32) -> Message:
    meta = _metadata(blob)
    kind = meta.get("kind")
    if kind not in MESSAGE_TYPES:
        raise ProtocolError(f"unknown message kind {kind!r}")
    try:
        tensors = st_load(blob)
        fields = json.loads(meta["fields"])
    except (SafetensorError, KeyError, ValueError) as exc:
        raise ProtocolError(f"malformed {kind} message ({exc})") from None
    tensors = {k: v.to(compute_dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    for name, value in list(fields.items()):
        if isinstance(value, dict) and "__tensors__" in value:
            fields[name] = {k: tensors.pop(f"{name}/{k}") for k in value["__tensors__"]}
    fields.update(tensors)
    try:
        return MESSAGE_TYPES[kind](**fields)
    except TypeError as exc:
        raise ProtocolError(f"malformed {kind} message ({exc})") from None


def tensor_bytes(msg: Message) -> int:
    """Bytes of the tensor payload alone at its current dtype (the floor any codec must pay)."""
    total = 0
    for f in dataclasses.fields(msg):
        value = getattr(msg, f.name)
        values = value.values() if isinstance(value, dict) else [value]
        total += sum(v.numel() * v.element_size() for v in values if isinstance(v, torch.Tensor))
    return total
