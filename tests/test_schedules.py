"""Schedules: client-batch equals one pass over the concatenation, a silent client costs at most the
wait, hierarchical replicas stay identical, the config key alone picks the schedule, and a one-client
federation equals the centralized run step for step."""

import json
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from silotune.adapters import AdapterSettings, LoraSettings
from silotune.config import load_config
from silotune.errors import ConfigError, StepAborted
from silotune.federation import FederationSettings, SplitSettings, build_server
from silotune.protocol.messages import ForwardActivations, Gradients
from silotune.server.schedules import ClientBatch, Sequential
from silotune.simulate import run
from silotune.train.optim import OptimSettings

from .test_federation import tiny_cfg

LORA = AdapterSettings(lora=LoraSettings(r=4, alpha=8))


def server_for(model_dir, n, schedule="sequential", size=4, wait=5.0):
    fed = FederationSettings(clients=n, schedule=schedule, batch_clients=size, batch_wait=wait)
    server = build_server(model_dir, SplitSettings(1, 1), LORA, OptimSettings(lr=1e-2), n, seed=0, federation=fed)
    for name, p in server.trunk.named_parameters():  # non-zero B: the trunk's adapters change its output
        if "lora_B" in name:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    return server


def inputs(hidden, shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for b, t in shapes:
        lengths = torch.randint(1, t + 1, (b,), generator=g)
        lengths[0] = t
        out.append((torch.randn(b, t, hidden, generator=g), lengths, torch.randn(b, t, hidden, generator=g)))
    return out


def in_threads(fns):
    results, errors = [None] * len(fns), []

    def call(i):
        try:
            results[i] = fns[i]()
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    return results


def step(server, client, h1, lengths, grad, k=1):
    h2 = server.handle(ForwardActivations(client, k, hidden=h1, lengths=lengths)).hidden
    dh1 = server.handle(Gradients(client, k, grad=grad)).grad
    return h2, dh1


def test_client_batch_equals_one_sequential_step_of_the_concatenated_batch(tiny_dirs):
    batched = server_for(tiny_dirs["llama"], 3, "client-batch", size=3)
    whole = server_for(tiny_dirs["llama"], 1)
    hidden = batched.trunk.config.hidden_size
    data = inputs(hidden, [(2, 7), (1, 4), (3, 5)])  # different sequence lengths: right-padded inside
    got = in_threads([lambda k=k, d=d: step(batched, k, *d) for k, d in enumerate(data)])
    assert isinstance(batched.schedule, ClientBatch) and batched.schedule.group_sizes == [3]
    assert batched.steps == whole.steps + 1 == 1

    width = max(h.shape[1] for h, _, _ in data)
    pad = lambda t: torch.nn.functional.pad(t, (0, 0, 0, width - t.shape[1]))  # noqa: E731
    h1 = torch.cat([pad(h) for h, _, _ in data])
    lengths = torch.cat([n for _, n, _ in data])
    grad = torch.cat([pad(g) for _, _, g in data])
    h2, dh1 = step(whole, 0, h1, lengths, grad)
    at = 0
    for (h, n, _), (h2_k, dh1_k) in zip(data, got):
        rows = slice(at, at + h.shape[0])
        at += h.shape[0]
        assert h2_k.shape == h.shape and dh1_k.shape == h.shape
        for i, length in enumerate(n.tolist()):  # real positions (padding is masked, never read)
            assert torch.allclose(h2_k[i, :length], h2[rows][i, :length], atol=1e-5, rtol=0)
            assert torch.allclose(dh1_k[i, :length], dh1[rows][i, :length, :], atol=1e-5, rtol=0)
    for (name, p), (_, q) in zip(batched.trunk.named_parameters(), whole.trunk.named_parameters()):
        if p.requires_grad:
            assert torch.allclose(p, q, atol=1e-6, rtol=0), name


def test_a_silent_client_delays_the_others_by_at_most_the_wait(tiny_dirs):
    wait = 2.0  # generous: the bounds below must hold on a loaded machine too
    server = server_for(tiny_dirs["llama"], 3, "client-batch", size=3, wait=wait)
    hidden = server.trunk.config.hidden_size
    data = inputs(hidden, [(1, 4)] * 3)

    def forward(k, s=1):
        h1, lengths, _ = data[k]
        return server.handle(ForwardActivations(k, s, hidden=h1, lengths=lengths)).hidden

    # client 2 never sends its forward: the other two go on after at most the wait
    t0 = time.monotonic()
    in_threads([lambda: forward(0), lambda: forward(1)])
    assert wait * 0.9 <= time.monotonic() - t0 < wait + 1.5
    t0 = time.monotonic()
    in_threads([lambda k=k: server.handle(Gradients(k, 1, grad=data[k][2])) for k in (0, 1)])
    assert time.monotonic() - t0 < wait * 0.5  # the group was the two of them: nobody else is owed
    # client 2 is no longer waited for: the next gathering closes as soon as the two are in
    t0 = time.monotonic()
    in_threads([lambda: forward(0, 2), lambda: forward(1, 2)])
    assert time.monotonic() - t0 < wait * 0.5
    # client 2 comes back, joins a step, then stops answering: its group's backward waits at most the wait
    in_threads([lambda k=k: server.handle(Gradients(k, 2, grad=data[k][2])) for k in (0, 1)])
    in_threads([lambda: forward(2, 3)] + [lambda k=k: time.sleep(0.2) or forward(k, 3) for k in (0, 1)])
    assert server.schedule.group_sizes[-1] == 3
    t0 = time.monotonic()
    in_threads([lambda k=k: server.handle(Gradients(k, 3, grad=data[k][2])) for k in (0, 1)])
    assert wait * 0.9 <= time.monotonic() - t0 < wait + 1.5
    with pytest.raises(StepAborted):  # its step went on without it: it redoes the step
        server.handle(Gradients(2, 3, grad=data[2][2]))
    assert server.steps == 3 and server.rejected["aborted"] == 1
    assert all(torch.isfinite(p).all() for p in server.trunk.parameters())


def test_an_overflowing_member_is_refused_and_the_others_step(tiny_dirs):
    server = server_for(tiny_dirs["llama"], 2, "client-batch", size=2)
    hidden = server.trunk.config.hidden_size
    (h0, n0, g0), (h1, n1, g1) = inputs(hidden, [(1, 4), (2, 3)])
    in_threads([lambda: server.handle(ForwardActivations(0, 1, hidden=h0, lengths=n0)),
                lambda: server.handle(ForwardActivations(1, 1, hidden=h1, lengths=n1))])
    before = [p.detach().clone() for p in server.trunk.parameters() if p.requires_grad]
    huge = torch.full_like(g1, 3e38)  # finite, but the trunk's gradient overflows
    results = in_threads([lambda: server.handle(Gradients(0, 1, grad=g0)),
                          lambda: _raises(lambda: server.handle(Gradients(1, 1, grad=huge)))])
    assert results[0].grad.shape == h0.shape and torch.isfinite(results[0].grad).all()
    assert "overflowed" in str(results[1]) and server.rejected["non_finite"] == 1
    after = [p for p in server.trunk.parameters() if p.requires_grad]
    assert server.steps == 1 and any(not torch.equal(a, b) for a, b in zip(before, after))
    assert all(torch.isfinite(p).all() for p in after)


def _raises(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        return exc
    raise AssertionError("expected a refusal")


def test_the_config_key_alone_picks_the_schedule(tiny_chat_dir, tmp_path):
    results = {}
    for schedule in ("sequential", "client-batch"):
        r = run(tiny_cfg(tiny_chat_dir, tmp_path / schedule, **{"federation.schedule": schedule,
                                                                 "centralized": False}), progress=False)
        results[schedule] = r["federated"]
    seq, batch = results["sequential"], results["client-batch"]
    assert isinstance(seq["_parties"][0].schedule, Sequential)
    assert isinstance(batch["_parties"][0].schedule, ClientBatch)
    assert seq["steps"] == batch["steps"] == 8 and seq["trunk_steps"] == 8
    assert batch["trunk_steps"] == batch["trunk_passes"] == 4  # two clients per trunk pass
    assert batch["_parties"][0].schedule.group_sizes == [2] * 4
    assert all(torch.isfinite(torch.tensor(batch["curve"])))
    with pytest.raises(ConfigError, match="unknown schedule 'round-robin'"):
        tiny_cfg(tiny_chat_dir, tmp_path, **{"federation.schedule": "round-robin"})


def test_hierarchical_replicas_hold_identical_trunks_after_every_averaging(tiny_chat_dir, tmp_path):
    """Two replica processes joined by gloo, each serving one client; averaged at every FedAvg round."""
    r = run(tiny_cfg(tiny_chat_dir, tmp_path / "h", **{"federation.schedule": "hierarchical",
                                                       "federation.replicas": 2, "centralized": False}),
            progress=False)
    fed = r["federated"]
    prints = fed["replica_fingerprints"]
    assert len(prints) == 2 and prints[0] == prints[1]  # identical after each averaging
    assert len(prints[0]) == fed["rounds"] == 2 and prints[0][0] != prints[0][1]  # and they trained between
    assert fed["steps"] == 8 and fed["trunk_steps_all_replicas"] == 8 and fed["trunk_steps"] == 4
    assert all(torch.isfinite(torch.tensor(fed["curve"])))
    with pytest.raises(ConfigError, match="federation.replicas"):
        tiny_cfg(tiny_chat_dir, tmp_path, **{"federation.schedule": "hierarchical", "federation.replicas": 3})


def test_one_client_federation_equals_the_centralized_run_step_for_step(tiny_chat_dir, tmp_path):
    """Same batches in the same order, same losses and adapters: the federated machinery adds no error.
    Gradient clipping is off: each party clips its own gradients, the centralized run all of them at once."""
    r = run(tiny_cfg(tiny_chat_dir, tmp_path / "one", **{"federation.clients": 1, "train.steps": 6,
                                                         "optim.grad_clip": "null"}), progress=False)
    fed, cen = r["federated"]["curve"], r["centralized"]["curve"]
    assert len(fed) == len(cen) == 6
    assert all(abs(a - b) < 1e-5 for a, b in zip(fed, cen)), (fed, cen)
    f = load_file(tmp_path / "one/adapters/federated.safetensors")
    c = load_file(tmp_path / "one/adapters/centralized.safetensors")
    assert set(f) == set(c)
    for name in f:
        assert torch.allclose(f[name], c[name], atol=1e-5, rtol=0), name


@pytest.mark.parametrize("schedule", ["client-batch", "hierarchical"])
def test_parallel_schedules_deployed_equal_the_simulation(deployment, tmp_path, schedule):
    """Real server and client processes over TLS: client-batch (one server, three clients per pass) and
    hierarchical (two replica processes started as torchrun would, joined by gloo) train like simulate."""
    import os

    from .conftest import free_port
    from .test_deploy import cli, finish, wait_listening

    path, port = deployment
    extra = ["--set", f"federation.schedule={schedule}", "--set", "federation.batch_clients=3",
             "--set", "federation.batch_wait=20", "--set", "federation.replicas=2"]
    if schedule == "hierarchical":
        master = free_port()
        servers = []
        for rank in range(2):
            env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": str(master)}
            os.environ.update(env)
            try:
                servers.append(cli("server", "--config", str(path), *extra))
            finally:
                for k in env:
                    del os.environ[k]
    else:
        servers = [cli("server", "--config", str(path), *extra)]
    try:
        for s in servers:
            wait_listening(s)
        clients = [cli("client", "--config", str(path), "--id", str(k), "--server", f"localhost:{port}", *extra)
                   for k in range(3)]
        finish(clients)
        outs = finish(servers)
        assert all("rejected: none" in o for o in outs), outs
    finally:
        for s in servers:
            s.kill()
    run(load_config(path, [f"output={tmp_path / 'sim'}", "centralized=false", f"federation.schedule={schedule}",
                                 "federation.batch_clients=3", "federation.batch_wait=20", "federation.replicas=2"]),
              progress=False)
    expected = load_file(tmp_path / "sim/adapters/federated.safetensors")
    trunk_dir = tmp_path / ("net/server/replica-0" if schedule == "hierarchical" else "net/server")
    got = load_file(trunk_dir / "trunk.safetensors")
    summary = json.loads((trunk_dir / "summary.json").read_text())
    assert summary["schedule"] == schedule and summary["finished"] == ([0, 2] if schedule == "hierarchical"
                                                                        else [0, 1, 2])
    if schedule == "hierarchical":
        other = load_file(tmp_path / "net/server/replica-1/trunk.safetensors")
        assert all(torch.equal(other[k], got[k]) for k in got)  # the replicas ended identical
    else:
        assert summary["trunk_passes"] == summary["trunk_steps"] == 4  # 12 client steps, three per pass
    for k in range(3):
        client = load_file(tmp_path / f"net/client-{k}/adapters.safetensors")
        for name, value in client.items():
            assert torch.allclose(value, expected[name], atol=1e-5, rtol=0), name
    for name, value in got.items():
        assert torch.allclose(value, expected[name], atol=1e-5, rtol=0), name
