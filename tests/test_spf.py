"""SPF: a sparse set of base-weight rows trained alone or next to LoRA (adapters/spf.py).

Expected rows are recomputed here from the pretrained weights (per-head and per-row L1 norms),
and the unsplit reference is the real HF model with SPF attached on those rows (and peft LoRA
injected on top for ``lora+spf``), as test_exactness does for LoRA.
"""

import math

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from safetensors import safe_open
from safetensors.torch import load as st_load
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from silotune.adapters import (
    AdapterSettings,
    LoraSettings,
    SpfSettings,
    apply_method,
    load_trainable_state,
    merge_spf,
    spf,
    trainable_state,
)
from silotune.adapters.lora import apply_lora, name_seed
from silotune.config import load_config
from silotune.errors import ConfigError, ModelError
from silotune.federation import SplitSettings, build_parties
from silotune.models.arch import PHI3, arch_for, register
from silotune.models.partition import load_stage
from silotune.report import adapters_blob
from silotune.train.loss import lm_loss
from silotune.train.optim import OptimSettings, Stepper, trainable

from .test_exactness import batch, compare_to_reference, reference_model

TOL = 1e-5
METHODS = ["spf", "lora+spf"]


@pytest.fixture(scope="module")
def phi3_dir(tmp_path_factory):
    """A tiny Phi-3 (fused qkv_proj with grouped K/V heads, fused gate_up_proj), registered with PHI3."""
    register("phi3", PHI3)
    cfg = AutoConfig.for_model("phi3", hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                               max_position_embeddings=64, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(5)
    out = tmp_path_factory.mktemp("phi3") / "m"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    return out


@pytest.fixture
def dirs(tiny_dirs, phi3_dir):
    register("phi3", PHI3)  # another test may have registered phi3 with other targets
    return {**tiny_dirs, "phi3": phi3_dir}


# ---- the expected selection, computed independently of adapters/spf.py ----
def geometry(cfg):
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    return heads, kv, cfg.hidden_size // heads


def sections(layout, cfg, out):
    """(offset, groups, rows per group) of each independently ranked part of the output rows."""
    heads, kv, hd = geometry(cfg)
    if layout == "q":
        return [(0, heads, hd)]
    if layout == "kv":
        return [(0, kv, hd)]
    if layout == "qkv":
        return [(0, heads, hd), (heads * hd, kv, hd), ((heads + kv) * hd, kv, hd)]
    if layout == "up_half":
        return [(out // 2, out // 2, 1)]
    return [(0, out, 1)]


def expected_rows(module, layout, cfg, ratio):
    w = module.weight.detach().double()
    w = w.t() if isinstance(module, Conv1D) else w  # (out, in)
    rows = []
    for offset, n, size in sections(layout, cfg, w.shape[0]):
        norms = [float(w[offset + g * size: offset + (g + 1) * size].abs().sum()) for g in range(n)]
        keep = max(1, math.ceil(ratio * n - 1e-9))
        for g in sorted(range(n), key=lambda g: -norms[g])[:keep]:
            rows += range(offset + g * size, offset + (g + 1) * size)
    return sorted(rows)


def hf_targets(model, spec, targets=None):
    """(name, layout, module) of the SPF targets of an HF model (or a stage), by last module name."""
    layouts = dict(spec.spf_layouts)
    targets = targets or spec.spf_targets
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in targets:
            yield name, layouts.get(leaf, "rows"), module


def spf_modules(stage):
    return {n: m for n, m in stage.named_modules() if "spf_delta" in m._parameters}


def randomise(stage, scale=0.1):
    """Random deltas (and LoRA B) so that every adapter changes the output."""
    for name, p in stage.named_parameters():
        if "spf_delta" in name or "lora_B" in name:
            g = torch.Generator().manual_seed(name_seed(0, stage.full_name(name)) % 2**31)
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def effective_weight(module):
    """The (out, in) weight a hooked Linear / Conv1D applies, read off its output on the identity."""
    n_in = module.weight.shape[0] if isinstance(module, Conv1D) else module.in_features
    with torch.no_grad():
        out = module(torch.eye(n_in))
        if module.bias is not None:
            out = out - module.bias
    return out.t()


# ---- (1) selection ----
@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2", "phi3"])
@pytest.mark.parametrize("ratio", [0.5, 0.3])
def test_selected_rows_are_the_top_ratio_by_l1_norm(dirs, arch, ratio):
    stage = load_stage(dirs[arch], "full")
    spec = arch_for(stage.config)
    apply_method(stage, AdapterSettings(method="spf", spf=SpfSettings(ratio=ratio)), 0)
    found = list(hf_targets(stage, spec))
    assert len(found) == len(spec.spf_targets) * stage.config.num_hidden_layers
    expected_count = 0
    for name, layout, module in found:
        want = expected_rows(module, layout, stage.config, ratio)
        assert module.spf_rows.tolist() == want, name
        n_in = module.weight.shape[0] if isinstance(module, Conv1D) else module.in_features
        assert module.spf_delta.shape == (len(want), n_in) and not module.spf_delta.any()
        expected_count += len(want) * n_in
    trained = {n: p for n, p in stage.named_parameters() if p.requires_grad}
    assert trained and all(n.endswith(".spf_delta") for n in trained)
    assert sum(p.numel() for p in trained.values()) == expected_count
    if arch == "llama" and ratio == 0.5:  # 4 query heads of 8 rows, 2 K/V heads, 64 up rows; 32 inputs
        assert expected_count == 5 * (2 * 8 + 8 + 8 + 32) * 32
    if arch == "phi3":  # only the up half of gate_up_proj is ranked and trained
        up = [m for n, _, m in found if n.endswith("gate_up_proj")]
        assert all(int(m.spf_rows.min()) >= 64 for m in up)


def test_custom_targets_layers_and_bad_settings(dirs):
    stage = load_stage(dirs["llama"], "full")
    apply_method(stage, AdapterSettings(method="spf", spf=SpfSettings(ratio=0.25, targets=["q_proj", "down_proj"])),
                 0, layers={1, 3})
    mods = spf_modules(stage)
    assert sorted(mods) == [f"blocks.{i}.{p}" for i in (1, 3) for p in ("mlp.down_proj", "self_attn.q_proj")]
    for name, module in mods.items():  # q_proj: 1 of 4 heads; down_proj: each row alone, 8 of 32
        layout = "q" if name.endswith("q_proj") else "rows"
        assert module.spf_rows.tolist() == expected_rows(module, layout, stage.config, 0.25)
    with pytest.raises(ConfigError, match="no such layer"):
        apply_method(load_stage(dirs["llama"], "full"), AdapterSettings(method="spf", spf=SpfSettings(targets=["x"])), 0)
    with pytest.raises(ConfigError, match="ratio"):
        apply_method(load_stage(dirs["llama"], "full"), AdapterSettings(method="spf", spf=SpfSettings(ratio=0)), 0)


def test_config_keys():
    cfg = load_config(None, ["adapters.method=lora+spf", "adapters.spf.ratio=0.25", "adapters.spf.targets=[q_proj]"])
    assert cfg.adapters.method == "lora+spf"
    assert cfg.adapters.spf == SpfSettings(ratio=0.25, targets=["q_proj"])
    assert load_config(None, ["adapters.method=spf", "adapters.spf.ratio=1"]).adapters.spf.ratio == 1.0
    with pytest.raises(ConfigError, match="adapters.spf.ratio"):
        load_config(None, ["adapters.method=spf", "adapters.spf.ratio=1.5"])
    with pytest.raises(ConfigError, match="adapters.method"):
        load_config(None, ["adapters.method=sparse"])


def test_lora_and_spf_compose_in_either_order(dirs):
    settings = AdapterSettings(method="lora+spf", lora=LoraSettings(r=2))
    a = apply_method(load_stage(dirs["llama"], "full"), settings, 0)
    b = load_stage(dirs["llama"], "full")
    apply_lora(b, settings.lora, 0)  # LoRA first: SPF then goes on each LoRA layer's base_layer
    spf.apply_spf(b, settings.spf)
    names = {n for n, p in a.named_parameters() if p.requires_grad}
    assert names == {n for n, p in b.named_parameters() if p.requires_grad}
    assert any(n.endswith("q_proj.base_layer.spf_delta") for n in names)
    assert any("lora_A" in n for n in names) and any("lora_B" in n for n in names)
    assert all("lora_" in n or n.endswith(".spf_delta") for n in names)
    # peft wrapped the hooked Linear: the q_proj is a LoRA layer whose base layer carries the delta
    q = a.blocks[0].self_attn.q_proj
    assert hasattr(q, "lora_A") and isinstance(q.base_layer, torch.nn.Linear) and "spf_delta" in q.base_layer._parameters


# ---- (2) split equals unsplit ----
def split_step(model_dir, a, c, adapters):
    """One split step at lr 0 (gradients kept), with random deltas and LoRA B, + split logits."""
    server, (client,) = build_parties(model_dir, SplitSettings(a, c), adapters,
                                      OptimSettings(lr=0.0, grad_clip=None), n_clients=1, seed=3)
    stages = (client.head, server.trunk, client.tail)
    for stage in stages:
        randomise(stage)
    b = batch(client.head.config.vocab_size)
    loss = client.train_step(b)
    logits = client.logits(b)
    named = {stage.full_name(n): p for stage in stages for n, p in stage.named_parameters() if p.requires_grad}
    rows = {stage.full_name(n).replace(".base_layer", ""): r  # under the layer's own name, LoRA or not
            for stage in stages for n, r in stage.named_buffers() if n.endswith("spf_rows")}
    return b, loss, logits, named, rows


@pytest.mark.parametrize("arch,method,a,c", [(arch, method, 1, 1) for arch in ("llama", "mistral", "qwen2", "gpt2",
                                                                                  "phi3") for method in METHODS]
                         + [("llama", "lora+spf", 2, 1), ("gpt2", "lora+spf", 2, 1)])
def test_spf_split_equals_unsplit(dirs, arch, method, a, c):
    adapters = AdapterSettings(method=method, lora=LoraSettings(r=4, alpha=8), spf=SpfSettings(ratio=0.5))
    b, loss, logits, split_params, split_rows = split_step(dirs[arch], a, c, adapters)
    ref = reference_model(dirs[arch])
    spec = arch_for(ref.config)
    for name, layout, module in list(hf_targets(ref, spec)):
        rows = expected_rows(module, layout, ref.config, 0.5)
        assert split_rows[f"{name}.spf_rows"].tolist() == rows, name  # every party selects the same rows
        spf.attach(module, torch.tensor(rows))
    if method == "lora+spf":
        inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=list(spec.lora_targets),
                                           fan_in_fan_out=spec.fan_in_fan_out), ref)
    ref_params = {}
    for name, p in ref.named_parameters():
        if "lora_" in name or name.endswith(".spf_delta"):
            p.requires_grad_(True)  # peft's injection froze the deltas
            ref_params[name] = p
    assert any(n.endswith(".spf_delta") for n in split_params)
    assert any("lora_" in n for n in split_params) == (method == "lora+spf")
    compare_to_reference(b, loss, logits, split_params, ref, ref_params)
    for name, p in split_params.items():
        if name.endswith(".spf_delta"):
            assert p.grad.abs().sum() > 0, name  # the delta is on the gradient path


# ---- (3) a training step changes only the selected rows ----
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_training_changes_only_selected_rows(dirs, arch):
    stage = load_stage(dirs[arch], "full")
    apply_method(stage, AdapterSettings(method="spf"), 0)
    mods = spf_modules(stage)
    base = {n: m.weight.detach().clone() for n, m in mods.items()}
    before = {n: effective_weight(m) for n, m in mods.items()}
    assert all(torch.allclose(before[n], m.weight.t() if isinstance(m, Conv1D) else m.weight, atol=1e-6)
               for n, m in mods.items())
    stepper = Stepper(trainable(stage), OptimSettings(lr=1e-2))
    b = batch(stage.config.vocab_size)
    lm_loss(stage(b["input_ids"], b["lengths"]), b["labels"]).backward()
    stepper.step()
    for name, m in mods.items():
        assert torch.equal(m.weight, base[name])  # the base weight stays frozen
        change = effective_weight(m) - before[name]
        changed = change.abs().sum(1).nonzero().flatten().tolist()
        assert changed == m.spf_rows.tolist(), name
        assert torch.allclose(change[m.spf_rows], m.spf_delta.detach(), atol=1e-6)


def test_lora_path_still_trains_with_spf(dirs):
    stage = load_stage(dirs["llama"], "full")
    apply_method(stage, AdapterSettings(method="lora+spf", lora=LoraSettings(r=2)), 0)
    params = {n: p for n, p in stage.named_parameters() if p.requires_grad}
    start = {n: p.detach().clone() for n, p in params.items()}
    frozen = {n: p.detach().clone() for n, p in stage.named_parameters() if not p.requires_grad}
    stepper = Stepper(trainable(stage), OptimSettings(lr=1e-2))
    b = batch(stage.config.vocab_size)
    lm_loss(stage(b["input_ids"], b["lengths"]), b["labels"]).backward()
    stepper.step()
    moved = {n for n, p in params.items() if not torch.equal(p, start[n])}
    assert any("lora_B" in n for n in moved) and any(n.endswith(".spf_delta") for n in moved)
    assert all(torch.equal(p, frozen[n]) for n, p in stage.named_parameters() if n in frozen)


# ---- (4) saved adapters: deltas with their row indices ----
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method", METHODS)
def test_adapters_file_round_trip(dirs, tmp_path, arch, method):
    adapters = AdapterSettings(method=method, lora=LoraSettings(r=2))
    server, (client,) = build_parties(dirs[arch], SplitSettings(1, 1), adapters, OptimSettings(), n_clients=1)
    stages = [client.head, server.trunk, client.tail]
    for stage in stages:
        randomise(stage)
    b = batch(client.head.config.vocab_size)
    split_logits = client.logits(b)
    path = tmp_path / "adapters.safetensors"
    path.write_bytes(adapters_blob(stages, method))
    saved = st_load(path.read_bytes())
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["method"] == method
    deltas = [k for k in saved if k.endswith(".spf_delta")]
    assert deltas and sorted(k for k in saved if k.endswith(".spf_rows")) == sorted(
        k[: -len("spf_delta")] + "spf_rows" for k in deltas)
    for stage in stages:
        for name, rows in stage.named_buffers():
            if name.endswith("spf_rows"):
                assert saved[stage.full_name(name)].dtype == torch.int64
                assert torch.equal(saved[stage.full_name(name)], rows)
    # the file (names of the full model) loads into the unsplit model: same logits as the split run
    full = load_stage(dirs[arch], "full")
    apply_method(full, adapters, 0)
    local = {full.full_name(n): n for n, _ in [*full.named_parameters(), *full.named_buffers()]}
    assert set(saved) <= set(local)
    load_trainable_state(full, {local[k]: v for k, v in saved.items()})
    assert trainable_state(full).keys() == {local[k] for k in saved if not k.endswith("spf_rows")}
    for k, v in saved.items():
        if not k.endswith("spf_rows"):
            assert torch.equal(trainable_state(full)[local[k]], v)
    with torch.no_grad():
        full_logits = full(b["input_ids"], b["lengths"])
    for i, n in enumerate(b["lengths"]):
        assert torch.allclose(full_logits[i, :n], split_logits[i, :n], atol=TOL)
    # rows that are not the ones these base weights select are refused
    bad_key = next(k for k in saved if k.endswith("spf_rows"))
    bad = dict(saved)
    bad[bad_key] = saved[bad_key].flip(0)
    with pytest.raises(ModelError, match="rows differ"):
        load_trainable_state(full, {local[k]: v for k, v in bad.items()})


# ---- (5) FedAvg of the deltas ----
def test_fedavg_averages_deltas_elementwise(dirs):
    server, clients = build_parties(dirs["llama"], SplitSettings(1, 1), AdapterSettings(method="lora+spf"),
                                    OptimSettings(lr=1e-2), n_clients=2, seed=0)
    for k, c in enumerate(clients):
        c.train_step(batch(128, seed=k))
    states = [c.adapter_state() for c in clients]
    keys = [k for k in states[0] if k.endswith(".spf_delta")]
    assert keys and all(not torch.equal(states[0][k], states[1][k]) for k in keys)
    assert set(states[0]) == set(server.aggregator.layout)  # the server's layout admits the deltas
    def indices(c):
        return {f"{part}.{n}": r.clone() for part, stage in (("head", c.head), ("tail", c.tail))
                for n, r in spf.spf_indices(stage).items()}

    rows = [indices(c) for c in clients]
    assert rows[0].keys() == rows[1].keys() and all(torch.equal(rows[0][n], rows[1][n]) for n in rows[0])
    for c, n in zip(clients, (1, 3)):
        c.push_update(0, n)
    for c in clients:
        assert c.pull_aggregate(0)
    for c in clients:
        after = c.adapter_state()
        for k in states[0]:
            expect = (0.25 * states[0][k].double() + 0.75 * states[1][k].double()).float()
            assert torch.allclose(after[k], expect, atol=1e-7), k
        assert all(torch.equal(r, rows[0][n]) for n, r in indices(c).items())


# ---- (6) merge ----
@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3"])
@pytest.mark.parametrize("method", METHODS)
def test_merge_equals_unmerged(dirs, arch, method):
    b = batch(128)
    plain = load_stage(dirs[arch], "full")
    stage = apply_method(load_stage(dirs[arch], "full"), AdapterSettings(method=method, lora=LoraSettings(r=2)), 0)
    randomise(stage)
    with torch.no_grad():
        base_logits = plain(b["input_ids"], b["lengths"])
        before = stage(b["input_ids"], b["lengths"])
        assert not torch.allclose(before, base_logits, atol=1e-3)  # the deltas do change the output
        n = len(spf_modules(stage))
        assert merge_spf(stage) == n > 0
        after = stage(b["input_ids"], b["lengths"])
    assert torch.allclose(after, before, atol=TOL)
    assert not any("spf" in name for name, _ in [*stage.named_parameters(), *stage.named_buffers()])
    assert not any(spf._is_spf_hook(h) for m in stage.modules() for h in m._forward_hooks.values())
    assert any("lora_" in name for name, _ in stage.named_parameters()) == (method == "lora+spf")
    if method == "spf":  # merged into the base weights: the plain model with those weights gives the same logits
        plain.load_state_dict(stage.state_dict())
        with torch.no_grad():
            assert torch.allclose(plain(b["input_ids"], b["lengths"]), before, atol=TOL)
