"""Server checkpoints: everything needed to resume after a crash, written atomically.

A checkpoint holds the trunk's trainable tensors, its optimizer state, the step counter,
the last completed FedAvg round and its average. It is written to a temporary file and
renamed over the previous one, so a crash leaves either the old or the new checkpoint,
never half of one.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..atomic import atomic_path
from ..errors import SiloTuneError

VERSION = 1


def save(path: Path, state: dict) -> None:
    with atomic_path(path, mode=0o600) as tmp:
        torch.save({"version": VERSION, **state}, tmp)


def load(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SiloTuneError(f"checkpoint {path} not found") from None
    except Exception as exc:  # torch raises many kinds for a corrupt file
        raise SiloTuneError(f"checkpoint {path} is unreadable ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or state.get("version") != VERSION:
        raise SiloTuneError(f"checkpoint {path}: not a SiloTune server checkpoint (version {VERSION})")
    return state
