"""Qwen3, Phi-3, Gemma 2, Gemma 3 (text) and OLMo 2 split exactly, and unsplittable models fail fast.

Each family's split (one real split training step, lr 0) gives the loss, logits and every
trainable gradient of the unsplit Hugging Face model with the same adapters, at 1e-5 in fp32,
on sequences longer than the family's sliding window. The reference is the HF model loaded with
HF's own default attention (eager for Gemma 2, whose attention soft-caps its scores; sdpa for
the others), so the attention implementation the split picks is checked too. The families are
kept out of ``conftest.ARCHS`` so that they do not multiply every parametrized test.
"""

import time

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from transformers import AutoModelForCausalLM

from silotune.adapters import AdapterSettings, LoraSettings, PrefixSettings, SpfSettings, apply_method, spf
from silotune.errors import ModelError
from silotune.federation import SplitSettings, build_parties
from silotune.models.arch import arch_for, sliding_layers
from silotune.models.loading import resolve_model
from silotune.models.partition import load_stage
from silotune.models.tiny import save_tiny_model
from silotune.train.optim import OptimSettings

from .conftest import FAMILIES
from .test_exactness import compare_to_reference, lora_split_matches
from .test_exactness import test_kv_cache_runs_equal_the_full_run as kv_cache_run_equals_full_run
from .test_exactness import test_prefix_split_equals_unsplit as prefix_split_equals_unsplit
from .test_spf import expected_rows, hf_targets
from .test_spf import split_step as spf_split_step

SPLITS = [(1, 1), (2, 2)]
SLIDING = ["qwen3-sliding", "phi3", "gemma2", "gemma3_text"]
FULL_ONLY = ["qwen3", "olmo2"]


def hf_reference(model_dir):
    """The unsplit HF model with HF's default attention implementation, frozen."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def test_tiny_models_run_past_their_windows(family_dirs):
    for name in SLIDING:
        config = hf_reference(family_dirs[name]).config
        layers = sliding_layers(config)
        assert layers and config.sliding_window < 9, name  # the test batch has 9 tokens
        if name != "phi3":  # Phi-3 slides in every block; the others mix sliding and full blocks
            assert len(layers) < config.num_hidden_layers, name
    for name in FULL_ONLY:
        assert not sliding_layers(hf_reference(family_dirs[name]).config)


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("a,c", SPLITS)
def test_lora_split_equals_unsplit(family_dirs, name, a, c):
    lora_split_matches(family_dirs[name], a, c, hf_reference)  # the family's own attention implementation


@pytest.mark.parametrize("name", FULL_ONLY)
@pytest.mark.parametrize("a,c", SPLITS)
def test_prefix_split_equals_unsplit(family_dirs, name, a, c):
    prefix_split_equals_unsplit(family_dirs, name, a, c)


@pytest.mark.parametrize("name", SLIDING)
def test_prefix_refused_under_sliding_window(family_dirs, name):
    adapters = AdapterSettings(method="prefix", prefix=PrefixSettings(length=3))
    with pytest.raises(ModelError, match="sliding-window attention.*use lora"):
        build_parties(family_dirs[name], SplitSettings(1, 1), adapters, OptimSettings(), n_clients=1)
    with pytest.raises(ModelError, match="sliding-window"):  # whichever blocks the stage holds
        apply_method(load_stage(family_dirs[name], "head", 0, 1), adapters, 0)


@pytest.mark.parametrize("name,method", [("phi3", "spf"), ("gemma2", "spf"), ("gemma3_text", "lora+spf")])
def test_spf_split_equals_unsplit(family_dirs, name, method):
    adapters = AdapterSettings(method=method, lora=LoraSettings(r=4, alpha=8), spf=SpfSettings(ratio=0.5))
    b, loss, logits, split_params, split_rows = spf_split_step(family_dirs[name], 2, 1, adapters)
    ref = hf_reference(family_dirs[name])
    spec = arch_for(ref.config)
    for target, layout, module in list(hf_targets(ref, spec)):
        rows = expected_rows(module, layout, ref.config, 0.5)
        assert split_rows[f"{target}.spf_rows"].tolist() == rows, target
        spf.attach(module, torch.tensor(rows))
    if method == "lora+spf":
        inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=list(spec.lora_targets)), ref)
    ref_params = {n: p.requires_grad_(True) for n, p in ref.named_parameters()
                  if "lora_" in n or n.endswith(".spf_delta")}
    assert any(n.endswith(".spf_delta") for n in split_params)
    compare_to_reference(b, loss, logits, split_params, ref, ref_params)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_kv_cache_runs_equal_the_full_run(family_dirs, name):
    kv_cache_run_equals_full_run(family_dirs, name, "lora")


def test_unsupported_settings_are_refused_with_why(tmp_path):
    out = save_tiny_model(tmp_path / "bidi", "gemma3_text", use_bidirectional_attention=True)
    with pytest.raises(ModelError, match="use_bidirectional_attention.*cannot be split: .*bidirectional"):
        resolve_model(out)


# ---- unsupported architectures fail before any slow work ----
def write_gguf(path, arch):
    """A tiny GGUF file with ``general.architecture`` = arch and one small tensor."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("arch,model_type", [("mamba", "mamba"), ("qwen3moe", "qwen3_moe"), ("gemma4", "gemma4_text")])
def test_unsupported_gguf_is_refused_from_its_metadata(tmp_path, monkeypatch, arch, model_type):
    cache = tmp_path / "cache"
    monkeypatch.setenv("SILOTUNE_CACHE", str(cache))
    path = write_gguf(tmp_path / f"{arch}.gguf", arch)
    start = time.perf_counter()
    with pytest.raises(ModelError, match=f"unknown architecture '{model_type}': SiloTune can split .*gemma3_text"):
        resolve_model(path)
    assert time.perf_counter() - start < 2.0
    assert not (cache / "models").exists() or not any((cache / "models").iterdir())  # nothing exported


@pytest.mark.parametrize("model_type,hint", [("mamba9", ""), ("gemma3", "; a Gemma 3 vision-language checkpoint")])
def test_unsupported_model_directory_is_refused_before_loading(tmp_path, model_type, hint):
    """Read from config.json before transformers parses it: 'mamba9' is no type transformers knows either."""
    (tmp_path / "config.json").write_text(f'{{"model_type": "{model_type}", "hidden_size": 8}}')
    with pytest.raises(ModelError, match=f"^{tmp_path}: unknown architecture '{model_type}': SiloTune can split "
                                         rf".*phi3.*register\){hint}"):
        resolve_model(tmp_path)
