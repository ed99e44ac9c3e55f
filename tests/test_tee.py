"""TEE mode with the trunk in a server-side enclave: a run equals the plain run, clients refuse an enclave
that does not attest, the worker's view carries no signal of the text (correlation at chance, and the audit's
search inversion recovers no more than guessing the most frequent token), a dead enclave is a clear error."""

import json
import os

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from safetensors.torch import load_file

from silotune.adapters import AdapterSettings, LoraSettings
from silotune.audit.search_inversion import search_invert
from silotune.compute import Compute
from silotune.config import load_config
from silotune.crypto.identity import raw_public
from silotune.errors import ConfigError, ProtocolError
from silotune.federation import SplitSettings
from silotune.models.loading import load_tokenizer
from silotune.models.partition import load_config as model_config
from silotune.models.partition import load_stage
from silotune.server.boundary import Boundary, Limits
from silotune.server.runtime import Part
from silotune.simulate import run
from silotune.tee.attestation import AttestationError, AttestationPolicy, SimulatedVerifier
from silotune.tee.enclave import EnclaveError, EnclaveRuntime, enclave_spec, expected_measurement, verify_enclave
from silotune.tee.settings import TeeSettings
from silotune.train.optim import OptimSettings

from .test_federation import tiny_cfg

TEXTS = ["the film is a quiet triumph of acting and light", "a dull and lifeless mess that never takes off",
         "funny, warm and honest from start to finish", "I wanted to leave after the first ten minutes"]


def test_a_tee_run_equals_the_plain_run(tiny_chat_dir, tmp_path):
    """Same losses and trained adapters (LoRA and SPF deltas, trunk included, released by the enclave) to float
    tolerance; the clients attested the enclave first; every offloaded call used its own fresh mask."""
    both = {"centralized": "false", "adapters.method": "lora+spf"}  # SPF's deltas run in the enclave too
    plain = run(tiny_cfg(tiny_chat_dir, tmp_path / "plain", **both), progress=False)["federated"]
    tee = run(tiny_cfg(tiny_chat_dir, tmp_path / "tee", **both, **{"tee.mode": "server"}), progress=False)["federated"]
    assert len(plain["curve"]) == len(tee["curve"]) == 8
    assert max(abs(a - b) for a, b in zip(plain["curve"], tee["curve"])) < 1e-4, (plain["curve"], tee["curve"])
    assert tee["metrics"] == pytest.approx(plain["metrics"], abs=1e-6)
    a = load_file(tmp_path / "plain/adapters/federated.safetensors")
    b = load_file(tmp_path / "tee/adapters/federated.safetensors")
    assert set(a) == set(b) and any(".layers.1." in k for k in b)  # the trunk's adapters are in the file
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-4, rtol=0), k
    s = tee["tee"]
    assert s["backend"] == "simulated" and s["hardware_protection"] is False
    assert "no hardware protection" in s["description"]
    blocks = model_config(tiny_chat_dir).num_hidden_layers - 2
    assert s["offloaded_layers"] == 7 * blocks  # q, k, v, o, gate, up, down of every trunk block
    assert s["masks_used"] == s["forward_calls"] + s["backward_calls"] > 0
    assert s["worker_flops"] > 5 * s["online_flops"]  # elementwise online work (hidden size 64 here; 576 in SmolLM2)


def test_tee_mode_settings_are_checked(tiny_chat_dir, tmp_path):
    with pytest.raises(ConfigError, match="tee.mode"):
        tiny_cfg(tiny_chat_dir, tmp_path, **{"tee.mode": "client"})
    with pytest.raises(ConfigError, match="tee.mode"):
        tiny_cfg(tiny_chat_dir, tmp_path, **{"tee.mode": "server", "federation.schedule": "hierarchical"})
    with pytest.raises(ConfigError, match="tee.offload_dtype"):
        tiny_cfg(tiny_chat_dir, tmp_path, **{"tee.offload_dtype": "fp16"})


@pytest.fixture(scope="module")
def enclave(tiny_chat_dir):
    """A live enclave (worker inside it, recording what it receives) and the policy its clients hold."""
    platform = Ed25519PrivateKey.generate()
    tee = TeeSettings(mode="server", worker="inprocess")
    spec = enclave_spec(tiny_chat_dir, SplitSettings(1, 1), AdapterSettings(lora=LoraSettings(r=4, alpha=8)),
                        OptimSettings(), 0, Compute.default(), tee, platform_key=platform.private_bytes_raw(),
                        record=True, threads=1)
    runtime = EnclaveRuntime(spec, Boundary(Limits.unbounded(model_config(tiny_chat_dir))), tee)
    policy = AttestationPolicy(SimulatedVerifier(raw_public(platform.public_key())), expected_measurement(spec))
    yield runtime, policy, spec
    runtime.close()


def test_clients_refuse_an_enclave_that_does_not_attest(enclave):
    runtime, policy, spec = enclave
    assert verify_enclave(runtime.attest, policy).backend == "simulated"  # the honest enclave passes
    other = dict(spec, optim=dict(spec["optim"], lr=0.5))  # an enclave built for another configuration
    with pytest.raises(AttestationError, match="measurement"):
        verify_enclave(runtime.attest, AttestationPolicy(policy.verifier, expected_measurement(other)))
    challenge = os.urandom(16)
    ephemeral, quote = runtime.attest(challenge)
    with pytest.raises(AttestationError, match="different key|replayed"):
        policy.check(quote, ephemeral, os.urandom(16))  # the quote replayed to a client with a new challenge
    with pytest.raises(AttestationError, match="different key|replayed"):
        policy.check(quote, runtime.attest(challenge)[0], challenge)  # over another ephemeral key
    forger = SimulatedVerifier(raw_public(Ed25519PrivateKey.generate().public_key()))
    assert policy.check(quote, ephemeral, challenge).measurement == policy.expected_measurement
    with pytest.raises(AttestationError, match="signature"):
        AttestationPolicy(forger, policy.expected_measurement).check(quote, ephemeral, challenge)


def _h1(model_dir):
    tok = load_tokenizer(model_dir)
    rows = [tok(t)["input_ids"] for t in TEXTS]
    width = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
    lengths = torch.tensor([len(r) for r in rows])
    head = load_stage(model_dir, "head", 1, 1)
    with torch.no_grad():
        return head, ids, lengths, head(ids, lengths)


def test_the_worker_sees_nothing_of_the_text(enclave, tiny_chat_dir):
    """What the worker receives for the trunk's first projection is uncorrelated with its true input, and the
    audit's search inversion run on it recovers no more tokens than guessing the most frequent one; the same
    attack on the unmasked input (what the worker would see without the enclave) recovers almost all."""
    runtime, _, _ = enclave
    head, ids, lengths, h1 = _h1(tiny_chat_dir)
    runtime.worker_view()  # (the view so far is from other tests)
    before = len(runtime.worker_view())
    handle = runtime.forward([Part(0, 0, h1, lengths)])
    runtime.backward(handle, {0: torch.randn_like(h1) * 1e-3})
    view = runtime.worker_view()[before:]
    q = [v for v in view if v["name"].startswith("model.layers.1.self_attn.q_proj") and v["op"] == "forward"]
    assert len(q) == 1
    seen = q[0]["tensor"].reshape(h1.shape).float()
    trunk = load_stage(tiny_chat_dir, "trunk", 1, 1)
    norm = trunk.blocks[0].input_layernorm
    with torch.no_grad():
        truth = norm(h1)  # the q projection's true input
    x, y = truth.flatten().double(), seen.flatten().double()
    corr = float(torch.corrcoef(torch.stack([x, y]))[0, 1])
    assert abs(corr) < 5 / x.numel() ** 0.5, corr

    def attack(observed):  # the worker knows the public head and the trunk block's norm
        with torch.no_grad():
            return search_invert(head, observed, lengths, shortlist=16, transform=lambda out: norm(out).float())

    real = torch.arange(ids.shape[1])[None] < lengths[:, None]
    plain_hits = float((attack(truth) == ids)[real].float().mean())
    masked_hits = float((attack(seen) == ids)[real].float().mean())
    most_frequent = float((ids[real] == ids[real].mode().values).float().mean())
    assert plain_hits > 0.9  # the attack works when it can see the input
    assert masked_hits <= most_frequent + 0.05, (masked_hits, most_frequent)
    # and no two calls share a mask: the received tensors minus the true inputs differ between calls
    again = runtime.forward([Part(0, 1, h1, lengths)])
    runtime.backward(again, {0: torch.randn_like(h1) * 1e-3})
    q2 = [v for v in runtime.worker_view()[before + len(view):]
          if v["name"].startswith("model.layers.1.self_attn.q_proj") and v["op"] == "forward"][0]
    r1, r2 = seen - truth, q2["tensor"].reshape(h1.shape).float() - truth
    assert float(torch.corrcoef(torch.stack([r1.flatten(), r2.flatten()]))[0, 1]) < 5 / r1.numel() ** 0.5


def test_a_dead_enclave_is_a_clear_error(tiny_chat_dir):
    platform = Ed25519PrivateKey.generate()
    tee = TeeSettings(mode="server", worker="inprocess", timeout=30)
    spec = enclave_spec(tiny_chat_dir, SplitSettings(1, 1), AdapterSettings(), OptimSettings(), 0,
                        Compute.default(), tee, platform_key=platform.private_bytes_raw(), threads=1)
    runtime = EnclaveRuntime(spec, Boundary(Limits.unbounded(model_config(tiny_chat_dir))), tee)
    runtime.process.kill()
    runtime.process.join(5)
    _, _, lengths, h1 = _h1(tiny_chat_dir)
    with pytest.raises(EnclaveError, match="enclave process"):
        runtime.forward([Part(0, 0, h1, lengths)])
    runtime.close()


def test_a_deployed_enclave_trains_like_the_simulation_and_misconfigured_clients_refuse_it(deployment, tmp_path):
    """Real processes over TLS: the server's trunk in an enclave process; a client expecting another enclave
    (its configuration differs) refuses it before sending anything; the honest clients attest it over the
    protocol and train exactly like a plain simulation."""
    from .test_deploy import cli, finish, wait_listening

    path, port = deployment
    tee = ["--set", "tee.mode=server", "--set", "tee.worker=inprocess"]
    server = cli("server", "--config", str(path), *tee)
    try:
        wait_listening(server)
        wrong = cli("client", "--config", str(path), "--id", "0", "--server", f"localhost:{port}", *tee,
                    "--set", "optim.lr=0.5")
        out, _ = wrong.communicate(timeout=120)
        assert wrong.returncode == 2 and "measurement" in out, out[-2000:]
        clients = [cli("client", "--config", str(path), "--id", str(k), "--server", f"localhost:{port}", *tee)
                   for k in range(3)]
        outs = finish(clients)
        assert all("enclave attested" in o for o in outs), outs[0][-2000:]
        assert "rejected: none" in finish([server])[0]
    finally:
        server.kill()
    run(load_config(path, [f"output={tmp_path / 'sim'}", "centralized=false"]), progress=False)
    expected = load_file(tmp_path / "sim/adapters/federated.safetensors")
    got = load_file(tmp_path / "net/server/trunk.safetensors")
    for name, value in got.items():
        assert torch.allclose(value, expected[name], atol=1e-5, rtol=0), name
    for k in range(3):
        for name, value in load_file(tmp_path / f"net/client-{k}/adapters.safetensors").items():
            assert torch.allclose(value, expected[name], atol=1e-5, rtol=0), name
    summary = json.loads((tmp_path / "net/server/summary.json").read_text())
    assert summary["tee"]["hardware_protection"] is False and summary["tee"]["masks_used"] > 0


def test_a_plain_server_refuses_to_attest(tiny_chat_dir, tmp_path):
    """Asked for a quote, a server whose trunk runs in no enclave refuses (and counts it)."""
    from silotune.federation import build_server
    from silotune.protocol.messages import Control

    server = build_server(tiny_chat_dir, SplitSettings(1, 1), AdapterSettings(), OptimSettings(), 1, 0)
    with pytest.raises(ProtocolError, match="no enclave"):
        server.handle(Control(0, 0, command="attest", payload={"challenge": "00" * 16}))
    assert server.rejected["attestation"] == 1
