"""Row-level file I/O: read JSONL/CSV rows with 1-based line numbers, write JSONL atomically.

Every failure is a :class:`~silotune.errors.DataError` whose message names the file
and, where there is one, the line. Blank lines are skipped; CSV rows whose every field is
blank are skipped too, with one warning line counting them.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from silotune.atomic import atomic_path
from silotune.errors import DataError

Row = tuple[int, dict]  # (1-based line number where the row starts, its fields)

log = logging.getLogger(__name__)


def _open_text(path: Path, newline: str | None = None):
    try:
        return open(path, encoding="utf-8-sig", newline=newline)
    except FileNotFoundError:
        raise DataError(f"data file {path}: not found") from None
    except IsADirectoryError:
        raise DataError(f"data file {path}: is a directory, not a file") from None
    except OSError as exc:
        raise DataError(f"data file {path}: cannot be read ({exc.strerror})") from None


def iter_jsonl(path: str | os.PathLike) -> Iterator[Row]:
    """Yield ``(line, object)`` for each non-blank line of a JSONL file."""
    path = Path(path)
    with _open_text(path) as fh:
        line_no = 0
        try:
            for line_no, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"data file {path} line {line_no}: invalid JSON ({exc.msg})") from None
                if not isinstance(obj, dict):
                    raise DataError(
                        f"data file {path} line {line_no}: expected a JSON object, got {type(obj).__name__}"
                    )
                yield line_no, obj
        except UnicodeDecodeError:
            raise DataError(f"data file {path} line {line_no + 1}: not valid UTF-8 text") from None


def iter_csv(path: str | os.PathLike) -> Iterator[Row]:
    """Yield ``(line, row)`` for each data row of a CSV file with a header line.

    Line numbers are physical lines (the header is line 1); a row whose quoted field
    spans several lines is numbered by its first line.
    """
    path = Path(path)
    with _open_text(path, newline="") as fh:
        reader = csv.reader(fh)
        next_start = 1
        blank: list[int] = []  # rows with fields that are all blank (",,"), skipped
        try:
            try:
                header = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                raise DataError(f"data file {path} line 1: malformed CSV header ({exc})") from None
            header = [h.strip() for h in header]
            if not any(header):
                raise DataError(f"data file {path} line 1: empty CSV header")
            dupes = sorted({h for h in header if header.count(h) > 1})
            if dupes:
                raise DataError(f"data file {path} line 1: duplicate CSV column {dupes[0]!r}")
            next_start = reader.line_num + 1
            while True:
                start = next_start
                try:
                    fields = next(reader)
                except StopIteration:
                    _warn_blank_rows(path, blank)
                    return
                except csv.Error as exc:
                    raise DataError(f"data file {path} line {start}: malformed CSV ({exc})") from None
                next_start = reader.line_num + 1
                if not fields:
                    continue
                if all(not f.strip() for f in fields):
                    blank.append(start)
                    continue
                if len(fields) != len(header):
                    raise DataError(
                        f"data file {path} line {start}: expected {len(header)} CSV fields, got {len(fields)}"
                    )
                yield start, dict(zip(header, fields, strict=True))
        except UnicodeDecodeError:
            raise DataError(f"data file {path} near line {next_start}: not valid UTF-8 text") from None


def _warn_blank_rows(path: Path, lines: list[int]) -> None:
    if lines:
        log.warning("data file %s: skipped %d CSV row%s whose fields are all blank (first: line %d)", path,
                    len(lines), "" if len(lines) == 1 else "s", lines[0])


def iter_rows(path: str | os.PathLike) -> Iterator[Row]:
    """Rows of a ``.jsonl`` or ``.csv`` file, chosen by suffix."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return iter_jsonl(path)
    if suffix == ".csv":
        return iter_csv(path)
    raise DataError(f"data file {path}: unsupported type {suffix or '(none)'!r}, use .jsonl or .csv")


def write_jsonl_atomic(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Write one JSON object per line to ``path`` atomically; return the record count.

    The records go to a temporary file in the same directory which then replaces
    ``path`` in one step, so readers never see a half-written file.
    """
    count = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count
