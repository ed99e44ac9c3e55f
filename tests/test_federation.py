"""Federated averaging, the sequential schedule and determinism of whole runs."""

import pytest
import torch
from safetensors.torch import load_file

from silotune.adapters import AdapterSettings, LoraSettings
from silotune.config import load_config
from silotune.federation import SplitSettings, build_parties
from silotune.server.aggregation import weighted_mean
from silotune.simulate import run
from silotune.train.batching import collate
from silotune.train.optim import OptimSettings


def test_clients_share_the_weighted_average_after_a_round(tiny_dirs):
    server, clients = build_parties(tiny_dirs["llama"], SplitSettings(1, 1), AdapterSettings(lora=LoraSettings(r=2)),
                                    OptimSettings(lr=1e-2), n_clients=3, seed=0)
    g = torch.Generator().manual_seed(0)
    for c in clients:
        rows = [(torch.randint(3, 128, (6,), generator=g).tolist(), [-100] * 3 + [5, 6, 7]) for _ in range(2)]
        c.train_step(collate(rows, 0))
    states = [c.adapter_state() for c in clients]
    assert any(not torch.equal(states[0][k], states[1][k]) for k in states[0])
    for c, n in zip(clients, (1, 2, 3)):
        c.push_update(0, n)
    for c in clients:
        assert c.pull_aggregate(0)
    expect = weighted_mean(states, [1, 2, 3], torch.float32)
    for c in clients:
        for k, v in c.adapter_state().items():
            assert torch.allclose(v, expect[k], atol=1e-7)
    assert server.steps == 3


def tiny_cfg(model_dir, out, **extra):
    overrides = [f"model={model_dir}", f"output={out}", "data.max_train=48", "data.max_test=16",
                 "data.max_length=48", "train.steps=8", "train.batch_size=4", "train.eval_batch_size=16",
                 "federation.clients=2", "federation.local_steps=2", "split.head_blocks=1",
                 "split.tail_blocks=1", "optim.lr=5e-3"]
    return load_config(None, overrides + [f"{k}={v}" for k, v in extra.items()])


def test_runs_are_deterministic_for_a_seed(tiny_chat_dir, tmp_path):
    a = run(tiny_cfg(tiny_chat_dir, tmp_path / "a"), progress=False)
    b = run(tiny_cfg(tiny_chat_dir, tmp_path / "b"), progress=False)
    assert a["federated"]["curve"] == b["federated"]["curve"]
    assert a["centralized"]["curve"] == b["centralized"]["curve"]
    ta, tb = (load_file(tmp_path / f"{x}/adapters/federated.safetensors") for x in "ab")
    assert set(ta) == set(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)
    c = run(tiny_cfg(tiny_chat_dir, tmp_path / "c", **{"train.seed": 1}), progress=False)
    assert c["federated"]["curve"] != a["federated"]["curve"]


def test_same_examples_on_both_sides_and_sequential_steps(tiny_chat_dir, tmp_path):
    r = run(tiny_cfg(tiny_chat_dir, tmp_path / "r", **{"train.steps": 7}), progress=False)
    fed, cen = r["federated"], r["centralized"]
    assert fed["examples"] == cen["examples"] == 8 * 4  # 7 steps rounded up to 4 per client
    server, clients = fed["_parties"]
    assert server.steps == fed["steps"] == sum(c["steps"] for c in fed["clients"])


@pytest.mark.parametrize("method,parts", [("prefix", "[head,trunk,tail]"), ("lora", "[head,tail]")])
def test_methods_and_frozen_trunk_run(tiny_chat_dir, tmp_path, method, parts):
    r = run(tiny_cfg(tiny_chat_dir, tmp_path / "m", **{"adapters.method": method, "adapters.parts": parts,
                                                       "adapters.prefix.length": 4}), progress=False)
    server, _ = r["federated"]["_parties"]
    trunk_trainable = [p for p in server.trunk.parameters() if p.requires_grad]
    assert bool(trunk_trainable) == ("trunk" in parts)
    assert all(torch.isfinite(torch.tensor(r["federated"]["curve"])))


def test_dirichlet_partition_skews_clients(tiny_chat_dir, tmp_path):
    r = run(tiny_cfg(tiny_chat_dir, tmp_path / "d", **{"data.partition": "dirichlet", "data.alpha": 0.1,
                                                       "centralized": False, "data.max_train": 200}),
            progress=False)
    shares = []
    for c in r["federated"]["clients"]:
        counts = c["label_counts"]
        shares.append(counts["positive"] / c["examples"])
    assert max(shares) - min(shares) > 0.2


def test_summarization_is_scored_with_rouge(tiny_chat_dir, tmp_path):
    r = run(tiny_cfg(tiny_chat_dir, tmp_path / "x", **{"data.task": "xsum", "data.max_train": 16,
                                                       "data.max_test": 3, "data.max_length": 96,
                                                       "train.max_new_tokens": 4, "train.steps": 2}),
            progress=False)
    for side in ("federated", "centralized"):
        m = r[side]["metrics"]
        assert set(m) >= {"rouge1", "rouge2", "rougeL"} and 0.0 <= m["rougeL"] <= 1.0 and m["n"] == 3


def test_real_smollm2_short_federated_run(smollm2_dir, tmp_path):
    """Four clients fine-tune the real SmolLM2 for a few steps; loss goes down on the same batches."""
    cfg = load_config(None, ["data.max_train=32", "data.max_test=16", "data.max_length=48", "train.steps=8",
                             "train.batch_size=4", "federation.clients=4", "federation.local_steps=2",
                             f"output={tmp_path}", "centralized=false", "optim.lr=2e-3"])
    r = run(cfg, progress=False)
    fed = r["federated"]
    assert fed["steps"] == 8 and 0.0 <= fed["metrics"]["accuracy"] <= 1.0
    assert all(torch.isfinite(torch.tensor(fed["curve"])))
    assert (tmp_path / "report.md").is_file()
