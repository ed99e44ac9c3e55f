"""Cut a causal LM into stages and materialise only the weights a party owns.

A ``Stage`` is a contiguous slice of the model: optionally the token embedding, the
blocks ``[start, stop)``, optionally the final norm and LM head. The client head is
``Stage(embed, blocks[:a])``, the server trunk ``Stage(blocks[a:N-c])``, the client tail
``Stage(blocks[N-c:], norm, lm_head)``; the centralized baseline is the whole model as
one stage. ``load_stage`` builds the model skeleton on the meta device, keeps the
submodules of one stage and reads only their tensors from the safetensors files, so a
server never holds the embedding or LM head and a client never holds the trunk.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from ..errors import ModelError
from . import masks
from .arch import ArchSpec, arch_for, layer_type, num_layers, sliding_window
from .kvcache import KVCache

PARTS = ("head", "trunk", "tail", "full")


class _PrefixThenCache:
    """P-tuning prefix slots in front of the cached and new tokens."""

    def __init__(self, prefix: PrefixKV, cache: KVCache):
        self.prefix, self.cache = prefix, cache

    def update(self, keys, values, layer_idx, *args, **kwargs):
        keys, values = self.cache.update(keys, values, layer_idx)
        return self.prefix.update(keys, values, layer_idx)


class PrefixKV:
    """Per-layer prefix key/values, offered to HF attention layers through the cache API.

    An attention layer calls ``update(k, v, layer_idx)`` on its ``past_key_values``; we
    answer with the prefix prepended (P-tuning v2). Nothing is stored across calls.
    """

    def __init__(self, prefixes: dict[int, tuple[torch.Tensor, torch.Tensor]]):
        self.prefixes = prefixes

    def update(self, keys, values, layer_idx, *args, **kwargs):
        if layer_idx not in self.prefixes:
            return keys, values
        pk, pv = self.prefixes[layer_idx]
        batch = keys.shape[0]
        pk = pk.unsqueeze(0).expand(batch, -1, -1, -1).to(keys.dtype)
        pv = pv.unsqueeze(0).expand(batch, -1, -1, -1).to(values.dtype)
        return torch.cat([pk, keys], dim=2), torch.cat([pv, values], dim=2)


def _get(root: nn.Module, path: str | None) -> nn.Module | None:
    return root.get_submodule(path) if path else None


class Stage(nn.Module):
    """A contiguous slice of a causal LM, run with masks rebuilt from lengths."""

    def __init__(self, config, spec: ArchSpec, model: nn.Module, start: int, stop: int,
                 with_embed: bool, with_head: bool):
        super().__init__()
        self.config, self.spec = config, spec
        self.start, self.stop = start, stop
        self.embed = _get(model, spec.embed) if with_embed else None
        self.pos_embed = _get(model, spec.pos_embed) if with_embed else None
        self.embed_dropout = _get(model, spec.embed_dropout) if with_embed else None
        self.blocks = nn.ModuleList(list(_get(model, spec.blocks))[start:stop])
        self.norm = _get(model, spec.final_norm) if with_head else None
        self.lm_head = _get(model, spec.lm_head) if with_head else None
        self.rotary = _get(model, spec.rotary) if spec.rotary and stop > start else None
        self.prefix = None  # set by adapters.prefix for P-tuning v2

    # ---- naming: local parameter names <-> names in the full model's state dict ----
    def full_name(self, local: str) -> str:
        head, _, rest = local.partition(".")
        if head == "blocks":
            idx, _, rest = rest.partition(".")
            return f"{self.spec.blocks}.{self.start + int(idx)}.{rest}"
        paths = {"embed": self.spec.embed, "pos_embed": self.spec.pos_embed,
                 "norm": self.spec.final_norm, "lm_head": self.spec.lm_head,
                 "rotary": self.spec.rotary}
        if head in paths and paths[head]:
            return f"{paths[head]}.{rest}"
        return local

    def layer_ids(self) -> range:
        return range(self.start, self.stop)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor, cache: KVCache | None = None,
                project: bool = True) -> torch.Tensor:
        """hidden (B, T, H) -> hidden or logits. A stage that owns the embedding takes token ids
        (B, T), or input embeddings (B, T, H) in their place (an attacker optimising inputs).
        With a ``cache`` the tokens continue the cached ones and are appended to it. With
        ``project=False`` a stage with the LM head stops at the final norm's output; otherwise it
        soft-caps the logits where the family does (``ArchSpec.logit_softcap``: Gemma 2 and 3)."""
        seq_len = x.shape[1]
        pos = masks.positions(lengths, seq_len) if cache is None else cache.positions(lengths, seq_len)
        h = x
        if self.embed is not None:
            h = x if x.is_floating_point() else self.embed(x)
            if self.pos_embed is not None:
                h = h + self.pos_embed(pos)
            if self.embed_dropout is not None:
                h = self.embed_dropout(h)
        if len(self.blocks):
            h = self._run_blocks(h, lengths, pos, cache)
        if cache is not None:
            cache.advance(lengths, seq_len)
        if self.lm_head is not None:
            h = self.norm(h)
            if project:
                h = self._softcap(self.lm_head(h))
        return h

    def _softcap(self, logits: torch.Tensor) -> torch.Tensor:
        """cap * tanh(logits / cap) where the family soft-caps its final logits and the config sets a cap."""
        cap = getattr(self.config, self.spec.logit_softcap, None) if self.spec.logit_softcap else None
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def _rotary_for(self, h, pos, layer: int, memo: dict):
        """(cos, sin) for block ``layer``: one rotary for all blocks, or one per attention type (Gemma 3)."""
        kind = layer_type(self.config, layer) if self.spec.rotary_by_layer_type else None
        if kind not in memo:
            memo[kind] = self.rotary(h, pos) if kind is None else self.rotary(h, pos, kind)
        return memo[kind]

    def _run_blocks(self, h, lengths, pos, kv_cache: KVCache | None = None):
        cache = self.prefix.kv(h.dtype) if self.prefix is not None else None
        if kv_cache is not None:
            cache = kv_cache if cache is None else _PrefixThenCache(cache, kv_cache)
        rotary_memo: dict[str | None, tuple[torch.Tensor, torch.Tensor]] = {}
        mask_cache: dict[tuple, torch.Tensor] = {}
        for i, block in zip(self.layer_ids(), self.blocks):
            kwargs = {}
            if self.rotary is not None:
                kwargs = {"position_ids": pos, "position_embeddings": self._rotary_for(h, pos, i, rotary_memo)}
            key = (sliding_window(self.config, i), self.prefix.length_at(i) if self.prefix is not None else 0)
            if key not in mask_cache:
                mask_cache[key] = masks.additive_mask(lengths, h.shape[1], h.dtype, key[1], key[0]) \
                    if kv_cache is None else kv_cache.mask(lengths, h.shape[1], h.dtype, key[1], key[0])
            out = block(h, attention_mask=mask_cache[key], past_key_values=cache, **kwargs)
            h = out[0] if isinstance(out, tuple) else out
        return h


def part_range(config, part: str, a: int, c: int) -> tuple[int, int, bool, bool]:
    """(start, stop, with_embed, with_head) for ``part`` with a head and c tail blocks."""
    n = num_layers(config)
    if part not in PARTS:
        raise ModelError(f"unknown part {part!r}: expected one of {', '.join(PARTS)}")
    if part != "full":
        if a < 0 or c < 1:  # a = 0 (embedding-only head) is the two-part split the audit measures
            raise ModelError(f"client blocks: a must be at least 0 and c at least 1 (got a={a}, c={c})")
        if a + c >= n:
            raise ModelError(
                f"a + c = {a + c} leaves no trunk: the model has {n} blocks, so a + c must be at most {n - 1}")
    return {"head": (0, a, True, False), "trunk": (a, n - c, False, False),
            "tail": (n - c, n, False, True), "full": (0, n, True, True)}[part]


def load_config(model_dir: str | Path):
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ModelError(f"{model_dir}: not a model directory (no config.json)")
    try:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except (ValueError, KeyError, OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{model_dir}/config.json: cannot read model config ({exc})") from None
    try:
        spec = arch_for(config)
    except ModelError as exc:
        raise ModelError(f"{model_dir}: {exc}") from None
    config._attn_implementation = spec.attn_implementation  # sdpa, or eager (Gemma 2's soft-capped attention)
    return config


def _weight_files(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{model_dir}: no *.safetensors weights (export the model first)")
    return files


def build_stage(config, part: str, a: int = 1, c: int = 1) -> Stage:
    """The stage skeleton: its parameters on the meta device (no memory for weights), its buffers real, as
    the model's own ``__init__`` computed them (accelerate's ``init_empty_weights(include_buffers=False)``):
    non-persistent buffers (rotary frequencies, an embedding scale, ...) are not in the weight files, so
    they must never be left uninitialised."""
    from accelerate import init_empty_weights

    spec = arch_for(config)
    start, stop, with_embed, with_head = part_range(config, part, a, c)
    with init_empty_weights(include_buffers=False):
        skeleton = AutoModelForCausalLM.from_config(config)
    return Stage(config, spec, skeleton, start, stop, with_embed, with_head)


def load_stage(model_dir: str | Path, part: str, a: int = 1, c: int = 1,
               dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Stage:
    """Materialise one stage with only its own weights read from disk, then move it to ``device``
    (None: the CPU) and ``dtype``. The rotary inverse frequencies stay float32, as in HF models."""
    model_dir = Path(model_dir)
    config = load_config(model_dir)
    stage = build_stage(config, part, a, c)  # parameters on meta: each is replaced by the tensor read below
    wanted = {stage.full_name(k): k for k in stage.state_dict()}
    tied_head = getattr(config, "tie_word_embeddings", False) and stage.lm_head is not None
    state: dict[str, torch.Tensor] = {}
    for file in _weight_files(model_dir):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if key in wanted:
                    state[wanted[key]] = f.get_tensor(key)
                if tied_head and key == f"{stage.spec.embed}.weight" and stage.embed is None:
                    state["lm_head.weight"] = f.get_tensor(key)
    if tied_head and stage.embed is not None:
        state.setdefault("lm_head.weight", state.get("embed.weight"))
    missing = [k for k, v in stage.state_dict().items() if k not in state and v.is_meta]
    if missing:
        raise ModelError(f"{model_dir}: weights missing for {part}: {', '.join(missing[:5])}")
    stage.load_state_dict(state, strict=False, assign=True)  # take the tensors read, no second copy
    if tied_head and stage.embed is not None:  # one parameter, as in the unsplit model
        stage.lm_head.weight = stage.embed.weight
    stage.to(device=device or "cpu", dtype=dtype)
    if stage.rotary is not None:  # non-persistent buffers: rebuild them for real, in float32, on the device
        stage.rotary = type(stage.rotary)(config=config).to(device or "cpu")
    for p in stage.parameters():
        p.requires_grad_(False)
    return stage.eval()  # base-model dropout off: every party computes deterministically


def stage_from_model(model: nn.Module, part: str, a: int = 1, c: int = 1) -> Stage:
    """A stage sharing the weights of an already loaded full model (tests, centralized runs)."""
    config = model.config
    start, stop, with_embed, with_head = part_range(config, part, a, c)
    return Stage(config, arch_for(config), model, start, stop, with_embed, with_head).eval()
