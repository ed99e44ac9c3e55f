"""Each party materialises only its own weights; bad partitions fail with one clear error."""

import json

import pytest
import torch

from silotune.errors import ModelError
from silotune.models.arch import LLAMA, arch_for, register, replace, supported
from silotune.models.loading import resolve_model
from silotune.models.partition import load_stage


def names(stage):
    return {stage.full_name(k) for k in stage.state_dict()}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_parties_hold_only_their_weights(tiny_dirs, arch):
    d = tiny_dirs[arch]
    head, trunk, tail = (load_stage(d, p, 2, 1) for p in ("head", "trunk", "tail"))
    spec = arch_for(head.config)
    assert not any(n.startswith((spec.embed, spec.lm_head, spec.final_norm)) for n in names(trunk))
    assert {n.split(".")[2] for n in names(trunk) if n.startswith(spec.blocks)} == {"2", "3"}
    assert all(not n.startswith(spec.blocks) or n.split(".")[2] in ("0", "1") for n in names(head))
    assert all(not n.startswith(spec.blocks) or n.split(".")[2] == "4" for n in names(tail))
    assert head.embed is not None and head.lm_head is None
    assert tail.lm_head is not None and tail.embed is None
    total = sum(p.numel() for s in (head, trunk, tail) for p in s.parameters())
    assert sum(p.numel() for p in trunk.parameters()) < total / 2


def test_tied_full_model_shares_one_tensor(tiny_dirs):
    full = load_stage(tiny_dirs["gpt2"], "full")
    assert full.lm_head.weight is full.embed.weight


@pytest.mark.parametrize("a,c", [(-1, 1), (1, 0), (3, 2), (5, 5)])
def test_impossible_partition(tiny_dirs, a, c):
    with pytest.raises(ModelError, match="a \\+ c|at least"):
        load_stage(tiny_dirs["llama"], "trunk", a, c)


def test_unknown_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    with pytest.raises(ModelError, match="unknown architecture 'bert'.*llama"):
        load_stage(tmp_path, "head")


def test_missing_model():
    with pytest.raises(ModelError, match="not found"):
        resolve_model("/no/such/model")


def test_register_new_architecture_in_one_line(tmp_path, monkeypatch):
    """An architecture (here Phi-3, fused qkv, described anew) becomes splittable with one register call; split
    logits match HF. The registry is restored afterwards."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from silotune.models import arch

    monkeypatch.setattr(arch, "_REGISTRY", dict(arch._REGISTRY))
    register("phi3", replace(LLAMA, lora_targets=("qkv_proj", "o_proj")))
    cfg = AutoConfig.for_model("phi3", hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                               num_attention_heads=4, num_key_value_heads=4, vocab_size=64,
                               max_position_embeddings=64, pad_token_id=0)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    ids, lengths = torch.randint(1, 64, (2, 7)), torch.tensor([7, 5])
    head, trunk, tail = (load_stage(tmp_path, p, 1, 2) for p in ("head", "trunk", "tail"))
    with torch.no_grad():
        out = tail(trunk(head(ids, lengths), lengths), lengths)
        expect = ref(input_ids=ids, attention_mask=(torch.arange(7)[None] < lengths[:, None]).long()).logits
    assert "phi3" in supported()
    assert torch.allclose(out[0], expect[0], atol=1e-5) and torch.allclose(out[1, :5], expect[1, :5], atol=1e-5)


def test_smollm2_split_logits_equal_unsplit(smollm2_dir):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(smollm2_dir, attn_implementation="sdpa").eval()
    ids = torch.tensor([[504, 3575, 282, 4649, 314, 1345], [19556, 28, 2683, 2, 2, 2]])
    lengths = torch.tensor([6, 3])
    head, trunk, tail = (load_stage(smollm2_dir, p, 2, 3) for p in ("head", "trunk", "tail"))
    with torch.no_grad():
        out = tail(trunk(head(ids, lengths), lengths), lengths)
        expect = ref(input_ids=ids, attention_mask=(torch.arange(6)[None] < lengths[:, None]).long()).logits
    assert torch.allclose(out[0], expect[0], atol=1e-4)
    assert torch.allclose(out[1, :3], expect[1, :3], atol=1e-4)


def test_gguf_file_exports_once_to_safetensors(tmp_path, monkeypatch, smollm2_dir):
    from silotune.models.loading import default_gguf

    monkeypatch.setenv("SILOTUNE_CACHE", str(tmp_path))
    out = resolve_model(default_gguf())
    assert out.parent == tmp_path / "models" and (out / "model.safetensors").is_file()
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert resolve_model(default_gguf()) == out and (out / "model.safetensors").stat().st_mtime_ns == stamp
    head = load_stage(out, "head", 1, 1)
    ref = load_stage(smollm2_dir, "head", 1, 1)
    assert torch.equal(head.embed.weight, ref.embed.weight)


def test_non_persistent_buffers_are_computed_not_left_as_empty_memory(tiny_dirs, monkeypatch):
    """A buffer the weight files do not hold (non-persistent: an embedding scale, say) must have the value the
    model's own ``__init__`` gives it in every stage, not whatever memory it was allocated on (the defect seen:
    losses doubled, logits off by 64). Probed with a non-persistent buffer added to every RMSNorm."""
    from transformers.models.llama import modeling_llama

    init = modeling_llama.LlamaRMSNorm.__init__

    def with_probe(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.register_buffer("probe", torch.arange(1.0, 257.0), persistent=False)

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "__init__", with_probe)
    for part in ("head", "trunk", "tail"):
        stage = load_stage(tiny_dirs["llama"], part, 1, 1)
        probes = [b for name, b in stage.named_buffers() if name.endswith("probe")]
        assert probes, part
        for b in probes:
            assert torch.equal(b, torch.arange(1.0, 257.0)), part
