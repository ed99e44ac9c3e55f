"""Server checkpoints: everything needed to resume after a crash, verified before it is trusted.

A checkpoint holds the trunk's trainable tensors, its optimizer state, the step counter,
the last completed FedAvg round and its average.

File format (format version 2; all integers big-endian)::

    offset  size  field
    0       8     magic  b"SILOCKPT"
    8       4     format version (uint32, = 2)
    12      8     payload length in bytes (uint64)
    20      32    SHA-256 digest of the payload
    52      n     payload: ``torch.save`` of ``{"version": 2, **state}``

``load`` reads the whole file and checks magic, version, length and digest *before*
anything is unpickled; the payload is then read with ``torch.load(weights_only=True)`` and
every floating tensor in it (nested dicts, lists and tuples included) must be finite.
Anything wrong raises ``CheckpointError`` naming the file and the fault.

``save`` never puts the only good checkpoint at risk: it writes the new checkpoint to a
temporary file beside the current one, reads it back through ``load``, moves the current
checkpoint (if its digest verifies) to ``<name>.prev`` and renames the new one into place.
A crash at any point leaves ``<name>`` or ``<name>.prev`` good; ``load_latest`` (used at
server start) falls back to ``<name>.prev`` when ``<name>`` is missing or corrupt.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import struct
from pathlib import Path

import torch

from ..atomic import atomic_path
from ..errors import SiloTuneError

log = logging.getLogger(__name__)

VERSION = 2
MAGIC = b"SILOCKPT"
_HEADER = struct.Struct(">8sIQ32s")  # magic, format version, payload length, SHA-256 of the payload


class CheckpointError(SiloTuneError):
    """A checkpoint that is missing, unreadable, tampered with, truncated or holds non-finite tensors."""


def previous(path: Path) -> Path:
    """Where the checkpoint before ``path`` is kept."""
    path = Path(path)
    return path.with_name(path.name + ".prev")


def _frame(payload: bytes) -> bytes:
    """The header for ``payload`` followed by the payload: the bytes of a checkpoint file."""
    return _HEADER.pack(MAGIC, VERSION, len(payload), hashlib.sha256(payload).digest()) + payload


def _payload(path: Path, data: bytes) -> memoryview:
    """The verified payload of a checkpoint file's bytes; nothing is deserialised here."""
    if not data.startswith(MAGIC):
        if MAGIC.startswith(data):
            raise CheckpointError(f"checkpoint {path} is truncated ({len(data)} bytes)")
        if data.startswith(b"PK"):
            raise CheckpointError(f"checkpoint {path}: an unverified pre-v{VERSION} checkpoint (no integrity "
                                  "header); start afresh with --fresh")
        raise CheckpointError(f"checkpoint {path} is unreadable: bad magic bytes (not a SiloTune checkpoint)")
    if len(data) < _HEADER.size:
        raise CheckpointError(f"checkpoint {path} is truncated ({len(data)} bytes, shorter than its header)")
    _, version, length, digest = _HEADER.unpack_from(data)
    if version != VERSION:
        raise CheckpointError(f"checkpoint {path}: format version {version}, expected {VERSION}")
    payload = memoryview(data)[_HEADER.size:]
    if len(payload) != length:
        what = "truncated" if len(payload) < length else "has trailing bytes"
        raise CheckpointError(f"checkpoint {path} is {what} ({len(payload)} payload bytes, header says {length})")
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"checkpoint {path}: SHA-256 digest mismatch (the file is corrupt or was modified)")
    return payload


def _non_finite(obj, where: str = "") -> str | None:
    """The key path of the first floating tensor in ``obj`` holding NaN or Inf, else None."""
    if isinstance(obj, torch.Tensor):
        if (obj.is_floating_point() or obj.is_complex()) and not bool(torch.isfinite(obj).all()):
            return where or "<root>"
        return None
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return None
    for key, value in items:
        found = _non_finite(value, f"{where}.{key}" if where else str(key))
        if found is not None:
            return found
    return None


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} not found") from None
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path} is unreadable ({exc.strerror or exc})") from None


def load(path: Path) -> dict:
    """The state in the checkpoint file ``path``, verified (digest, then finite tensors); raises CheckpointError."""
    path = Path(path)
    payload = _payload(path, _read(path))
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for a payload it cannot read
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or state.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path}: not a SiloTune server checkpoint (version {VERSION})")
    bad = _non_finite(state)
    if bad is not None:
        raise CheckpointError(f"checkpoint {path}: tensor {bad} holds NaN or Inf values")
    return state


def load_latest(path: Path) -> tuple[dict, Path] | None:
    """``(state, file used)`` from ``path``, or from ``path.prev`` when ``path`` is missing or corrupt.

    Returns None when neither file exists; raises CheckpointError when no existing one is good."""
    path = Path(path)
    prev = previous(path)
    if not prev.exists():
        return (load(path), path) if path.exists() else None
    latest_error = None
    if path.exists():
        try:
            return load(path), path
        except CheckpointError as exc:
            log.error("%s", exc)
            latest_error = exc
    try:
        state = load(prev)
    except CheckpointError as exc:
        if latest_error is None:
            raise
        raise CheckpointError(f"no usable checkpoint: {latest_error}; and {exc}") from None
    log.warning("using the previous checkpoint %s: %s", prev,
                "the latest one is corrupt" if latest_error else f"{path} is missing")
    return state, prev


def save(path: Path, state: dict) -> None:
    """Write ``state`` as the checkpoint ``path``, keeping the current one as ``path.prev``.

    Non-finite tensors are refused, and the new file is read back and verified before
    anything is renamed; on any error the existing files stay as they were."""
    path = Path(path)
    state = {"version": VERSION, **state}
    bad = _non_finite(state)
    if bad is not None:
        raise CheckpointError(f"refusing to save checkpoint {path}: tensor {bad} holds NaN or Inf values")
    with atomic_path(path, mode=0o600) as tmp:
        torch.save(state, tmp)
        tmp.write_bytes(_frame(tmp.read_bytes()))
        try:
            load(tmp)
        except CheckpointError as exc:
            raise CheckpointError(f"checkpoint {path}: the new copy failed its read-back check ({exc})") from None
        if path.exists():
            try:
                _payload(path, _read(path))
            except CheckpointError as exc:  # never let a corrupt checkpoint replace a good .prev
                log.warning("not keeping %s as the previous checkpoint: %s", path, exc)
            else:
                os.replace(path, previous(path))
    _sync_dir(path.parent)


def remove(path: Path) -> None:
    """Delete the checkpoint ``path`` and its previous copy (a fresh start)."""
    for p in (Path(path), previous(path)):
        p.unlink(missing_ok=True)


def _sync_dir(folder: Path) -> None:
    """Make the renames durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
