"""Where SiloTune caches fetched packages, datasets and exported models."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$SILOTUNE_CACHE`` if set, else ``~/.cache/silotune`` (created on demand)."""
    root = os.environ.get("SILOTUNE_CACHE")
    path = Path(root).expanduser() if root else Path.home() / ".cache" / "silotune"
    path.mkdir(parents=True, exist_ok=True)
    return path
