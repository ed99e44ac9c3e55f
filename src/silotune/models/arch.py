"""Per-architecture descriptions: where each piece of a causal LM lives and what its forward does
outside the decoder blocks, as data.

A description names the submodule paths of the token embedding, the decoder blocks, the final
norm, the LM head and (if any) the rotary embedding or learned position embedding; how the
rotary embedding is called (one for all blocks, or one per attention type: Gemma 3's local and
global rope); the config attribute holding a final-logit soft-cap (Gemma 2 and 3); the attention
implementation the split runs (``sdpa``, or ``eager`` where sdpa refuses what the family's
attention does: Gemma 2's attention logit soft-capping); config settings that cannot be split
exactly, with why; and the Linear layers LoRA targets by default and those SPF sparsely tunes
(with how their output rows group into heads). Which blocks use sliding-window attention comes
from the config itself (``layer_types`` / ``sliding_window``, see ``sliding_window``). The split
code (``partition.py``) reads only these; it never copies a model's forward code.

Everything else a family does (an embedding scale such as Gemma's ``sqrt(hidden_size)``, q/k
norms, soft-capped attention scores, (1 + w) RMSNorms, sandwich norms) lives inside the
embedding module, the attention layers or the blocks in Hugging Face's code, so a stage that
holds those modules does it too.

Adding an architecture whose blocks follow the Hugging Face calling convention takes
one ``register`` call, e.g.::

    register("olmo2", LLAMA)
    register("phi3", replace(LLAMA, lora_targets=("qkv_proj", "o_proj")))
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import ModelError

ATTENTION_TYPES = ("full_attention", "sliding_attention")
"""The per-block attention types (``config.layer_types``) the split rebuilds masks for."""

_BIDIRECTIONAL = ("use_bidirectional_attention",
                  "it uses bidirectional attention (an embedding model, not a causal LM)")


@dataclass(frozen=True)
class ArchSpec:
    """Where the parts of one family of causal LMs live (dotted submodule paths), and what its
    forward does between them."""

    embed: str
    blocks: str
    final_norm: str
    lm_head: str
    rotary: str | None = None
    """Rotary embedding module, called as ``rotary(h, position_ids) -> (cos, sin)``."""
    rotary_by_layer_type: bool = False
    """True where the rotary module is called as ``rotary(h, position_ids, layer_type)`` with each
    block's ``config.layer_types`` entry (Gemma 3: local rope for sliding blocks, global for full)."""
    pos_embed: str | None = None
    """Learned absolute position embedding added to the token embedding (GPT-2)."""
    embed_dropout: str | None = None
    logit_softcap: str | None = None
    """Config attribute of a final-logit soft-cap: where it is set, logits = cap * tanh(logits / cap)
    after the LM head (Gemma 2 and 3 do this in ``ForCausalLM.forward``, so the tail stage must)."""
    attn_implementation: str = "sdpa"
    """The attention implementation the stages run: ``sdpa``, or ``eager`` where the family's attention
    passes something sdpa refuses (Gemma 2's ``attn_logit_softcapping``). Both take our additive mask."""
    refuse_if: tuple[tuple[str, str], ...] = (_BIDIRECTIONAL,)
    """(config attribute, why): a config where the attribute is set (truthy) cannot be split exactly."""
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
"""Llama, Mistral, Qwen2, and also Qwen3 and OLMo 2 (their q/k norms are inside the attention layer)."""

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
"""Phi-3: fused projections (its sliding window, on every block, comes from the config)."""

GEMMA2 = replace(LLAMA, logit_softcap="final_logit_softcapping", attn_implementation="eager")
"""Gemma 2: alternating sliding/full blocks (``layer_types``), scaled embedding module, soft-capped
attention scores (eager: sdpa refuses ``softcap``) and soft-capped final logits."""

GEMMA3 = replace(LLAMA, logit_softcap="final_logit_softcapping", rotary_by_layer_type=True)
"""Gemma 3 text (``Gemma3ForCausalLM``): local rope for sliding blocks and global rope for full ones,
scaled embedding module, q/k norms; soft-capped final logits where the config sets them. Its attention
layer does not pass ``attn_logit_softcapping`` on, so sdpa computes what the unsplit model does."""

_REGISTRY: dict[str, ArchSpec] = {}


def register(model_type: str, spec: ArchSpec) -> None:
    """Make ``model_type`` (a Hugging Face ``config.model_type``) splittable."""
    _REGISTRY[model_type] = spec


for _name in ("llama", "mistral", "qwen2", "qwen3", "olmo2"):
    register(_name, LLAMA)
register("gpt2", GPT2)
register("phi3", PHI3)
register("gemma2", GEMMA2)
register("gemma3_text", GEMMA3)


def supported() -> list[str]:
    return sorted(_REGISTRY)


HINTS = {
    "gemma3": "a Gemma 3 vision-language checkpoint: give its text model (Gemma3ForCausalLM, model type gemma3_text)",
}
"""What to do instead, for model types that are close to a supported one."""


def check_supported(model_type: str | None, where: str = "") -> None:
    """A ModelError naming the supported types unless ``model_type`` is registered (``where``: what to name)."""
    if model_type not in _REGISTRY:
        hint = f"; {HINTS[model_type]}" if model_type in HINTS else ""
        raise ModelError(
            f"{where + ': ' if where else ''}unknown architecture {model_type!r}: SiloTune can split "
            f"{', '.join(supported())} (add one with silotune.models.arch.register){hint}"
        )


def arch_for(config) -> ArchSpec:
    """The description for a loaded config, or a ModelError saying why it cannot be split exactly."""
    model_type = getattr(config, "model_type", None)
    check_supported(model_type)
    spec = _REGISTRY[model_type]
    for attr, why in spec.refuse_if:
        if getattr(config, attr, None):
            raise ModelError(f"{model_type} with {attr}={getattr(config, attr)!r} cannot be split: {why}")
    unknown = sorted(set(getattr(config, "layer_types", None) or ()) - set(ATTENTION_TYPES))
    if unknown:
        raise ModelError(f"{model_type}: attention type {', '.join(unknown)} in config.layer_types cannot be split "
                         f"(SiloTune rebuilds masks for {', '.join(ATTENTION_TYPES)})")
    return spec


def num_layers(config) -> int:
    return int(config.num_hidden_layers)


def attention_geometry(config) -> tuple[int, int]:
    """(number of key/value heads, head dimension) of the attention layers."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return int(kv_heads), int(head_dim)


def layer_type(config, layer: int) -> str:
    """The attention type of block ``layer``: its ``config.layer_types`` entry, else ``full_attention``."""
    layer_types = getattr(config, "layer_types", None)
    return layer_types[layer] if layer_types is not None else "full_attention"


def sliding_window(config, layer: int) -> int | None:
    """The sliding attention window of block ``layer``, or None for full causal attention."""
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    if getattr(config, "layer_types", None) is not None and layer_type(config, layer) != "sliding_attention":
        return None
    return int(window)


def sliding_layers(config) -> list[int]:
    """The blocks with sliding-window attention."""
    return [i for i in range(num_layers(config)) if sliding_window(config, i) is not None]


def check_prefix(config) -> None:
    """P-tuning prefixes need full attention in every block: a ModelError saying why otherwise.

    Under a sliding window, whether a prefix slot stays visible to far-away tokens has no
    counterpart in the unsplit Hugging Face model (its caches put the prefix at the first
    positions of the window, where it slides out of view), so no split could be checked exact."""
    layers = sliding_layers(config)
    if layers:
        raise ModelError(
            f"adapters.method prefix: {config.model_type} has sliding-window attention (window "
            f"{sliding_window(config, layers[0])} in blocks {', '.join(map(str, layers))}); P-tuning prefixes "
            "work only where every block attends to all tokens: use lora, spf or lora+spf")


__all__ = ["ArchSpec", "LLAMA", "GPT2", "PHI3", "GEMMA2", "GEMMA3", "ATTENTION_TYPES", "register", "supported",
           "check_supported", "arch_for", "num_layers", "attention_geometry", "layer_type", "sliding_window",
           "sliding_layers", "check_prefix", "replace"]
