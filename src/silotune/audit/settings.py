"""The audit's configuration: which run to audit, which defences, which attacks.

A YAML file maps one-to-one onto ``AuditConfig``. ``base`` names a run configuration
(relative to the audit file), ``set`` overrides it for every audited run, and each entry
of ``defences`` is a name and the overrides that make that defence (``[]`` for none).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..config import apply_override, build, read_yaml
from ..errors import ConfigError
from .gradient_inversion import GradientSettings
from .learned_inversion import LearnedSettings
from .optimisation_inversion import OptimisationSettings

ATTACKS = ("embedding", "search", "learned", "optimisation", "search+learned", "gradient")
POINTS = ("start", "middle", "end")


@dataclass
class SearchSettings:
    shortlist: int = 64
    """Candidates per position from the head's context-free token signatures."""
    learned_shortlist: int = 32
    """Extra candidates per position from the learned inversion model (``search+learned``)."""


@dataclass
class AttackSettings:
    search: SearchSettings = field(default_factory=SearchSettings)
    """Exact search with the public (and the aggregated) head: ``search`` and ``search+learned``."""
    learned: LearnedSettings = field(default_factory=LearnedSettings)
    """The learned inversion model mapping ``h1`` back to tokens: ``learned``."""
    optimisation: OptimisationSettings = field(default_factory=OptimisationSettings)
    """Optimising input embeddings through the head to match ``h1``: ``optimisation``."""
    gradient: GradientSettings = field(default_factory=GradientSettings)
    """Label and target recovery from the returned ``dL/dh2``: ``gradient``."""


@dataclass
class AuditConfig:
    base: str = "rotten_tomatoes.yaml"
    """The run configuration audited (a path relative to the audit file)."""
    set: list[str] = field(default_factory=list)
    """Run-config overrides (``key=value``) for every audited run, e.g. a shorter budget."""
    defences: dict[str, list[str]] = field(default_factory=lambda: {"none": []})
    """Defence name -> the run-config overrides that make it (``[]``: none)."""
    attacks: list[str] = field(default_factory=lambda: list(ATTACKS))
    """Any of ``embedding``, ``search``, ``learned``, ``optimisation``, ``search+learned``, ``gradient``."""
    points: list[str] = field(default_factory=lambda: list(POINTS))
    """When the server's view is recorded: any of ``start``, ``middle``, ``end`` of training."""
    victims: int = 1
    """Clients whose recorded batches are attacked."""
    aux_examples: int = 2000
    """Public auxiliary examples for the attacker, disjoint from every client's data (the run must leave that many
    training examples unused: set ``data.max_train``)."""
    attack: AttackSettings = field(default_factory=AttackSettings)
    """The attacks' own settings."""
    target_rougeL: float = 0.20
    """The recommendation's leakage target: the best attack's ROUGE-L F1 on the private text."""
    max_accuracy_drop: float = 1.5
    """The recommendation's utility budget: accuracy points below the ``reference`` run."""
    reference: str = "none"
    """The undefended defence the others are compared with."""
    output: str = "runs/audit"
    """Where the tables, the plot, the report and ``audit.json`` go."""
    base_path: Path | None = field(default=None, metadata={"internal": True})
    """The resolved path of ``base``, set by the loader (not a key of the file)."""


def load_audit(path: str | Path, overrides: list[str] = ()) -> AuditConfig:
    path = Path(path)
    data = read_yaml(path)
    for override in overrides:
        apply_override(data, override)
    if "base_path" in data:
        raise ConfigError(f"{path}: base_path is set by SiloTune; use base")
    cfg = build(AuditConfig, data, "")
    where = str(path)
    cfg.base_path = (path.parent / cfg.base).resolve()
    if not cfg.base_path.is_file():
        raise ConfigError(f"{where}: base: run configuration {cfg.base_path} not found")
    unknown = [a for a in cfg.attacks if a not in ATTACKS]
    if unknown:
        raise ConfigError(f"{where}: attacks: unknown attack {unknown[0]!r} (known: {', '.join(ATTACKS)})")
    bad_points = [p for p in cfg.points if p not in POINTS]
    if bad_points or not cfg.points:
        raise ConfigError(f"{where}: points: choose from {', '.join(POINTS)}")
    if not cfg.defences:
        raise ConfigError(f"{where}: defences: name at least one (e.g. none: [])")
    if cfg.victims < 1:
        raise ConfigError(f"{where}: victims: must be at least 1")
    if cfg.aux_examples < 1:
        raise ConfigError(f"{where}: aux_examples: must be at least 1")
    return cfg
