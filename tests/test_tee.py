"""TEE mode with the trunk in a server-side enclave: a run equals the plain run, clients refuse an enclave
that does not attest, the worker's view carries no signal of the text (correlation at chance, and the audit's
search inversion recovers no more than guessing the most frequent token), a dead enclave is a clear error."""

import json

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from safetensors.torch import load_file

from silotune.adapters import AdapterSettings, LoraSettings
from silotune.audit.search_inversion import search_invert
from silotune.compute import Compute
from silotune.config import load_config
from silotune.crypto.handshake import ClientHandshake
from silotune.crypto.identity import Identity, raw_public
from silotune.crypto.session import AeadSession
from silotune.errors import ConfigError, ProtocolError
from silotune.federation import SplitSettings
from silotune.models.loading import load_tokenizer
from silotune.models.partition import load_config as model_config
from silotune.models.partition import load_stage
from silotune.protocol.codec import decode, encode
from silotune.protocol.messages import EnclaveMessage, ForwardActivations, Gradients, SealedTensor
from silotune.server.boundary import Boundary, Limits
from silotune.server.runtime import Part
from silotune.simulate import run
from silotune.tee.attestation import AttestationError, AttestationPolicy, SimulatedVerifier
from silotune.tee.channel import hello_bytes, welcome_from
from silotune.tee.enclave import EnclaveError, EnclaveRuntime, enclave_spec, expected_measurement
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
    """A live enclave (worker inside it, recording what it receives), the policy its clients hold, and the
    identity of its one enrolled client (client 0)."""
    platform = Ed25519PrivateKey.generate()
    tee = TeeSettings(mode="server", worker="inprocess")
    member = Identity.generate()
    spec = enclave_spec(tiny_chat_dir, SplitSettings(1, 1), AdapterSettings(lora=LoraSettings(r=4, alpha=8)),
                        OptimSettings(), 0, Compute.default(), tee, platform_key=platform.private_bytes_raw(),
                        record=True, threads=1, enrolled={0: member.public})
    runtime = EnclaveRuntime(spec, Boundary(Limits.unbounded(model_config(tiny_chat_dir))), tee)
    policy = AttestationPolicy(SimulatedVerifier(raw_public(platform.public_key())), expected_measurement(spec))
    yield runtime, policy, spec, member
    runtime.close()


def _session(runtime, policy, member, client=0) -> AeadSession:
    """Client ``client``'s session with the enclave, through the attested handshake."""
    hs = ClientHandshake(client, member, None, attestation=policy)
    return AeadSession(hs.finish(welcome_from(runtime.hello(client, hello_bytes(hs.hello)))), "client", ordered=False)


def test_clients_refuse_an_enclave_that_does_not_attest(enclave):
    """The handshake with the enclave: the honest enclave's welcome passes; one built for another configuration
    (measurement), a welcome replayed to a new hello, a welcome whose key is not the quoted one, and a quote
    signed by another platform are refused before any key exists; the enclave refuses a stranger's hello and a
    replayed one (counted by the host)."""
    runtime, policy, spec, member = enclave
    _session(runtime, policy, member)  # the honest enclave passes
    hs = ClientHandshake(0, member, None, attestation=policy)
    welcome = welcome_from(runtime.hello(0, hello_bytes(hs.hello)))
    other = dict(spec, optim=dict(spec["optim"], lr=0.5))  # an enclave built for another configuration
    with pytest.raises(AttestationError, match="measurement"):
        ClientHandshake(0, member, None, AttestationPolicy(policy.verifier, expected_measurement(other))).finish(
            welcome_from(runtime.hello(0, hello_bytes(
                (hs2 := ClientHandshake(0, member, None, AttestationPolicy(policy.verifier,
                                                                            expected_measurement(other)))).hello))))
    del hs2
    fresh = ClientHandshake(0, member, None, attestation=policy)
    with pytest.raises(AttestationError, match="different key|replayed"):
        fresh.finish(welcome)  # the first welcome replayed to a new hello (its quote answers another challenge)
    second = welcome_from(runtime.hello(0, hello_bytes(fresh.hello)))
    swapped = welcome_from(runtime.hello(0, hello_bytes(ClientHandshake(0, member, None, policy).hello)))
    second.ephemeral = swapped.ephemeral  # the host substitutes a key of its choosing
    with pytest.raises(AttestationError, match="different key|replayed"):
        fresh.finish(second)
    forger = SimulatedVerifier(raw_public(Ed25519PrivateKey.generate().public_key()))
    with pytest.raises(AttestationError, match="signature"):
        hs3 = ClientHandshake(0, member, None, AttestationPolicy(forger, policy.expected_measurement))
        hs3.finish(welcome_from(runtime.hello(0, hello_bytes(hs3.hello))))
    with pytest.raises(AttestationError, match="no enclave quote"):  # a welcome without a quote
        hs4 = ClientHandshake(0, member, None, policy)
        w = welcome_from(runtime.hello(0, hello_bytes(hs4.hello)))
        w.quote = b""
        hs4.finish(w)
    before = runtime.boundary.rejected["handshake"]
    stranger = ClientHandshake(0, Identity.generate(), None, policy)  # not the enrolled key of client 0
    with pytest.raises(ProtocolError, match="bad signature"):
        runtime.hello(0, hello_bytes(stranger.hello))
    replay = ClientHandshake(0, member, None, policy)
    runtime.hello(0, hello_bytes(replay.hello))
    with pytest.raises(ProtocolError, match="replayed"):
        runtime.hello(0, hello_bytes(replay.hello))
    with pytest.raises(ProtocolError, match="names client 0"):  # relayed on behalf of another client
        runtime.hello(1, hello_bytes(ClientHandshake(0, member, None, policy).hello))
    assert runtime.boundary.rejected["handshake"] == before + 3


def _sealed(session, msg, of=None) -> SealedTensor:
    t = msg.hidden if isinstance(msg, ForwardActivations) else msg.grad
    return SealedTensor(msg.client, msg.step, of or msg.kind, session.seal(encode(msg), msg.step, msg.kind.encode()),
                        tuple(t.shape), getattr(msg, "train", True))


def test_sealed_activations_are_opened_checked_and_answered_only_inside_the_enclave(enclave, tiny_chat_dir):
    """What the host relays is ciphertext the enclave opens: the sealed answer equals the plain trunk's output;
    a tampered, replayed, mislabelled or non-finite sealed message is refused (counted by the host's boundary)
    without touching the trunk, and the session keeps working."""
    runtime, policy, _, member = enclave
    session = _session(runtime, policy, member)
    _, _, lengths, h1 = _h1(tiny_chat_dir)
    msg = ForwardActivations(0, 7, hidden=h1, lengths=lengths, train=False)
    sealed = _sealed(session, msg)
    assert h1.numpy().tobytes()[:64] not in sealed.data  # the host holds ciphertext
    out, step = session.open(runtime.infer(sealed, None), b"returned")
    answer = decode(out)
    assert step == 7 and answer.client == 0 and answer.step == 7
    plain = runtime.infer(h1, lengths)  # the same input given to the enclave in the clear
    assert torch.allclose(answer.hidden, plain, atol=1e-5), (answer.hidden - plain).abs().max()
    rejected = runtime.boundary.rejected
    before = dict(rejected)
    with pytest.raises(ProtocolError, match="replayed"):
        runtime.infer(sealed, None)  # the same ciphertext again
    again = _sealed(session, ForwardActivations(0, 8, hidden=h1, lengths=lengths, train=False))
    tampered = SealedTensor(0, 8, "forward", again.data[:-1] + bytes([again.data[-1] ^ 1]), again.shape, False)
    with pytest.raises(ProtocolError, match="tampered"):
        runtime.infer(tampered, None)
    grad = _sealed(session, Gradients(0, 9, grad=h1))
    with pytest.raises(ProtocolError, match="tampered"):  # a gradient relayed as activations
        runtime.infer(SealedTensor(0, 9, "forward", grad.data, grad.shape, False), None)
    bad = h1.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ProtocolError, match="non-finite"):
        runtime.infer(_sealed(session, ForwardActivations(0, 10, hidden=bad, lengths=lengths, train=False)), None)
    flipped = _sealed(session, ForwardActivations(0, 11, hidden=h1, lengths=lengths, train=False))
    flipped.train = True
    with pytest.raises(ProtocolError, match="train flag"):
        runtime.infer(flipped, None)
    with pytest.raises(ProtocolError, match="keeps no generation caches"):  # split generation's caches: not here
        runtime.infer(_sealed(session, ForwardActivations(0, 13, hidden=h1, lengths=lengths, train=False, cache=5)),
                      None)
    assert rejected["crypto"] == before.get("crypto", 0) + 3
    assert rejected["non_finite"] == before.get("non_finite", 0) + 1
    assert rejected["unexpected"] == before.get("unexpected", 0) + 1
    out, _ = session.open(runtime.infer(_sealed(session, ForwardActivations(0, 12, hidden=h1, lengths=lengths,
                                                                            train=False)), None), b"returned")
    assert torch.allclose(decode(out).hidden, plain, atol=1e-5)  # the session still works


def test_the_host_relays_only_ciphertext_and_refuses_tensors_in_the_clear(tiny_chat_dir):
    """Clients of a TEE-mode server (in-process) train and federated-average through sealed messages only: no
    tensor of theirs reaches the host's handler except as ``EnclaveMessage`` ciphertext, the average comes back
    sealed and both clients load the same one; ``h1`` or an update sent in the clear is refused ("unsealed")
    and counted; honest training goes on."""
    from silotune.federation import build_parties
    from silotune.protocol.messages import Aggregation, Control

    tee = TeeSettings(mode="server", worker="inprocess")
    server, clients = build_parties(tiny_chat_dir, SplitSettings(1, 1), AdapterSettings(lora=LoraSettings(r=2)),
                                    OptimSettings(), 2, 0, tee=tee)
    try:
        seen, answers = [], []
        handle = server.handle

        def tap(m):
            seen.append(m)
            answers.append(handle(m))
            return answers[-1]

        server.handle = tap
        for c in clients:
            assert c.transport.connect().backend == "simulated"
        _, ids, lengths, h1 = _h1(tiny_chat_dir)
        batch = {"input_ids": ids, "lengths": lengths, "labels": ids.clone()}
        losses = [c.train_step(batch) for c in clients]
        assert all(0 < x < 20 for x in losses)
        updates = [c.adapter_state() for c in clients]
        for c in clients:
            c.push_update(0, 4)
        assert all(c.pull_aggregate(0) for c in clients)
        mean = {k: (updates[0][k] + updates[1][k]) / 2 for k in updates[0]}
        for c in clients:
            for k, v in c.adapter_state().items():
                assert torch.allclose(v, mean[k], atol=1e-6), k
        for m in seen + answers:  # nothing of the clients' in the clear: only ciphertext and control
            assert isinstance(m, (EnclaveMessage, Control)), type(m)
        assert {m.of for m in seen if isinstance(m, EnclaveMessage)} == {"hello", "forward", "gradients", "update"}
        assert any(isinstance(m, EnclaveMessage) and m.of == "aggregate" for m in answers)
        assert "sealed_aggregator" in server.state_dict()  # the host checkpoints the averages sealed

        class Restarted:  # the transport reconnected mid-call to a restarted server, whose enclave knows no session
            def __init__(self, inner):
                self.inner, self.stats, self.epoch, self.hit = inner, inner.stats, inner.epoch, False

            def call(self, msg):
                if not self.hit and isinstance(msg, Control) and msg.command == "fetch_aggregate":
                    self.hit, self.epoch = True, self.epoch + 1
                    raise ProtocolError("server rejected control from client 1: client 1: no enclave session: "
                                        "handshake first")
                return self.inner.call(msg)

        hellos = sum(isinstance(m, EnclaveMessage) and m.of == "hello" for m in seen)
        clients[1].transport.inner = Restarted(clients[1].transport.inner)
        assert clients[1].pull_aggregate(0)  # a new session with the enclave, then the call again
        assert sum(isinstance(m, EnclaveMessage) and m.of == "hello" for m in seen) == hellos + 1
        with pytest.raises(ProtocolError, match="in the clear"):
            handle(ForwardActivations(0, 99, hidden=h1, lengths=lengths))
        with pytest.raises(ProtocolError, match="in the clear"):
            handle(Aggregation(0, 99, tensors=updates[0], num_examples=4, round=1))
        assert server.rejected["unsealed"] == 2
        assert 0 < clients[0].train_step(batch) < 20  # honest training unharmed
        assert server.steps == 3
        from silotune.generation import GenerateSettings, generate_ids, split_decoder

        seen.clear()  # generation in TEE mode: the whole prefix re-run through the sealed channel, no cache
        gen = generate_ids(split_decoder(clients[0], use_cache=False), ids, lengths, GenerateSettings(max_new_tokens=3),
                           eos_ids=set())
        assert [len(t) for t in gen.tokens] == [3] * len(lengths)
        assert seen and all(isinstance(m, EnclaveMessage) and m.of == "forward" and not m.train for m in seen)
    finally:
        server.runtime.close()


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
    runtime = enclave[0]
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
    """Real processes over TLS: the server's trunk in an enclave process that keeps it (``tee.release_trunk:
    false``: the server writes it sealed); a client expecting another enclave (its configuration differs)
    refuses it before sending anything; the honest clients attest it, seal their activations and gradients to it
    through the host, and train exactly like a plain simulation."""
    from .test_deploy import cli, finish, wait_listening

    path, port = deployment
    tee = ["--set", "tee.mode=server", "--set", "tee.worker=inprocess", "--set", "tee.release_trunk=false"]
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
    assert not (tmp_path / "net/server/trunk.safetensors").exists()
    assert (tmp_path / "net/server/trunk.sealed").read_bytes().startswith(b"SILOSEAL")
    for k in range(3):  # the clients' adapters equal the simulation's: so did every trunk step
        assert any(".layers.0." in name for name in load_file(tmp_path / f"net/client-{k}/adapters.safetensors"))
        for name, value in load_file(tmp_path / f"net/client-{k}/adapters.safetensors").items():
            assert torch.allclose(value, expected[name], atol=1e-5, rtol=0), name
    summary = json.loads((tmp_path / "net/server/summary.json").read_text())
    assert summary["tee"]["hardware_protection"] is False and summary["tee"]["masks_used"] > 0


def test_a_plain_server_refuses_enclave_messages(tiny_chat_dir, tmp_path):
    """An enclave hello (or sealed tensor) sent to a server whose trunk runs in no enclave is refused and counted."""
    from silotune.federation import build_server
    from silotune.tee.channel import as_tensor

    server = build_server(tiny_chat_dir, SplitSettings(1, 1), AdapterSettings(), OptimSettings(), 1, 0)
    hello = ClientHandshake(0, Identity.generate(), b"\0" * 32).hello
    with pytest.raises(ProtocolError, match="no enclave"):
        server.handle(EnclaveMessage(0, 0, of="hello", data=as_tensor(hello_bytes(hello))))
    assert server.rejected["unexpected"] == 1


def test_an_enclave_that_keeps_its_trunk_checkpoints_it_sealed(tiny_chat_dir, tmp_path):
    """``tee.release_trunk: false``: the checkpoint holds the trunk sealed (none of its adapters' bytes in the
    clear), through the server's checkpoint file; an enclave with the same measurement on the same platform
    resumes from it exactly; one built for another configuration cannot open it, an altered blob is refused, and
    the enclave refuses to restore a trunk given in the clear."""
    from silotune.server import checkpoint as ckpt
    from silotune.tee.channel import as_bytes

    platform = Ed25519PrivateKey.generate().private_bytes_raw()
    tee = TeeSettings(mode="server", worker="inprocess", release_trunk=False)
    limits = Boundary(Limits.unbounded(model_config(tiny_chat_dir)))

    def enclave_with(lr=1e-3):
        spec = enclave_spec(tiny_chat_dir, SplitSettings(1, 1), AdapterSettings(lora=LoraSettings(r=4, alpha=8)),
                            OptimSettings(lr=lr), 0, Compute.default(), tee, platform_key=platform, threads=1)
        return EnclaveRuntime(spec, limits, tee)

    _, _, lengths, h1 = _h1(tiny_chat_dir)
    first = enclave_with()
    try:
        for step in range(2):
            handle = first.forward([Part(0, step, h1, lengths)])
            first.backward(handle, {0: torch.randn_like(h1) * 1e-2})
        clear = first._call("state")["trunk"]  # (the test peeks inside; the host cannot)
        state = first.state_dict()
        assert set(state) == {"sealed_trunk", "steps"} and state["steps"] == 2
        blob = as_bytes(state["sealed_trunk"])
        lora = next(v for k, v in clear.items() if "lora_B" in k)
        assert lora.abs().sum() > 0 and lora.numpy().tobytes()[:32] not in blob
        ckpt.save(tmp_path / "checkpoint.pt", state)
        expected = first.infer(h1, lengths)
    finally:
        first.close()
    second = enclave_with()
    try:
        second.load_state_dict(ckpt.load(tmp_path / "checkpoint.pt"))
        assert second.steps == 2
        assert torch.allclose(second.infer(h1, lengths), expected, atol=1e-5)
        altered = bytearray(blob)
        altered[-1] ^= 1
        with pytest.raises(EnclaveError, match="does not open"):
            second.load_state_dict({"sealed_trunk": torch.frombuffer(altered, dtype=torch.uint8), "steps": 2})
        with pytest.raises(EnclaveError, match="in the clear"):
            second.load_state_dict({"trunk": clear, "optim": {}, "steps": 2})
    finally:
        second.close()
    other = enclave_with(lr=0.5)  # another configuration: another measurement, another sealing key
    try:
        with pytest.raises(EnclaveError, match="another measurement"):
            other.load_state_dict(state)
    finally:
        other.close()
