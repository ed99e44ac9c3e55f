"""Fine-tuning methods applied per stage: LoRA (through peft), P-tuning v2 prefixes, SPF (a sparse
subset of the base weights, ``spf.py``) and LoRA with SPF on the same layers (``lora+spf``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from ..models.partition import Stage
from .lora import LoraSettings, apply_lora
from .prefix import PrefixSettings, apply_prefix
from .spf import DELTA, ROWS, SpfSettings, apply_spf, check_rows, merge_spf, spf_indices

METHODS = ("lora", "prefix", "spf", "lora+spf")


@dataclass
class AdapterSettings:
    method: str = "lora"
    """``lora``, ``prefix`` (P-tuning v2 deep prefixes), ``spf`` (sparse deltas on the top attention heads and FFN
    rows) or ``lora+spf``."""
    parts: list[str] = field(default_factory=lambda: ["head", "trunk", "tail"])
    """The parts that train: any of ``head``, ``trunk``, ``tail``; a part left out stays frozen (e.g. ``[head, tail]``:
    a frozen trunk, only client-side parameters train)."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA (through peft), for ``lora`` and ``lora+spf``."""
    prefix: PrefixSettings = field(default_factory=PrefixSettings)
    """P-tuning v2 deep prefixes, for ``prefix``."""
    spf: SpfSettings = field(default_factory=SpfSettings)
    """Sparsification parameter fine-tuning, for ``spf`` and ``lora+spf``."""


def apply_method(stage: Stage, settings: AdapterSettings, seed: int, layers=None) -> Stage:
    """Freeze the stage's base weights and add the configured adapters to the blocks in
    ``layers`` (global indices; None: every block of the stage)."""
    for p in stage.parameters():
        p.requires_grad_(False)
    if settings.method == "lora":
        return apply_lora(stage, settings.lora, seed, layers)
    if settings.method == "prefix":
        return apply_prefix(stage, settings.prefix, seed, layers)
    if settings.method == "spf":
        return apply_spf(stage, settings.spf, layers)
    if settings.method == "lora+spf":
        # SPF first: its hooked layers stay Linear / Conv1D, so peft then wraps them as base_layer
        # (delta named ``...q_proj.base_layer.spf_delta``). apply_lora leaves only lora_ trainable:
        # the deltas are made trainable again after it.
        apply_spf(stage, settings.spf, layers)
        apply_lora(stage, settings.lora, seed, layers)
        for name, param in stage.named_parameters():
            if name.endswith(DELTA):
                param.requires_grad_(True)
        return stage
    raise ConfigError(f"adapters.method: unknown method {settings.method!r} (expected one of {', '.join(METHODS)})")


def trainable_state(stage: Stage) -> dict[str, torch.Tensor]:
    """The trainable tensors of a stage, by local name (what FedAvg averages and what we save).

    SPF's row indices are not trainable and not here (``spf_indices``): every party selects them
    from the same base weights, so FedAvg averages the deltas element by element."""
    return {n: p.detach().clone() for n, p in stage.named_parameters() if p.requires_grad}


def load_trainable_state(stage: Stage, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` into the stage's parameters. SPF row indices in it (``...spf_rows``, as in a
    saved adapters file) are checked against the stage's own rows, not loaded."""
    params = dict(stage.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            if name.endswith(ROWS) and name not in params:
                check_rows(stage, name, value)
                continue
            params[name].copy_(value)


def trained_layers(config, settings: AdapterSettings, a: int, c: int) -> set[int]:
    """Global indices of the blocks whose adapters train, from the configured parts."""
    from ..models.partition import part_range

    layers: set[int] = set()
    for part in settings.parts:
        start, stop, _, _ = part_range(config, part, a, c)
        layers.update(range(start, stop))
    return layers


__all__ = ["trained_layers", "AdapterSettings", "LoraSettings", "PrefixSettings", "SpfSettings", "METHODS",
           "apply_method", "trainable_state", "load_trainable_state", "spf_indices", "merge_spf"]
