"""Fine-tuning methods applied per stage: LoRA (through peft) and P-tuning v2 prefixes."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from ..models.partition import Stage
from .lora import LoraSettings, apply_lora
from .prefix import PrefixSettings, apply_prefix

METHODS = ("lora", "prefix")


@dataclass
class AdapterSettings:
    method: str = "lora"
    parts: list[str] = field(default_factory=lambda: ["head", "trunk", "tail"])
    lora: LoraSettings = field(default_factory=LoraSettings)
    prefix: PrefixSettings = field(default_factory=PrefixSettings)


def apply_method(stage: Stage, settings: AdapterSettings, seed: int, layers=None) -> Stage:
    """Freeze the stage's base weights and add the configured adapters to the blocks in
    ``layers`` (global indices; None: every block of the stage)."""
    for p in stage.parameters():
        p.requires_grad_(False)
    if settings.method == "lora":
        return apply_lora(stage, settings.lora, seed, layers)
    if settings.method == "prefix":
        return apply_prefix(stage, settings.prefix, seed, layers)
    raise ConfigError(f"adapters.method: unknown method {settings.method!r} (expected one of {', '.join(METHODS)})")


def trainable_state(stage: Stage) -> dict[str, torch.Tensor]:
    """The trainable tensors of a stage, by local name (what FedAvg averages and what we save)."""
    return {n: p.detach().clone() for n, p in stage.named_parameters() if p.requires_grad}


def load_trainable_state(stage: Stage, state: dict[str, torch.Tensor]) -> None:
    params = dict(stage.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def trained_layers(config, settings: AdapterSettings, a: int, c: int) -> set[int]:
    """Global indices of the blocks whose adapters train, from the configured parts."""
    from ..models.partition import part_range

    layers: set[int] = set()
    for part in settings.parts:
        start, stop, _, _ = part_range(config, part, a, c)
        layers.update(range(start, stop))
    return layers


__all__ = ["trained_layers", "AdapterSettings", "LoraSettings", "PrefixSettings", "METHODS", "apply_method",
           "trainable_state", "load_trainable_state"]
