"""``silotune export``: PEFT and merged exports of a run's adapters compute the split model's logits.

Every comparison builds the split parties (client head and tail, server trunk) from the run's
config, gives their adapters non-trivial values, writes them as a run writes them
(``report.adapters_blob``), exports them, loads the export with peft / transformers only, and
compares logits on a right-padded batch with the split model's (1e-5, fp32).
"""

import json

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from silotune.adapters import AdapterSettings, LoraSettings, PrefixSettings, apply_method, trained_layers
from silotune.adapters.lora import name_seed
from silotune.cli import main
from silotune.config import RunConfig, to_dict
from silotune.deploy import write_trunk
from silotune.errors import ConfigError, ModelError
from silotune.export import PROVENANCE, check_format, export
from silotune.federation import SplitSettings, build_parties
from silotune.models.partition import load_stage
from silotune.report import RECORD_KEY, adapters_blob
from silotune.train.optim import OptimSettings

TOL = 1e-5


def batch(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([9, 6, 4])
    ids = torch.randint(3, vocab, (3, 9), generator=g)
    for i, n in enumerate(lengths):
        ids[i, n:] = 0
    return {"input_ids": ids, "lengths": lengths}


def run_config(model_dir, method, a=1, c=1, parts=("head", "trunk", "tail")) -> RunConfig:
    adapters = AdapterSettings(method=method, parts=list(parts), lora=LoraSettings(r=4, alpha=8),
                               prefix=PrefixSettings(length=3, init_std=0.5))
    cfg = RunConfig(model=str(model_dir), split=SplitSettings(a, c), adapters=adapters)
    cfg.train.seed = 3
    return cfg


def randomise(stage):
    """Non-zero LoRA B and SPF deltas, so that every adapter changes the logits."""
    for name, p in stage.named_parameters():
        if "lora_B" in name or name.endswith("spf_delta"):
            g = torch.Generator().manual_seed(name_seed(1, stage.full_name(name)) % 2**31)
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def split_run(cfg: RunConfig):
    """The split parties of ``cfg`` with trained-looking adapters, and their logits on a padded batch."""
    server, (client,) = build_parties(cfg.model, cfg.split, cfg.adapters, OptimSettings(), n_clients=1,
                                      seed=cfg.train.seed)
    for stage in (client.head, server.trunk, client.tail):
        randomise(stage)
    b = batch(client.head.config.vocab_size)
    return server, client, b, client.logits(b)


def write_run(tmp_path, cfg, server, client, record=True):
    run_dir = tmp_path / "run"
    (run_dir / "adapters").mkdir(parents=True)
    blob = adapters_blob([client.head, server.trunk, client.tail], cfg.adapters.method, cfg if record else None)
    (run_dir / "adapters" / "federated.safetensors").write_bytes(blob)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return run_dir


def mask(b):
    return (torch.arange(b["input_ids"].shape[1])[None] < b["lengths"][:, None]).long()


def peft_logits(base, folder, b):
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), folder).eval()
    with torch.no_grad():
        return model(input_ids=b["input_ids"], attention_mask=mask(b)).logits


def merged_logits(folder, b):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=b["input_ids"], attention_mask=mask(b)).logits


def assert_same(b, got, split):
    for i, n in enumerate(b["lengths"]):
        diff = float((got[i, :n] - split[i, :n]).abs().max())
        assert diff <= TOL, diff


# ---- what an adapters file records ----
def test_adapters_file_records_how_to_rebuild_it(tiny_dirs):
    cfg = run_config(tiny_dirs["llama"], "lora+spf", a=2, c=1, parts=["head", "tail"])
    server, client, _, _ = split_run(cfg)
    with safe_open_bytes(adapters_blob([client.head, server.trunk, client.tail], "lora+spf", cfg)) as meta:
        assert meta["format"] == "silotune-adapters" and meta["method"] == "lora+spf" and "releasable" not in meta
        record = json.loads(meta[RECORD_KEY])
    assert record["lora"] == {"r": 4, "alpha": 8.0, "dropout": 0.0, "fan_in_fan_out": False,
                              "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]}  # the llama defaults, resolved
    assert record["spf"] == {"ratio": 0.5, "targets": ["q_proj", "k_proj", "v_proj", "up_proj"]}
    assert record["layers"] == [0, 1, 4] and record["parts"] == ["head", "tail"]
    assert record["split"] == {"head_blocks": 2, "tail_blocks": 1} and record["num_layers"] == 5
    assert record["model"] == str(tiny_dirs["llama"]) and record["model_path"] == str(tiny_dirs["llama"].resolve())
    assert record["model_type"] == "llama" and record["seed"] == 3 and "prefix" not in record


class safe_open_bytes:
    """The metadata of a safetensors blob (through a temporary file)."""

    def __init__(self, blob):
        import tempfile

        self.file = tempfile.NamedTemporaryFile(suffix=".safetensors")
        self.file.write(blob)
        self.file.flush()

    def __enter__(self):
        with safe_open(self.file.name, framework="pt") as f:
            return f.metadata()

    def __exit__(self, *exc):
        self.file.close()


# ---- peft: LoRA ----
@pytest.mark.parametrize("arch,a,c,parts", [("llama", 1, 1, ("head", "trunk", "tail")),
                                            ("gpt2", 1, 1, ("head", "trunk", "tail")),
                                            ("qwen2", 2, 1, ("head", "tail"))])
def test_peft_lora_equals_split(tiny_dirs, tmp_path, arch, a, c, parts):
    cfg = run_config(tiny_dirs[arch], "lora", a, c, parts)
    server, client, b, split = split_run(cfg)
    out = export(write_run(tmp_path, cfg, server, client), tmp_path / "peft", "peft")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["fan_in_fan_out"] is (arch == "gpt2")
    assert config["layers_to_transform"] == sorted(trained_layers(client.head.config, cfg.adapters, a, c))
    assert config["base_model_name_or_path"] == str(tiny_dirs[arch].resolve())
    assert (out / "adapter_model.safetensors").is_file() and (out / PROVENANCE).is_file()
    assert_same(b, peft_logits(tiny_dirs[arch], out, b), split)


# ---- merged: LoRA, SPF, both ----
@pytest.mark.parametrize("arch,method", [("llama", "lora"), ("llama", "spf"), ("llama", "lora+spf"),
                                         ("gpt2", "lora+spf")])
def test_merged_equals_split(tiny_dirs, tmp_path, arch, method):
    cfg = run_config(tiny_dirs[arch], method)
    server, client, b, split = split_run(cfg)
    out = export(write_run(tmp_path, cfg, server, client), tmp_path / "merged", "merged")
    assert not (out / "adapter_config.json").exists()
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert not [k for k in f.keys() if "lora_" in k or "spf_" in k]
    assert_same(b, merged_logits(out, b), split)


def test_peft_refuses_spf(tiny_dirs, tmp_path):
    cfg = run_config(tiny_dirs["llama"], "lora+spf")
    server, client, _, _ = split_run(cfg)
    with pytest.raises(ConfigError, match="lora\\+spf adapters include SPF.*PEFT cannot represent.*--format merged"):
        export(write_run(tmp_path, cfg, server, client), tmp_path / "peft", "peft")
    assert not (tmp_path / "peft").exists()
    with pytest.raises(ConfigError, match="spf adapters include SPF.*--format merged"):
        check_format("spf", "peft")


# ---- prefixes ----
@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # untied and tied embeddings
def test_peft_prefix_equals_split(tiny_dirs, tmp_path, arch):
    cfg = run_config(tiny_dirs[arch], "prefix")
    server, client, b, split = split_run(cfg)
    out = export(write_run(tmp_path, cfg, server, client), tmp_path / "peft", "peft")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_TUNING" and config["num_virtual_tokens"] == 3
    assert_same(b, peft_logits(tiny_dirs[arch], out, b), split)
    if arch != "llama":
        return
    # peft's own generation (its cache, its positions) continues as the split model does, greedily
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dirs[arch]), out).eval()
    ids = b["input_ids"][:1, :6]
    generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                               do_sample=False, pad_token_id=0)
    for _ in range(5):
        ids = torch.cat([ids, client.logits({"input_ids": ids, "lengths": torch.tensor([ids.shape[1]])})[:, -1:]
                         .argmax(-1)], dim=1)
    assert torch.equal(generated, ids)


def test_prefix_refusals(tiny_dirs, tmp_path):
    cfg = run_config(tiny_dirs["gpt2"], "prefix")
    run = write_run(tmp_path, cfg, *split_run(cfg)[:2])
    with pytest.raises(ConfigError, match="learned absolute position embeddings.*merged cannot hold"):
        export(run, tmp_path / "a", "peft")
    with pytest.raises(ConfigError, match="not weights"):
        export(run, tmp_path / "b", "merged")
    cfg = run_config(tiny_dirs["llama"], "prefix", parts=["head", "tail"])  # no prefixes on the trunk's blocks
    with pytest.raises(ConfigError, match="same 3 virtual tokens on every layer.*blocks 0, 4 only"):
        export(write_run(tmp_path / "partial", cfg, *split_run(cfg)[:2]), tmp_path / "c", "peft")


# ---- which adapters ----
def test_centralized_and_config_fallback(tiny_dirs, tmp_path):
    cfg = run_config(tiny_dirs["llama"], "lora")
    server, client, b, split = split_run(cfg)
    run = write_run(tmp_path, cfg, server, client, record=False)  # an older file: settings from config.yaml
    assert_same(b, merged_logits(export(run, tmp_path / "fed", "merged"), b), split)
    full = load_stage(tiny_dirs["llama"], "full")
    apply_method(full, cfg.adapters, 7, trained_layers(full.config, cfg.adapters, 1, 1))
    randomise(full)
    with torch.no_grad():
        central = full(b["input_ids"], b["lengths"])
    (run / "adapters" / "centralized.safetensors").write_bytes(adapters_blob([full], "lora", cfg))
    assert_same(b, peft_logits(tiny_dirs["llama"], export(run, tmp_path / "cen", which="centralized"), b), central)
    (run / "config.yaml").unlink()
    with pytest.raises(ConfigError, match="does not record its adapters' settings.*--config"):
        export(run, tmp_path / "x")


def test_missing_trunk_adapters_refused(tiny_dirs, tmp_path):
    """A simulation whose enclave kept the trunk (tee.release_trunk: false) writes no trunk adapters."""
    cfg = run_config(tiny_dirs["llama"], "lora")
    server, client, _, _ = split_run(cfg)
    run = tmp_path / "run"
    (run / "adapters").mkdir(parents=True)
    blob = adapters_blob([client.head, None, client.tail], "lora", cfg)
    (run / "adapters" / "federated.safetensors").write_bytes(blob)
    with pytest.raises(ModelError, match=r"no trained values .* blocks 1\.\.3.*tee.release_trunk: false"):
        export(run, tmp_path / "out", "merged")


# ---- deployments ----
def deployment(tmp_path, cfg, server, client, consent=True):
    """A deployment's output folder: the server's trunk written by deploy.write_trunk, a client's adapters."""
    out = tmp_path / "net"
    cfg.deploy.release_trunk_adapters = consent
    write_trunk(cfg, server, out / "server")
    (out / "client-0").mkdir(parents=True)
    (out / "client-0" / "adapters.safetensors").write_bytes(
        adapters_blob([client.head, client.tail], cfg.adapters.method, cfg))
    return out


def releasable(path):
    with safe_open(str(path), framework="pt") as f:
        return f.metadata().get("releasable")


def test_deployment_assembles_with_the_servers_consent(tiny_dirs, tmp_path):
    cfg = run_config(tiny_dirs["llama"], "lora+spf")
    assert cfg.deploy.release_trunk_adapters is False  # consent is never the default
    server, client, b, split = split_run(cfg)
    net = deployment(tmp_path, cfg, server, client, consent=True)
    assert releasable(net / "server" / "trunk.safetensors") == "true"
    assert_same(b, merged_logits(export(net, tmp_path / "merged", "merged", client=0), b), split)
    with pytest.raises(ConfigError, match="deployment's output folder: name the client"):
        export(net, tmp_path / "x")
    with pytest.raises(ConfigError, match="no adapters of client 1"):
        export(net, tmp_path / "x", client=1)
    with pytest.raises(ConfigError, match="has no centralized baseline"):
        export(net, tmp_path / "x", client=0, which="centralized")


def test_deployment_peft_and_hierarchical_replica(tiny_dirs, tmp_path):
    cfg = run_config(tiny_dirs["gpt2"], "lora")
    server, client, b, split = split_run(cfg)
    net = deployment(tmp_path, cfg, server, client, consent=True)
    (net / "server" / "trunk.safetensors").rename(net / "server" / "replica-0.safetensors")
    (net / "server" / "replica-0").mkdir()
    (net / "server" / "replica-0.safetensors").rename(net / "server" / "replica-0" / "trunk.safetensors")
    (net / "server" / "replica-1").mkdir()  # client 0 trains against replica 0 mod 2: this one is not read
    out = export(net, tmp_path / "peft", "peft", client=0)
    assert_same(b, peft_logits(tiny_dirs["gpt2"], out, b), split)


def test_deployment_without_consent_or_with_a_sealed_trunk_refused(tiny_dirs, tmp_path):
    cfg = run_config(tiny_dirs["llama"], "lora")
    server, client, _, _ = split_run(cfg)
    net = deployment(tmp_path, cfg, server, client, consent=False)
    trunk = net / "server" / "trunk.safetensors"
    assert releasable(trunk) == "false"
    with pytest.raises(ConfigError, match="has not released its trunk adapters.*deploy.release_trunk_adapters: true"):
        export(net, tmp_path / "out", client=0)
    trunk.unlink()
    (net / "server" / "trunk.sealed").write_bytes(b"SILOSEAL sealed to the enclave")
    with pytest.raises(ConfigError, match="sealed to the server's enclave.*tee.release_trunk: false"):
        export(net, tmp_path / "out", client=0)
    frozen = run_config(tiny_dirs["llama"], "lora", parts=["head", "tail"])  # nothing trained on the trunk
    server, client, b, split = split_run(frozen)
    net = deployment(tmp_path / "frozen", frozen, server, client, consent=False)
    (net / "server" / "trunk.safetensors").unlink()
    assert_same(b, merged_logits(export(net, tmp_path / "frozen-out", "merged", client=0), b), split)


# ---- the command line ----
def test_cli_round_trip(tiny_chat_dir, tmp_path, capsys):
    from transformers import AutoTokenizer

    cfg = run_config(tiny_chat_dir, "lora")
    server, client, b, split = split_run(cfg)
    run = write_run(tmp_path, cfg, server, client)
    out = tmp_path / "exported"
    assert main(["export", str(run), "--format", "peft", "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    assert_same(b, peft_logits(tiny_chat_dir, out, b), split)
    for argv, expected in [([str(tmp_path / "missing"), "--out", str(tmp_path / "o")], "not a run folder"),
                           ([str(run), "--out", str(out)], "exists: choose a new folder, or pass --force"),
                           ([str(run), "--format", "merged", "--out", str(run)], "would replace the run folder")]:
        assert main(["export", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0]
    assert main(["export", str(run), "--format", "merged", "--out", str(out), "--force"]) == 0
    assert (out / "config.json").is_file() and not (out / "adapter_config.json").exists()
    assert_same(b, merged_logits(out, b), split)
    assert AutoTokenizer.from_pretrained(out)("hello world")["input_ids"] == \
        AutoTokenizer.from_pretrained(tiny_chat_dir)("hello world")["input_ids"]  # the base's tokenizer came along
