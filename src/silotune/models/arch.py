"""Per-architecture descriptions: where each piece of a causal LM lives, as data.

A description names the submodule paths of the token embedding, the decoder blocks,
the final norm, the LM head and (if any) the rotary embedding or learned position
embedding, plus the Linear layers LoRA targets by default. The split code
(`partition.py`) reads only these paths; it never copies a model's forward code.

Adding an architecture whose blocks follow the Hugging Face calling convention takes
one ``register`` call, e.g.::

    register("phi3", replace(LLAMA, lora_targets=("qkv_proj", "o_proj")))
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


LLAMA = ArchSpec(
    embed="model.embed_tokens",
    blocks="model.layers",
    final_norm="model.norm",
    lm_head="lm_head",
    rotary="model.rotary_emb",
    lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
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
)

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


__all__ = ["ArchSpec", "LLAMA", "GPT2", "register", "supported", "arch_for", "num_layers",
           "attention_geometry", "sliding_window", "replace"]
