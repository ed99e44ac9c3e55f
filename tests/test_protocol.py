"""Messages survive the codec; the server rejects malformed or out-of-order traffic."""

import time

import pytest
import torch

from silotune.adapters import AdapterSettings
from silotune.errors import ProtocolError
from silotune.federation import SplitSettings, build_server
from silotune.protocol import Aggregation, Control, ForwardActivations, Gradients, decode, encode
from silotune.server.schedules import Sequential
from silotune.train.optim import OptimSettings


def test_roundtrip_keeps_dtype_shape_and_values():
    h = torch.randn(2, 5, 8)
    msg = ForwardActivations(3, 7, hidden=h, lengths=torch.tensor([5, 2]), train=False)
    out = decode(encode(msg))
    assert isinstance(out, ForwardActivations) and out.client == 3 and out.step == 7 and out.train is False
    assert torch.equal(out.hidden, h) and out.lengths.dtype == torch.int64
    agg = decode(encode(Aggregation(1, 2, tensors={"a.b": torch.ones(3)}, num_examples=9, round=4)))
    assert agg.num_examples == 9 and agg.round == 4 and torch.equal(agg.tensors["a.b"], torch.ones(3))


def test_bf16_on_the_wire_halves_the_bytes():
    msg = Gradients(0, 1, grad=torch.randn(4, 64, 128))
    fp32, bf16 = len(encode(msg)), len(encode(msg, torch.bfloat16))
    assert bf16 < 0.51 * fp32
    assert decode(encode(msg, torch.bfloat16)).grad.dtype == torch.float32


@pytest.mark.parametrize("blob", [b"", b"\x05\x00\x00\x00\x00\x00\x00\x00{nope", b"x" * 64])
def test_malformed_bytes(blob):
    with pytest.raises(ProtocolError):
        decode(blob)


@pytest.fixture
def server(tiny_dirs):
    return build_server(tiny_dirs["llama"], SplitSettings(1, 1), AdapterSettings(), OptimSettings(), 2, 0)


def fwd(client=0, step=1, shape=(2, 4, 32), lengths=(4, 2)):
    return ForwardActivations(client, step, hidden=torch.randn(*shape), lengths=torch.tensor(lengths))


@pytest.mark.parametrize("msg,match", [
    (fwd(client=5), "unknown client"),
    (fwd(shape=(2, 4, 31)), "activations must be"),
    (fwd(lengths=(4, 9)), "lengths outside"),
    (fwd(lengths=(4,)), "lengths must be"),
    (ForwardActivations(0, 1, hidden=torch.ones(2, 4, 32, dtype=torch.long), lengths=torch.tensor([4, 2])),
     "floating point"),
    (Gradients(0, 1, grad=torch.randn(2, 4, 32)), "no forward pass pending"),
    (Control(0, 1, command="dance"), "unexpected control"),
])
def test_server_rejects(server, msg, match):
    with pytest.raises(ProtocolError, match=match):
        server.handle(msg)


def test_server_rejects_wrong_step_and_shape_then_keeps_serving(server):
    server.handle(fwd())
    with pytest.raises(ProtocolError, match="no forward pass pending"):
        server.handle(Gradients(0, 2, grad=torch.randn(2, 4, 32)))
    with pytest.raises(ProtocolError, match="gradient must"):
        server.handle(Gradients(0, 1, grad=torch.randn(2, 3, 32)))
    with pytest.raises(ProtocolError, match="gradient must"):
        server.handle(Gradients(0, 1, grad=torch.ones(2, 4, 32, dtype=torch.long)))
    reply = server.handle(Gradients(0, 1, grad=torch.randn(2, 4, 32)))
    assert reply.grad.shape == (2, 4, 32) and server.steps == 1


def test_a_client_asking_for_a_forgotten_round_gets_the_newest_average(server):
    newest = {k: v + 1 for k, v in server.aggregator.start.items()}
    server.aggregator.load_state_dict({"round": 5, "aggregate": newest})  # rounds 0..4 closed and forgotten
    reply = server.handle(Control(0, 1, command="fetch_aggregate", payload={"round": 1}))
    assert isinstance(reply, Aggregation) and reply.round == 5
    assert all(torch.equal(reply.tensors[k], v) for k, v in newest.items())
    assert server.handle(Control(0, 1, command="fetch_aggregate", payload={"round": 6})).command == "not_ready"


def test_a_holder_out_of_the_rotation_is_not_dropped_twice():
    schedule = Sequential(1, None, timeout=0.01)
    time.sleep(0.02)
    schedule.check_stale()
    time.sleep(0.02)
    schedule.check_stale()
    assert schedule.dropped == [0]
