"""The split model equals the unsplit Hugging Face model: logits, loss and every gradient.

The reference is the real HF model with the same adapters (peft LoRA injected into the
whole model, or prefixes fed through HF's own DynamicCache), not a number from a run.
"""

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from transformers import AutoModelForCausalLM, DynamicCache

from silotune.adapters import AdapterSettings, LoraSettings, PrefixSettings
from silotune.federation import SplitSettings, build_parties
from silotune.models.arch import arch_for
from silotune.train.loss import lm_loss
from silotune.train.optim import OptimSettings

from .conftest import ARCHS

TOL = 1e-5
SPLITS = [(1, 1), (2, 1), (1, 3)]


def batch(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([9, 6, 4])
    ids = torch.randint(3, vocab, (3, 9), generator=g)
    labels = ids.clone()
    labels[:, :2] = -100
    for i, n in enumerate(lengths):
        ids[i, n:] = 0
        labels[i, n:] = -100
    return {"input_ids": ids, "labels": labels, "lengths": lengths}


def split_step(model_dir, a, c, adapters):
    """One real split training step (lr 0: weights unchanged, gradients kept) + split logits."""
    server, (client,) = build_parties(model_dir, SplitSettings(a, c), adapters,
                                      OptimSettings(lr=0.0, grad_clip=None), n_clients=1, seed=3)
    for stage in (client.head, server.trunk, client.tail):  # random B so LoRA is not a no-op
        for name, p in stage.named_parameters():
            if "lora_B" in name:
                g = torch.Generator().manual_seed(hash(stage.full_name(name)) % 2**31)
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    b = batch(client.head.config.vocab_size)
    loss = client.train_step(b)
    logits = client.logits(b)
    named = {}
    for stage in (client.head, server.trunk, client.tail):
        for name, p in stage.named_parameters():
            if p.requires_grad:
                named[stage.full_name(name)] = p
    return b, loss, logits, named


def reference_model(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.float32)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def compare(b, loss, logits, split_params, ref_logits, ref_params):
    lengths = b["lengths"]
    ref_loss = lm_loss(ref_logits, b["labels"])
    ref_loss.backward()
    assert abs(loss - ref_loss.item()) < TOL
    for i, n in enumerate(lengths):
        assert torch.allclose(logits[i, :n], ref_logits[i, :n].detach(), atol=TOL, rtol=0)
    assert set(split_params) == set(ref_params) and split_params
    for name, p in split_params.items():
        assert torch.allclose(p.grad, ref_params[name].grad, atol=TOL, rtol=0), name


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("a,c", SPLITS)
def test_lora_split_equals_unsplit(tiny_dirs, arch, a, c):
    lora_split_matches(tiny_dirs[arch], a, c, reference_model)


def lora_split_matches(model_dir, a, c, reference):
    """A LoRA split step equals ``reference(model_dir)`` (the unsplit HF model) carrying the same LoRA weights."""
    adapters = AdapterSettings(method="lora", lora=LoraSettings(r=4, alpha=8))
    b, loss, logits, split_params = split_step(model_dir, a, c, adapters)
    ref = reference(model_dir)
    spec = arch_for(ref.config)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=list(spec.lora_targets),
                                       fan_in_fan_out=spec.fan_in_fan_out), ref)
    ref_params = {n: p for n, p in ref.named_parameters() if "lora_" in n}
    compare_to_reference(b, loss, logits, split_params, ref, ref_params)


def compare_to_reference(b, loss, logits, split_params, ref, ref_params):
    """Give the unsplit ``ref`` the split run's trainable values, run it on the same batch, and ``compare``."""
    with torch.no_grad():
        for name, p in ref_params.items():
            p.copy_(split_params[name])
    mask = (torch.arange(b["input_ids"].shape[1])[None] < b["lengths"][:, None]).long()
    ref_logits = ref(input_ids=b["input_ids"], attention_mask=mask).logits
    compare(b, loss, logits, split_params, ref_logits, ref_params)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("a,c", SPLITS[:2])
def test_prefix_split_equals_unsplit(tiny_dirs, arch, a, c):
    P = 3
    adapters = AdapterSettings(method="prefix", prefix=PrefixSettings(length=P, init_std=0.5))
    b, loss, logits, split_params = split_step(tiny_dirs[arch], a, c, adapters)
    ref = reference_model(tiny_dirs[arch])
    n_layers = ref.config.num_hidden_layers
    ref_params = {f"prefix.layers.{i}": split_params[f"prefix.layers.{i}"].detach().clone().requires_grad_(True)
                  for i in range(n_layers)}
    cache = DynamicCache()
    for i in range(n_layers):
        kv = ref_params[f"prefix.layers.{i}"].unsqueeze(1).expand(-1, 3, -1, -1, -1)
        cache.update(kv[0], kv[1], i)
    mask = torch.cat([torch.ones(3, P, dtype=torch.long),
                      (torch.arange(9)[None] < b["lengths"][:, None]).long()], dim=1)
    ref_logits = ref(input_ids=b["input_ids"], attention_mask=mask, past_key_values=cache,
                     position_ids=torch.arange(9)[None].expand(3, -1)).logits
    compare(b, loss, logits, split_params, ref_logits, ref_params)


def test_frozen_trunk_trains_only_client_side(tiny_dirs):
    adapters = AdapterSettings(method="lora", parts=["head", "tail"])
    _, _, _, params = split_step(tiny_dirs["llama"], 1, 1, adapters)
    n = 5
    assert params and all(".layers.0." in k or f".layers.{n - 1}." in k for k in params)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["lora", "prefix"])
def test_kv_cache_runs_equal_the_full_run(tiny_dirs, arch, method):
    """Tokens run in pieces through a KVCache (and tried after a shared prefix with ``select``)
    give the outputs of one full run: what the search attack and split inference rely on."""
    from silotune.adapters import apply_method
    from silotune.models.partition import KVCache, load_stage

    head = load_stage(tiny_dirs[arch], "head", 2, 1)
    apply_method(head, AdapterSettings(method=method, prefix=PrefixSettings(length=3)), 0)
    ids = torch.randint(3, 128, (3, 9), generator=torch.Generator().manual_seed(0))
    full = head(ids, torch.full((3,), 9))
    cache = KVCache()
    first = head(ids[:, :5], torch.full((3,), 5), cache)
    rest = head(ids[:, 5:], torch.full((3,), 4), cache)
    assert cache.length == 9
    assert torch.allclose(torch.cat([first, rest], 1), full, atol=TOL)
    shared = KVCache()
    head(ids[:, :5], torch.full((3,), 5), shared)
    rows = torch.tensor([1, 1, 2])
    tried = head(ids[rows, 5:6], torch.ones(3, dtype=torch.long), shared.select(rows))
    assert torch.allclose(tried[:, 0], full[rows, 5], atol=TOL)
    assert shared.length == 5  # trying candidates leaves the shared prefix as it was
