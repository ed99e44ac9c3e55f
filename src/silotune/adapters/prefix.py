"""P-tuning v2: trainable deep prefix key/values for every attention layer of a stage.

Each party owns the prefixes of its own layers: a (2, kv_heads, P, head_dim) tensor per
layer, prepended to the layer's keys and values through the cache interface that HF
attention layers already call (see ``partition.PrefixKV``). Prefix slots are visible to
every query; token positions keep starting at 0, so rotary positions do not depend on P.
Prefixes are trained directly (no reparameterisation MLP).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..models.arch import attention_geometry, check_prefix
from ..models.partition import PrefixKV, Stage
from .lora import name_seed


@dataclass
class PrefixSettings:
    length: int = 16
    """P: the prefix key/value slots of each attention layer."""
    init_std: float = 0.02
    """The standard deviation of the prefixes' random initialisation."""


class DeepPrefix(nn.Module):
    """The prefixes of one stage's layers, keyed by global layer index."""

    def __init__(self, layer_ids, kv_heads: int, head_dim: int, settings: PrefixSettings, seed: int):
        super().__init__()
        self.length = settings.length
        self.layers = nn.ParameterDict()
        for i in layer_ids:
            gen = torch.Generator().manual_seed(name_seed(seed, f"prefix.{i}"))
            init = torch.randn(2, kv_heads, settings.length, head_dim, generator=gen) * settings.init_std
            self.layers[str(i)] = nn.Parameter(init)

    def length_at(self, layer: int) -> int:
        return self.length if str(layer) in self.layers else 0

    def kv(self, dtype) -> PrefixKV:
        return PrefixKV({int(i): (p[0], p[1]) for i, p in self.layers.items()})


def apply_prefix(stage: Stage, settings: PrefixSettings, seed: int, layers=None) -> Stage:
    """Attach trainable prefixes to the stage's blocks (all, or those in ``layers``); a ModelError for a
    model with sliding-window attention (``arch.check_prefix``), whichever blocks this stage holds."""
    check_prefix(stage.config)
    layers = [i for i in stage.layer_ids() if layers is None or i in layers]
    if not layers:
        return stage
    kv_heads, head_dim = attention_geometry(stage.config)
    stage.prefix = DeepPrefix(layers, kv_heads, head_dim, settings, seed)
    for name, param in stage.named_parameters():
        param.requires_grad_(name.startswith("prefix."))
    return stage
