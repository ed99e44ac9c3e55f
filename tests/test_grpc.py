"""The gRPC transport over loopback: same results as in-process, TLS + AEAD, hostile input rejected."""

import grpc
import pytest
import torch

from silotune.adapters import AdapterSettings, LoraSettings
from silotune.crypto import CryptoError, Identity
from silotune.crypto.certs import make_tls
from silotune.errors import ProtocolError
from silotune.federation import SplitSettings, build_parties, build_server
from silotune.protocol import ForwardActivations, encode
from silotune.train.batching import collate
from silotune.train.optim import OptimSettings
from silotune.transport.grpc_client import GrpcTransport
from silotune.transport.grpc_server import SiloTuneServicer, start_server
from silotune.transport.proto import silotune_pb2 as pb
from silotune.transport.proto import silotune_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def keys():
    return {"server": Identity.generate(), 0: Identity.generate(), 1: Identity.generate(),
            "tls": make_tls(["localhost", "127.0.0.1"], n_clients=1)}


def batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [collate([(torch.randint(3, 128, (7,), generator=g).tolist(), [-100] * 4 + [5, 6, 7])
                     for _ in range(3)], 0) for _ in range(n)]


def train(model_dir, connect, n_clients=2, steps=3):
    server, clients = build_parties(model_dir, SplitSettings(1, 1), AdapterSettings(lora=LoraSettings(r=2)),
                                    OptimSettings(lr=1e-2), n_clients, seed=0, connect=connect)
    data = batches(steps * n_clients)
    losses = []
    for s in range(steps):
        for c in clients:
            losses.append(c.train_step(data[s * n_clients + c.id]))
    for c in clients:
        c.push_update(0, 10 + c.id)
    for c in clients:
        assert c.pull_aggregate(0)
    return server, clients, losses


class Deployment:
    def __init__(self, keys, tls=True):
        self.keys, self.tls = keys, tls
        self.servers = []

    def connect(self, trunk_server):
        if not self.servers:
            self.servicer = SiloTuneServicer(trunk_server, self.keys["server"],
                                             {0: self.keys[0].public, 1: self.keys[1].public})
            tls = (self.keys["tls"]["server.crt"], self.keys["tls"]["server.key"]) if self.tls else None
            server, self.port = start_server(self.servicer, "127.0.0.1:0", tls)
            self.servers.append(server)
        cid = len(getattr(self, "transports", []))
        t = GrpcTransport(f"localhost:{self.port}", cid, self.keys[cid], self.keys["server"].public,
                          tls_root=self.keys["tls"]["ca.crt"] if self.tls else None, retries=0, timeout=30)
        self.transports = [*getattr(self, "transports", []), t]
        return t

    def stop(self):
        for s in self.servers:
            s.stop(0)


def test_grpc_training_equals_in_process(tiny_dirs, keys):
    dep = Deployment(keys)
    try:
        _, net_clients, net_losses = train(tiny_dirs["llama"], dep.connect)
        _, sim_clients, sim_losses = train(tiny_dirs["llama"], None)
        assert net_losses == pytest.approx(sim_losses, abs=1e-6)
        for a, b in zip(net_clients, sim_clients):
            for k, v in a.adapter_state().items():
                assert torch.allclose(v, b.adapter_state()[k], atol=1e-6)
        assert all(t.stats.bytes_up > 0 for t in dep.transports)
    finally:
        dep.stop()


@pytest.fixture
def live(tiny_dirs, keys):
    dep = Deployment(keys, tls=False)
    server, clients = build_parties(tiny_dirs["llama"], SplitSettings(1, 1), AdapterSettings(), OptimSettings(),
                                    2, seed=0, connect=dep.connect, client_timeout=1.0)
    yield dep, server, clients
    dep.stop()


def test_client_with_unenrolled_key_is_refused(live, keys):
    dep, _, _ = live
    t = GrpcTransport(f"127.0.0.1:{dep.port}", 0, Identity.generate(), keys["server"].public, retries=0)
    with pytest.raises(CryptoError, match="bad signature"):
        t.call(ForwardActivations(0, 1, hidden=torch.zeros(1, 2, 32), lengths=torch.tensor([2])))
    assert dep.servicer.rejected["handshake"] == 1
    stranger = GrpcTransport(f"127.0.0.1:{dep.port}", 9, Identity.generate(), keys["server"].public, retries=0)
    with pytest.raises(CryptoError, match="unknown client 9"):
        stranger.call(ForwardActivations(9, 1, hidden=torch.zeros(1, 2, 32), lengths=torch.tensor([2])))
    assert dep.servicer.rejected["handshake"] == 2


def test_tampered_and_replayed_messages_are_rejected_and_others_keep_training(live, keys):
    dep, server, clients = live
    stub = pb_grpc.SiloTuneStub(grpc.insecure_channel(f"127.0.0.1:{dep.port}"))
    attacker_view = GrpcTransport(f"127.0.0.1:{dep.port}", 0, keys[0], keys["server"].public, retries=0)
    attacker_view.connect()
    session = attacker_view.session

    def send(envelope):
        return list(stub.Exchange(iter([pb.Chunk(client_id=0, session_id=session.session_id, data=envelope,
                                                 last=True)])))

    msg = encode(ForwardActivations(0, 1, hidden=torch.randn(2, 4, 32), lengths=torch.tensor([4, 3])))
    genuine = session.seal(msg, 1)
    tampered = genuine[:-1] + bytes([genuine[-1] ^ 1])
    with pytest.raises(grpc.RpcError) as err:
        send(tampered)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and dep.servicer.rejected["crypto"] == 1
    assert send(genuine)  # the untampered original is accepted once...
    with pytest.raises(grpc.RpcError) as err:
        send(genuine)  # ...and its replay is not
    assert "replayed" in err.value.details() and dep.servicer.rejected["crypto"] == 2
    session.seal(msg, 2)  # sealed but never sent: the next one arrives out of order
    later = session.seal(msg, 3)
    with pytest.raises(grpc.RpcError, match="out-of-order"):
        send(later)
    clients[1].train_step(batches(1)[0])  # the other client goes on (client 0 timed out mid-step)
    assert server.steps == 1 and dep.servicer.rejected["crypto"] == 3
    assert server.schedule.dropped == [0] and 0 not in server.schedule.pending


def test_wrong_shape_is_rejected_with_a_clear_error(live):
    dep, server, clients = live
    with pytest.raises(ProtocolError, match="activations must be"):
        clients[0].transport.call(ForwardActivations(0, 1, hidden=torch.zeros(1, 2, 7), lengths=torch.tensor([2])))
    assert dep.servicer.refusals()["shape"] == 1
    clients[0].train_step(batches(1)[0])
    assert server.steps == 1


def test_a_client_cannot_speak_for_another(live):
    dep, _, clients = live
    with pytest.raises(ProtocolError, match="claiming to be client 1"):
        clients[0].transport.call(ForwardActivations(1, 1, hidden=torch.zeros(1, 2, 32), lengths=torch.tensor([2])))


def test_payload_above_grpc_limit_is_streamed_in_chunks(live):
    dep, server, clients = live
    big = torch.randn(256, 256, 32)  # 8 MiB of fp32 activations: twice gRPC's default message limit
    reply = clients[0].transport.call(ForwardActivations(0, 1, hidden=big, lengths=torch.full((256,), 256),
                                                          train=False))
    assert reply.hidden.shape == big.shape and clients[0].transport.stats.bytes_up > 8 << 20


def test_oversized_message_is_refused(live):
    dep, server, clients = live
    dep.servicer.limit = 1 << 20
    with pytest.raises(ProtocolError, match="larger than"):
        clients[0].transport.call(ForwardActivations(0, 1, hidden=torch.randn(8, 1024, 32),
                                                     lengths=torch.full((8,), 1024), train=False))
    assert dep.servicer.rejected["oversized"] == 1
    dep.servicer.limit = 512 << 20
    clients[0].train_step(batches(1)[0])


def test_mutual_tls_refuses_a_client_without_certificate(tiny_dirs, keys):
    server = build_server(tiny_dirs["llama"], SplitSettings(1, 1), AdapterSettings(), OptimSettings(), 1, 0)
    servicer = SiloTuneServicer(server, keys["server"], {0: keys[0].public})
    tls = keys["tls"]
    grpc_server, port = start_server(servicer, "127.0.0.1:0", (tls["server.crt"], tls["server.key"]),
                                     client_ca=tls["ca.crt"])
    try:
        msg = ForwardActivations(0, 1, hidden=torch.zeros(1, 2, 32), lengths=torch.tensor([2]), train=False)
        anonymous = GrpcTransport(f"localhost:{port}", 0, keys[0], keys["server"].public, tls_root=tls["ca.crt"],
                                  retries=0, timeout=10)
        with pytest.raises(ProtocolError, match="unreachable"):
            anonymous.call(msg)
        holder = GrpcTransport(f"localhost:{port}", 0, keys[0], keys["server"].public, tls_root=tls["ca.crt"],
                               retries=0, timeout=10, tls_client=(tls["client-0.crt"], tls["client-0.key"]))
        assert holder.call(msg).hidden.shape == (1, 2, 32)
    finally:
        grpc_server.stop(0)
