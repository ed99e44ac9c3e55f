"""Validate a user's JSONL/CSV data file and turn its rows into uniform records.

The file's kind is set by its first row: a ``prompt`` field makes it a *generation*
file (every row needs non-empty string ``prompt`` and ``target``), otherwise it is a
*classification* file (every row needs a non-empty string ``text`` and a ``label``).
A label is an int index into the choices, or a choice string (compared without its
leading space; a string that matches no choice but reads as an integer is an index,
which is how CSV files give indices).
Without given choices they are the sorted distinct string labels, and int labels are
then an error. Other fields are ignored.

Output records are ``{"text", "label": int}`` or ``{"prompt", "target"}``, each with
the 1-based line it came from, so later errors can still point into the file.

Rows are all kept, but repeats are reported (one warning line each, naming the file, the
count and the first case): rows whose text (prompt) and label (target) repeat an earlier
row's, which can land in both the training and the test set, and texts that appear with
different labels.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from silotune.data.records import iter_rows
from silotune.errors import DataError

_INT = re.compile(r"[+-]?\d+")

log = logging.getLogger(__name__)


def normalize_choices(choices: list[str]) -> list[str]:
    """Give each verbalizer one leading space (``"yes"`` -> ``" yes"``); reject empties and repeats."""
    if isinstance(choices, str) or not choices:
        raise ValueError("choices must be a non-empty list of strings")
    out = []
    for c in choices:
        if not isinstance(c, str) or not c.strip():
            raise ValueError(f"choices must be non-empty strings, got {c!r}")
        out.append(c if c.startswith(" ") else " " + c)
    stripped = [c.strip() for c in out]
    dupes = sorted({c for c in stripped if stripped.count(c) > 1})
    if dupes:
        raise ValueError(f"choice {dupes[0]!r} appears more than once")
    return out


def _text_field(row: dict, field: str, at: str) -> str:
    if field not in row or row[field] is None:
        raise DataError(f"{at}: missing field {field!r}")
    value = row[field]
    if not isinstance(value, str):
        raise DataError(f"{at}: field {field!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{at}: field {field!r} is empty")
    return value


def _label_index(label: object, choices: list[str], at: str) -> int:
    if isinstance(label, bool) or not isinstance(label, (int, str)):
        raise DataError(f"{at}: label must be an int or a string, got {type(label).__name__}")
    if isinstance(label, str):
        names = [c.strip() for c in choices]
        if label.strip() in names:
            return names.index(label.strip())
        if not _INT.fullmatch(label.strip()):
            raise DataError(f"{at}: label {label!r} is not one of the choices: {', '.join(names)}")
        label = int(label)
    if not 0 <= label < len(choices):
        raise DataError(f"{at}: label {label} is out of range for {len(choices)} choices")
    return label


def warn_repeats(path: Path, records: list[tuple[int, dict]], key: str, value: str) -> None:
    """Warn (one line each) about rows repeating an earlier row's ``key`` and ``value``, and about
    ``key`` texts that come with different ``value``s."""
    first: dict[str, tuple[int, object]] = {}
    repeats, conflicts = [], []
    for line, row in records:
        seen = first.setdefault(row[key], (line, row[value]))
        if seen[0] != line:
            (repeats if seen[1] == row[value] else conflicts).append((line, seen[0]))
    if repeats:
        line, earlier = repeats[0]
        log.warning("data file %s: %d row%s repeat%s an earlier row's %s and %s (first: line %d repeats line %d); "
                    "they are kept, and a repeat can land in both the training and the test set", path,
                    len(repeats), "" if len(repeats) == 1 else "s", "s" if len(repeats) == 1 else "", key, value,
                    line, earlier)
    if conflicts:
        line, earlier = conflicts[0]
        log.warning("data file %s: %d row%s repeat%s an earlier row's %s with a different %s (first: line %d, "
                    "against line %d); both are kept", path, len(conflicts), "" if len(conflicts) == 1 else "s",
                    "s" if len(conflicts) == 1 else "", key, value, line, earlier)


def read_user_file(path: str | Path, choices: list[str] | None = None) -> tuple[str, list[str], list[tuple[int, dict]]]:
    """``(kind, choices, [(line, record), ...])`` of a user ``.jsonl``/``.csv`` file (see module doc)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {path}: not found")
    rows = list(iter_rows(path))
    if not rows:
        raise DataError(f"data file {path}: no rows")
    kind = "generation" if "prompt" in rows[0][1] else "classification"
    out: list[tuple[int, dict]] = []
    if kind == "generation":
        for line, row in rows:
            at = f"data file {path} line {line}"
            out.append((line, {"prompt": _text_field(row, "prompt", at), "target": _text_field(row, "target", at)}))
        warn_repeats(path, out, "prompt", "target")
        return kind, [], out
    texts = []
    for line, row in rows:
        at = f"data file {path} line {line}"
        texts.append(_text_field(row, "text", at))
        label = row.get("label")
        if label is None or (isinstance(label, str) and not label.strip()):
            raise DataError(f"{at}: missing field 'label'")
    if choices is not None:
        choices = normalize_choices(list(choices))
    else:
        for line, row in rows:
            label = row["label"]
            if isinstance(label, bool) or not isinstance(label, (int, str)):
                raise DataError(
                    f"data file {path} line {line}: label must be an int or a string, got {type(label).__name__}"
                )
            if not isinstance(label, str):
                raise DataError(
                    f"data file {path} line {line}: label {row['label']!r} is not a string; "
                    "pass choices=[...] to use integer labels"
                )
        choices = normalize_choices(sorted({row["label"].strip() for _, row in rows}))
    for (line, row), text in zip(rows, texts, strict=True):
        label = _label_index(row["label"], choices, f"data file {path} line {line}")
        out.append((line, {"text": text, "label": label}))
    warn_repeats(path, out, "text", "label")
    return kind, choices, out
