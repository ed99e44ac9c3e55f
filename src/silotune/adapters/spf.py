"""SPF (Sparsification Parameter Fine-tuning): train a sparse subset of the frozen base weights.

Huang et al. (ICASSP 2024) fine-tune, next to (or instead of) LoRA, a fixed subset of the
pretrained weights themselves: in each attention Q/K/V projection the output rows of the
heads whose pretrained weights have the largest L1 norm, and in the FFN up-projection the
rows with the largest L1 norm. Here ``ratio`` (default 0.5) is the fraction of heads of each
projection, and of rows of each up-projection, that train.

Which rows train is a function of the base weights alone (norms in float64 on the CPU, ties
broken by the lower index), so every client, the trunk server and the unsplit model pick the
same rows, and FedAvg can average the trained values element by element.

Representation. A target ``nn.Linear`` (or GPT-2 ``Conv1D``, whose weight is stored
transposed, (in, out)) keeps its frozen weight and gets

- ``spf_delta``: a trainable (n_rows, in_features) parameter, zero at the start, float32;
- ``spf_rows``: a persistent long buffer, the n_rows output rows it adds to (ascending);
- a forward hook adding ``x @ spf_delta.T`` to those output columns (``index_add``): the
  effective weight is ``W + scatter(spf_delta, spf_rows)`` without ever forming a dense delta.

The module stays an ``nn.Linear`` / ``Conv1D``, so peft's LoRA injection still finds it:
peft wraps it as ``base_layer`` and calls it, hook included, so LoRA and SPF stack on one
layer. Either order gives the same parameter names (SPF applied to a LoRA layer goes on its
``base_layer``): ``...q_proj.base_layer.spf_delta`` when combined with LoRA,
``...q_proj.spf_delta`` alone. ``merge_spf`` folds the deltas into the base weights and
removes the hooks.

Why hand-written and not peft's SHiRA (its sparse high-rank adapter): SHiRA fixes the number
of trained weights of a layer at r(m + n), where SPF's count follows from the ratio of heads
or rows; and a SHiRA layer replaces the Linear, so LoRA cannot be injected on the same Linear
next to it.

Fused layers. GPT-2's ``c_attn`` and Phi-3's ``qkv_proj`` hold Q, K and V one after the other
along the output: each part selects its own top heads (layout ``qkv``). Phi-3's
``gate_up_proj`` holds the gate projection then the up-projection: only the up half (the
second half of the output rows) is the FFN up-projection, so only its rows are ranked and
trained (layout ``up_half``); the gate half stays frozen. The layout of a target comes from
``ArchSpec.spf_layouts`` by the module's last name, ``rows`` where it says nothing.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import ConfigError, ModelError
from ..models.arch import attention_geometry
from ..models.partition import Stage

DELTA = "spf_delta"
ROWS = "spf_rows"
LAYOUT_KINDS = ("q", "kv", "qkv", "up_half", "rows")


@dataclass
class SpfSettings:
    ratio: float = 0.5
    """Fraction of the heads of each Q/K/V projection, and of the rows of each up-projection, that train."""
    targets: list[str] | None = None
    """Module names (last name, or a dotted tail such as ``attn.c_proj``); None: the architecture's defaults."""

    def validate(self, bad) -> None:
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0 < self.ratio <= 1:
            bad("adapters.spf.ratio", f"must be in (0, 1], got {self.ratio!r}")
        if self.targets is not None and not self.targets:
            bad("adapters.spf.targets", "must name at least one layer (or be null for the architecture's defaults)")


def kept(ratio: float, n: int) -> int:
    """How many of ``n`` heads or rows a ratio keeps: ceil(ratio * n), at least 1, at most n."""
    return min(n, max(1, math.ceil(round(ratio * n, 9))))


# ---- the layer itself ----
def _shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or Conv1D."""
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def _spf_hook(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    """output + x @ delta.T on the selected output rows (a module-level function: deep copies keep working)."""
    delta = module.spf_delta
    extra = torch.matmul(args[0].to(delta.dtype), delta.t()).to(output.dtype)
    return output.index_add(-1, module.spf_rows, extra)


def _is_spf_hook(hook) -> bool:
    return hook is _spf_hook


def attach(module: nn.Module, rows: torch.Tensor) -> nn.Parameter:
    """Give a Linear or Conv1D (or a peft LoRA layer: its base layer) a zero, trainable, float32
    ``spf_delta`` on output ``rows`` and the forward hook that adds it. Returns the parameter."""
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    if not isinstance(base, (nn.Linear, Conv1D)):
        raise ModelError(f"SPF adapts Linear or Conv1D layers, not {type(base).__name__}")
    if DELTA in base._parameters:
        raise ModelError("SPF is already attached to this layer")
    in_features, out_features = _shape(base)
    rows = torch.as_tensor(rows, dtype=torch.long).flatten().cpu()
    if rows.numel() == 0 or int(rows.min()) < 0 or int(rows.max()) >= out_features or len(rows.unique()) != len(rows):
        raise ModelError(f"SPF rows must be distinct output rows in 0..{out_features - 1}")
    device = base.weight.device
    delta = nn.Parameter(torch.zeros(len(rows), in_features, dtype=torch.float32, device=device))
    base.register_parameter(DELTA, delta)
    base.register_buffer(ROWS, rows.sort().values.to(device), persistent=True)
    base.register_forward_hook(_spf_hook)
    return delta


def detach(module: nn.Module) -> None:
    """Remove SPF from one layer without merging (the hook, the delta and the rows)."""
    for key in [k for k, hook in module._forward_hooks.items() if _is_spf_hook(hook)]:
        del module._forward_hooks[key]
    module._parameters.pop(DELTA, None)
    module._buffers.pop(ROWS, None)


def effective_delta(module: nn.Module) -> torch.Tensor:
    """The dense (out, in) weight change an SPF layer applies (for inspection and tests only)."""
    in_features, out_features = _shape(module)
    dense = torch.zeros(out_features, in_features, dtype=module.spf_delta.dtype, device=module.spf_delta.device)
    return dense.index_copy(0, module.spf_rows, module.spf_delta.detach())


def merge_spf(model: nn.Module) -> int:
    """Fold every SPF delta under ``model`` into its frozen base weight and remove the hooks,
    parameters and buffers; the merged model computes what the unmerged one did. Returns how
    many layers were merged."""
    merged = 0
    for module in list(model.modules()):
        if DELTA not in module._parameters:
            continue
        with torch.no_grad():
            weight, rows = module.weight, module.spf_rows.to(module.weight.device)
            delta = module.spf_delta.detach().to(weight.device, weight.dtype)
            if isinstance(module, Conv1D):  # weight (in, out): the rows are output columns
                weight.index_add_(1, rows, delta.t())
            else:
                weight.index_add_(0, rows, delta)
        detach(module)
        merged += 1
    return merged


# ---- selecting the rows ----
def _sections(layout: str, config, out_features: int, where: str) -> list[tuple[int, int, int]]:
    """(first output row, number of groups, rows per group) of each part ranked on its own."""
    if layout in ("q", "kv", "qkv"):
        heads = int(config.num_attention_heads)
        kv_heads, head_dim = attention_geometry(config)
        parts = {"q": [heads], "kv": [kv_heads], "qkv": [heads, kv_heads, kv_heads]}[layout]
        if sum(parts) * head_dim != out_features:
            raise ModelError(f"{where}: SPF layout {layout!r} expects {sum(parts) * head_dim} output rows "
                             f"({'+'.join(map(str, parts))} heads of {head_dim}), the layer has {out_features}")
        sections, offset = [], 0
        for n in parts:
            sections.append((offset, n, head_dim))
            offset += n * head_dim
        return sections
    if layout == "up_half":
        if out_features % 2:
            raise ModelError(f"{where}: SPF layout 'up_half' needs an even number of output rows, got {out_features}")
        return [(out_features // 2, out_features // 2, 1)]
    if layout == "rows":
        return [(0, out_features, 1)]
    raise ModelError(f"{where}: unknown SPF layout {layout!r} (expected one of {', '.join(LAYOUT_KINDS)})")


def row_norms(module: nn.Module) -> torch.Tensor:
    """The L1 norm of each output row of the pretrained weight, float64 on the CPU."""
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    weight = base.weight.detach().to("cpu", torch.float64).abs()
    return weight.sum(0) if isinstance(base, Conv1D) else weight.sum(1)


def select_rows(module: nn.Module, layout: str, config, ratio: float, where: str = "layer") -> torch.Tensor:
    """The output rows SPF trains in ``module``: in each section, the top ``ratio`` of its groups
    (heads, or single rows) by the L1 norm of their pretrained rows; ascending long indices."""
    norms = row_norms(module)
    chosen = []
    for offset, count, size in _sections(layout, config, len(norms), where):
        group = norms[offset:offset + count * size].view(count, size).sum(1)
        top = torch.sort(group, descending=True, stable=True).indices[:kept(ratio, count)].sort().values
        chosen.append(offset + (top[:, None] * size + torch.arange(size)[None]).flatten())
    return torch.cat(chosen).sort().values


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def target_modules(stage: Stage, targets, layers=None) -> Iterator[tuple[str, str, nn.Module]]:
    """(local module name, layout, module) of every SPF target in the blocks of ``layers`` (global
    indices; None: every block). A peft LoRA layer is matched under its own name, not ``base_layer``."""
    layouts = dict(stage.spec.spf_layouts)
    for j, i in enumerate(stage.layer_ids()):
        if layers is not None and i not in layers:
            continue
        for name, module in stage.blocks[j].named_modules():
            target = next((t for t in targets if _matches(name, t)), None)
            if target is not None:
                yield f"blocks.{j}.{name}", layouts.get(name.rsplit(".", 1)[-1], "rows"), module


def apply_spf(stage: Stage, settings: SpfSettings, layers=None) -> Stage:
    """Add SPF to the stage's target layers in the blocks of ``layers`` (global indices; None: all).
    Makes the new ``spf_delta`` parameters trainable and touches no other parameter's flag."""
    def bad(key, msg):
        raise ConfigError(f"{key}: {msg}")

    settings.validate(bad)
    if not any(layers is None or i in layers for i in stage.layer_ids()):
        return stage  # e.g. a stage with no blocks: nothing to adapt
    targets = list(settings.targets or stage.spec.spf_targets)
    if not targets:
        raise ConfigError(f"adapters.spf.targets: the {stage.config.model_type} architecture has no default "
                          "SPF targets: name them")
    found = list(target_modules(stage, targets, layers))
    if not found:
        raise ConfigError(f"adapters.spf.targets {targets}: no such layer in the model")
    for name, layout, module in found:
        rows = select_rows(module, layout, stage.config, settings.ratio, stage.full_name(name))
        attach(module, rows)
    for name, param in stage.named_parameters():
        if name.endswith(DELTA):
            param.requires_grad_(True)
    return stage


def spf_indices(stage: nn.Module) -> dict[str, torch.Tensor]:
    """The ``spf_rows`` buffers of a stage, by local name (saved next to the deltas)."""
    return {n: b.detach().cpu().clone() for n, b in stage.named_buffers() if n.endswith(ROWS)}


def check_rows(stage: nn.Module, name: str, rows: torch.Tensor) -> None:
    """Refuse saved rows that are not the rows this stage trains under ``name``."""
    buffers = dict(stage.named_buffers())
    if name not in buffers:
        raise ModelError(f"{name}: saved SPF rows for a layer without SPF in this model")
    mine = buffers[name].cpu()
    rows = torch.as_tensor(rows).cpu()
    if rows.shape != mine.shape or not torch.equal(rows.long(), mine):
        raise ModelError(f"{name}: the saved SPF rows differ from the rows selected from these base weights")


__all__ = ["SpfSettings", "apply_spf", "attach", "detach", "merge_spf", "select_rows", "row_norms", "kept",
           "spf_indices", "check_rows", "effective_delta", "target_modules", "DELTA", "ROWS"]
