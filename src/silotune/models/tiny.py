"""Tiny randomly initialised models of every supported architecture, for fast tests and demos."""

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
