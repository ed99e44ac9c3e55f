"""Per-architecture descriptions: where each piece of a causal LM lives, as data.

A description names the submodule paths of the token embedding, the decoder blocks,
the final norm, the LM head and (if any) the rotary embedding or learned position
embedding, plus the Linear layers LoRA targets by default and those SPF sparsely tunes
(with how their output rows group into heads). The split code
(`partition.py`) reads only these paths; it never copies a model's forward code.

Adding an architecture whose blocks follow the Hugging Face calling convention takes
one ``register`` call, e.g.::

    register("phi3", replace(LLAMA, lora_targets=("qkv_proj", "o_proj")))

(``PHI3`` below is that description with Phi-3's SPF targets too: ``register("phi3", PHI3)``.)
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import ModelError


@dataclass(frozen=True)
class ArchSpec:
    """Where the parts of one family of causal LMs live (dotted submodule paths)."""

    embed: str
    blocks: str
    final_norm: str
    lm_head: str
    rotary: str | None = None
    """Rotary embedding module, called as ``rotary(h, position_ids) -> (cos, sin)``."""
    pos_embed: str | None = None
    """Learned absolute position embedding added to the token embedding (GPT-2)."""
    embed_dropout: str | None = None
    lora_targets: tuple[str, ...] = ()
    """Linear layers that LoRA adapts when the config does not say otherwise."""
    fan_in_fan_out: bool = False
    """True where the Linear layers are GPT-2 style Conv1D (weight stored transposed)."""
    spf_targets: tuple[str, ...] = ()
    """Layers SPF (``adapters.spf``) sparsely tunes by default: the attention Q/K/V projections and
    the FFN up-projection."""
    spf_layouts: tuple[tuple[str, str], ...] = ()
    """How SPF groups a target's output rows, by the layer's last name: ``q`` (query heads), ``kv``
    (key/value heads), ``qkv`` (fused Q, K, V heads, each part ranked on its own), ``up_half``
    (fused gate|up: the rows of the up half) or ``rows`` (each row alone; the default)."""


LLAMA = ArchSpec(
    embed="model.embed_tokens",
    blocks="model.layers",
    final_norm="model.norm",
    lm_head="lm_head",
    rotary="model.rotary_emb",
    lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
    spf_targets=("q_proj", "k_proj", "v_proj", "up_proj"),
    spf_layouts=(("q_proj", "q"), ("k_proj", "kv"), ("v_proj", "kv")),
)

GPT2 = ArchSpec(
    embed="transformer.wte",
    blocks="transformer.h",
    final_norm="transformer.ln_f",
    lm_head="lm_head",
    pos_embed="transformer.wpe",
    embed_dropout="transformer.drop",
    lora_targets=("c_attn", "attn.c_proj"),
    fan_in_fan_out=True,
    spf_targets=("c_attn", "c_fc"),  # Conv1D: weight (in, out); c_attn is Q|K|V fused
    spf_layouts=(("c_attn", "qkv"),),
)

PHI3 = replace(
    LLAMA,
    lora_targets=("qkv_proj", "o_proj"),
    # qkv_proj is Q|K|V fused; gate_up_proj is gate|up fused and only its up half is the up-projection
    spf_targets=("qkv_proj", "gate_up_proj"),
    spf_layouts=(("qkv_proj", "qkv"), ("gate_up_proj", "up_half")),
)
"""Phi-3 (not registered by default: ``register("phi3", PHI3)``)."""

_REGISTRY: dict[str, ArchSpec] = {}


def register(model_type: str, spec: ArchSpec) -> None:
    """Make ``model_type`` (a Hugging Face ``config.model_type``) splittable."""
    _REGISTRY[model_type] = spec


for _name in ("llama", "mistral", "qwen2"):
    register(_name, LLAMA)
register("gpt2", GPT2)


def supported() -> list[str]:
    return sorted(_REGISTRY)


def arch_for(config) -> ArchSpec:
    """The description for a loaded config, or a ModelError naming the supported types."""
    model_type = getattr(config, "model_type", None)
    if model_type not in _REGISTRY:
        raise ModelError(
            f"unknown architecture {model_type!r}: SiloTune can split {', '.join(supported())} "
            "(add one with silotune.models.arch.register)"
        )
    return _REGISTRY[model_type]


def num_layers(config) -> int:
    return int(config.num_hidden_layers)


def attention_geometry(config) -> tuple[int, int]:
    """(number of key/value heads, head dimension) of the attention layers."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return int(kv_heads), int(head_dim)


def sliding_window(config, layer: int) -> int | None:
    """The sliding attention window of block ``layer``, or None for full causal attention."""
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and layer_types[layer] != "sliding_attention":
        return None
    return int(window)


__all__ = ["ArchSpec", "LLAMA", "GPT2", "PHI3", "register", "supported", "arch_for", "num_layers",
           "attention_geometry", "sliding_window", "replace"]
