"""Tiny randomly initialised models of every supported architecture, for fast tests and demos.

Each has hidden size 32 and 5 blocks; families with sliding-window attention get a 4-token window.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from ..errors import ModelError

_COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=5, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256)
_TINY = {
    "llama": dict(_COMMON),
    "mistral": dict(_COMMON, sliding_window=None),
    "qwen2": dict(_COMMON),
    "gpt2": dict(n_embd=32, n_layer=5, n_head=4, n_positions=256, n_inner=64),
    "qwen3": dict(_COMMON, head_dim=8),
    "olmo2": dict(_COMMON, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    # the sliding windows are 4 tokens, so that test sequences (9 tokens) run past them
    "phi3": dict(_COMMON, sliding_window=4, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    # Gemma: head_dim is its own setting; larger initial weights and small soft-caps, so that the caps (and the
    # embedding scale, the window, the local/global rope) change a random model's outputs by far more than 1e-5
    "gemma2": dict(_COMMON, head_dim=8, sliding_window=4, query_pre_attn_scalar=8, initializer_range=0.1,
                   attn_logit_softcapping=2.0, final_logit_softcapping=3.0),
    "gemma3_text": dict(_COMMON, head_dim=8, sliding_window=4, query_pre_attn_scalar=8, initializer_range=0.1,
                        final_logit_softcapping=3.0,
                        layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                     "sliding_attention", "full_attention"]),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def tiny_config(model_type: str, vocab_size: int = 128, tie: bool = True, **overrides):
    if model_type not in _TINY:
        raise ModelError(f"no tiny config for {model_type!r} (have {', '.join(_TINY)})")
    kwargs = dict(_TINY[model_type], vocab_size=vocab_size, tie_word_embeddings=tie, **overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def save_tiny_model(out_dir: str | Path, model_type: str = "llama", seed: int = 0,
                    tokenizer_from: str | Path | None = None, **overrides) -> Path:
    """Write a random tiny model; with ``tokenizer_from`` it also gets that model's tokenizer."""
    out_dir = Path(out_dir)
    if tokenizer_from is not None:
        src = Path(tokenizer_from)
        overrides.setdefault("vocab_size", AutoConfig.from_pretrained(src).vocab_size)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides))
    model.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer_from is not None:
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy(src / name, out_dir / name)
    return out_dir
