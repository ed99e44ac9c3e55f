"""LoRA on a stage through peft, with initialisation that does not depend on the split.

``inject_adapter_in_model`` adds peft LoRA layers to the Linear modules of any
``nn.Module``, here one stage. The A matrices are re-drawn from a generator seeded by
the run seed and the parameter's name in the *full* model, so the same base model gets
the same LoRA initialisation whether it is split in three or kept whole, and every
client starts from the same head and tail adapters.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import cast_adapter_dtype

from ..errors import ConfigError
from ..models.partition import Stage


@dataclass
class LoraSettings:
    r: int = 8
    """The rank of each LoRA update."""
    alpha: float = 16.0
    """The scaling numerator: each update is scaled by ``alpha / r``."""
    dropout: float = 0.0
    """Dropout on the LoRA branch's input while training."""
    targets: list[str] | None = None
    """Module names to adapt (peft's ``target_modules``, e.g. ``[q_proj, v_proj]``); null: the architecture's defaults."""


def name_seed(seed: int, name: str) -> int:
    """A 63-bit seed from the run seed and a parameter name."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def apply_lora(stage: Stage, settings: LoraSettings, seed: int, layers=None) -> Stage:
    """Add LoRA adapters to the stage's target Linear layers of the blocks in ``layers``
    (global indices; None: all); only they are trainable."""
    local = [j for j, i in enumerate(stage.layer_ids()) if layers is None or i in layers]
    if not local:
        return stage  # e.g. a stage with no blocks: nothing to adapt
    targets = settings.targets or list(stage.spec.lora_targets)
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=targets, fan_in_fan_out=stage.spec.fan_in_fan_out,
                        bias="none", layers_to_transform=local, layers_pattern="blocks")
    try:
        inject_adapter_in_model(config, stage)
    except ValueError as exc:
        raise ConfigError(f"adapters.lora.targets {targets}: {str(exc).splitlines()[0]}") from None
    cast_adapter_dtype(stage, "default")  # adapters train in float32 over a bf16 (or fp16) base, as PeftModel does
    for name, param in stage.named_parameters():
        param.requires_grad_("lora_" in name)
        if "lora_A" in name:
            gen = torch.Generator().manual_seed(name_seed(seed, stage.full_name(name)))
            with torch.no_grad():
                bound = 1.0 / math.sqrt(param.shape[1])
                param.copy_(torch.empty(param.shape).uniform_(-bound, bound, generator=gen))
        elif "lora_B" in name:
            with torch.no_grad():
                param.zero_()
    return stage
