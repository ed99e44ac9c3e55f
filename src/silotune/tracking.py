"""Experiment tracking: TensorBoard event files for every party of a run, the log set-up, the progress switch.

Each party writes its own TensorBoard *run* (a folder of event files), so that TensorBoard draws the
same tag of every party in one chart (every client's ``train/loss``, the federation's next to the
centralized baseline's). Where (``tracking.dir`` unset):

    simulate:  OUTPUT/tensorboard/{client-K, server, federated, centralized}/
    server:    OUTPUT/server/tensorboard/        (a hierarchical replica: OUTPUT/server/replica-R/tensorboard/)
    client:    OUTPUT/client-K/tensorboard/

and with ``tracking.dir: D``: ``D/client-K``, ``D/server`` (``D/server-replica-R``), ``D/federated``,
``D/centralized``. Every party has one x axis, so that TensorBoard's purge of a restarted run's stale
points works: a client's own step, the server's trunk optimizer steps, the federation's and the
centralized run's training step (the same examples seen at the same x). The tags:

    client-K     train/loss, time/step_seconds, wire/bytes_sent, wire/bytes_received (cumulative),
                 fedavg/round (the round whose average the client loaded), eval/<metric> (deployments)
    server       fedavg/round, fedavg/active_clients, refused/<reason> (cumulative), at each averaged round
    federated    train/loss (all clients, in the sequential schedule's order), eval/<metric>, wire/bytes_sent,
                 wire/bytes_received, wire/bytes_per_step, time/train_seconds, throughput/samples_per_second
    centralized  train/loss, time/step_seconds, eval/<metric>, time/train_seconds, throughput/samples_per_second

Without the ``tensorboard`` package (the ``silotune[tracking]`` extra) one warning says how to install
it and every tracker does nothing. Writers flush every few seconds and at every averaged round and
close at the end (or at exit): a crashed run leaves readable events up to its last flush.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'silotune[tracking]'"
FLUSH_SECONDS = 5
LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@dataclass
class TrackingSettings:
    """The ``tracking:`` config section: TensorBoard event files and the deployed clients' evaluation."""

    tensorboard: bool = True
    """Write TensorBoard event files for every party of the run, next to its reports (needs the ``tensorboard``
    package: ``pip install 'silotune[tracking]'``; without it the run warns once and writes none)."""
    dir: str | None = None
    """Where the event files go: null puts each party's next to its reports (``OUTPUT/tensorboard/PARTY`` in a
    simulation, ``OUTPUT/server/tensorboard`` and ``OUTPUT/client-K/tensorboard`` in a deployment); a folder D puts
    them in ``D/PARTY`` (``client-K``, ``server``, ``federated``, ``centralized``)."""
    client_eval: bool = True
    """A deployed client evaluates its final head and tail, with the server's trunk as it is then, on the task's test
    examples before it says goodbye, and logs and records the score (``eval/<metric>``)."""

    def validate(self, bad) -> None:
        if self.dir is not None and not self.dir.strip():
            bad("tracking.dir", "must be a folder, or null for each party's output folder")


_missing_warned = threading.Event()


def _summary_writer_class():
    """torch's ``SummaryWriter``; None (with one warning per process) when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if not _missing_warned.is_set():
            _missing_warned.set()
            log.warning("tracking.tensorboard: the tensorboard package is not installed, so no TensorBoard event "
                        "files are written (install it with: %s; or set tracking.tensorboard: false)", INSTALL_HINT)
        return None
    return SummaryWriter


class Tracker:
    """One party's TensorBoard run: scalars under the tags of this module's scheme. Thread-safe; with no folder (or
    without tensorboard) every method does nothing. ``purge_step``: TensorBoard hides this folder's earlier points at
    or past that step (0: a fresh run replaces an earlier run's; a resumed party passes its next step)."""

    def __init__(self, logdir: Path | None, purge_step: int | None = 0):
        self.logdir = Path(logdir) if logdir is not None else None
        self._writer = None
        self._lock = threading.Lock()
        if self.logdir is None:
            return
        cls = _summary_writer_class()
        if cls is None:
            return
        try:
            self._writer = cls(log_dir=str(self.logdir), flush_secs=FLUSH_SECONDS, purge_step=purge_step)
        except OSError as exc:
            raise ConfigError(f"tracking: cannot write TensorBoard events to {self.logdir} ({exc})") from None
        atexit.register(self.close)  # a run that fails still leaves closed, readable files

    @classmethod
    def off(cls) -> Tracker:
        return cls(None)

    @property
    def enabled(self) -> bool:
        return self._writer is not None

    def scalar(self, tag: str, value: float, step: int) -> None:
        with self._lock:
            if self._writer is not None:
                self._writer.add_scalar(tag, float(value), int(step))

    def flush(self) -> None:
        with self._lock:
            if self._writer is not None:
                self._writer.flush()

    def close(self) -> None:
        with self._lock:
            writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
            atexit.unregister(self.close)

    # ---- the scheme's events ----
    def train_step(self, step: int, loss: float, seconds: float | None = None, wire=None) -> None:
        """A training step: its loss, its wall time and (a client's) its transport's bytes so far (``WireStats``)."""
        self.scalar("train/loss", loss, step)
        if seconds is not None:
            self.scalar("time/step_seconds", seconds, step)
        if wire is not None:
            self.scalar("wire/bytes_sent", wire.bytes_up, step)
            self.scalar("wire/bytes_received", wire.bytes_down, step)

    def client_round(self, step: int, round_: int) -> None:
        """A client loaded round ``round_``'s average after its step ``step``."""
        self.scalar("fedavg/round", round_, step)

    def server_round(self, trunk_steps: int, round_: int, active: int, refused: Mapping[str, int]) -> None:
        """The server averaged round ``round_`` at ``trunk_steps``, with ``active`` clients in the rotation."""
        self.scalar("fedavg/round", round_, trunk_steps)
        self.scalar("fedavg/active_clients", active, trunk_steps)
        self.refusals(trunk_steps, refused)
        self.flush()

    def refusals(self, step: int, refused: Mapping[str, int]) -> None:
        for reason, count in sorted(refused.items()):
            self.scalar(f"refused/{reason}", count, step)

    def evaluation(self, step: int, metrics: Mapping) -> None:
        """The held-out scores of ``evaluate`` (accuracy, or ROUGE): ``eval/<metric>``."""
        for name, value in metrics.items():
            if name != "n" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.scalar(f"eval/{name}", value, step)

    def curve(self, losses: list[float], tag: str = "train/loss") -> None:
        """A whole loss curve at steps 1..len(losses)."""
        for i, loss in enumerate(losses, start=1):
            self.scalar(tag, loss, i)

    def run_summary(self, step: int, result: Mapping) -> None:
        """A finished run's totals (``simulate``'s federated or centralized result) at its last step."""
        self.evaluation(step, result["metrics"])
        self.scalar("time/train_seconds", result["train_seconds"], step)
        self.scalar("throughput/samples_per_second", result["samples_per_second"], step)
        if "clients" in result:
            self.scalar("wire/bytes_sent", sum(c["bytes_up"] for c in result["clients"]), step)
            self.scalar("wire/bytes_received", sum(c["bytes_down"] for c in result["clients"]), step)
            self.scalar("wire/bytes_per_step", result["bytes_per_step"], step)


def party_dir(settings: TrackingSettings, party: str, default: Path) -> Path | None:
    """A party's TensorBoard folder: ``tracking.dir``/PARTY, or ``default`` (next to its reports); None when off."""
    if not settings.tensorboard:
        return None
    return Path(settings.dir) / party if settings.dir else Path(default)


def party_tracker(settings: TrackingSettings, party: str, default: Path, purge_step: int | None = 0) -> Tracker:
    return Tracker(party_dir(settings, party, default), purge_step)


class Tracking:
    """The trackers of one simulation's parties, each opened at its first use (``party("client-0")``), all
    under ``OUTPUT/tensorboard`` unless ``tracking.dir`` says otherwise."""

    def __init__(self, settings: TrackingSettings | None, output: Path | None):
        self.settings = settings if settings is not None and output is not None else TrackingSettings(tensorboard=False)
        self.root = Path(output or ".") / "tensorboard"
        self._parties: dict[str, Tracker] = {}
        self._lock = threading.Lock()

    @classmethod
    def off(cls) -> Tracking:
        return cls(None, None)

    def open(self, names: list[str]) -> None:
        """Open these parties' trackers now (before training, so that no step waits for one)."""
        for name in names:
            self.party(name)

    def party(self, name: str) -> Tracker:
        with self._lock:
            if name not in self._parties:
                self._parties[name] = party_tracker(self.settings, name, self.root / name)
            return self._parties[name]

    def close(self) -> None:
        with self._lock:
            trackers, self._parties = list(self._parties.values()), {}
        for tracker in trackers:
            tracker.close()

    def __enter__(self) -> Tracking:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- operational messages and progress bars ----
class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (a test's capture, tqdm's redirection)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class _LevelFilter(logging.Filter):
    """silotune's records from one level, other libraries' from another."""

    def __init__(self, ours: int, others: int):
        super().__init__()
        self.ours, self.others = ours, others

    def filter(self, record: logging.LogRecord) -> bool:
        ours = record.name == "silotune" or record.name.startswith("silotune.")
        return record.levelno >= (self.ours if ours else self.others)


_handler_lock = threading.Lock()


def configure_logging(level: str) -> None:
    """Log silotune's records of ``level`` and above, and other libraries' warnings and errors (everything at
    ``debug``), to stderr as ``time LEVEL logger: message``. Calling it again replaces the previous set-up; only
    the root logger's level is set (no package logger's)."""
    if level not in LOG_LEVELS:
        raise ConfigError(f"log level {level!r}: expected one of {', '.join(LOG_LEVELS)}")
    ours = LOG_LEVELS[level]
    others = ours if ours == logging.DEBUG else max(ours, logging.WARNING)
    root = logging.getLogger()
    with _handler_lock:
        for handler in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
            root.removeHandler(handler)
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
        handler.addFilter(_LevelFilter(ours, others))
        root.addHandler(handler)
        root.setLevel(min(ours, others))


def silence_progress() -> None:
    """Hide every progress bar: our own take ``progress=False`` from their callers; this hides the libraries'
    (transformers' and huggingface_hub's, and any plain tqdm bar, e.g. transformers' GGUF conversion, through
    ``TQDM_DISABLE``, which tqdm reads when it is first imported: set here before that, it also reaches the
    processes this one starts)."""
    if "tqdm" not in sys.modules:
        os.environ["TQDM_DISABLE"] = "1"
    import transformers

    transformers.utils.logging.disable_progress_bar()
