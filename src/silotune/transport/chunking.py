"""Split a sealed message into gRPC-sized chunks and join them back, with a size limit."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from ..errors import ProtocolError

CHUNK_BYTES = 1 << 20  # 1 MiB: well under gRPC's default 4 MiB message limit


def split(data: bytes, size: int = CHUNK_BYTES) -> Iterator[tuple[bytes, bool]]:
    """(piece, is_last) pairs; an empty message is one empty last piece."""
    if not data:
        yield b"", True
        return
    for start in range(0, len(data), size):
        yield data[start:start + size], start + size >= len(data)


def join(pieces: Iterable[tuple[bytes, bool]], limit: int) -> bytes:
    """Concatenate pieces up to the one marked last; ProtocolError past ``limit`` bytes or if cut short."""
    parts, total = [], 0
    for piece, last in pieces:
        total += len(piece)
        if total > limit:
            raise ProtocolError(f"message larger than the {limit} byte limit")
        parts.append(piece)
        if last:
            return b"".join(parts)
    raise ProtocolError("message ended before its last chunk")
