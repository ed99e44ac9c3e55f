"""Hostile bytes: the codec, the AEAD session and the chunk joiner raise only their own errors.

Property tests (hypothesis) feed random bytes, random JSON headers and mutations of valid
encodings and envelopes to every parser that reads from the network. The only allowed
outcomes are acceptance or the project's error type (ProtocolError for the codec and the
joiner, CryptoError for the session); an accepted message has fields of the right types,
a mutated envelope never opens and a join returns exactly its pieces' bytes. A set of
fixed inputs pins each class of crash the fuzzer found. ``benchmarks/fuzz.py`` runs the
same targets at scale.
"""

import json
import mmap
import struct

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from silotune.crypto.handshake import ClientHandshake, server_accept
from silotune.crypto.identity import CryptoError, Identity
from silotune.crypto.session import AeadSession
from silotune.errors import ProtocolError
from silotune.protocol import Aggregation, Control, ForwardActivations, Gradients, ReturnedActivations, decode, encode
from silotune.transport import chunking

FAST = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ---------- strategies ----------

json_scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12)
json_values = st.recursive(json_scalars, lambda kids: st.lists(kids, max_size=4)
                           | st.dictionaries(st.text(max_size=8), kids, max_size=4), max_leaves=12)


@st.composite
def tensors(draw, kinds=("f32", "i64", "bool")):
    shape = draw(st.lists(st.integers(0, 4), max_size=3))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    kind = draw(st.sampled_from(kinds))
    if kind == "i64":
        return torch.randint(-2**40, 2**40, shape, generator=gen)
    if kind == "bool":
        return torch.rand(shape, generator=gen) < 0.5
    return torch.randn(shape, generator=gen)


clients, steps = st.integers(0, 2**31 - 1), st.integers(0, 2**62)
optional_tensor = st.none() | tensors()
payload_values = (st.none() | st.booleans() | st.integers(-2**53, 2**53) | st.text(max_size=20)
                  | st.floats(allow_nan=False, allow_infinity=False))
messages = st.one_of(
    st.builds(ForwardActivations, clients, steps, hidden=optional_tensor, lengths=optional_tensor,
              train=st.booleans()),
    st.builds(ReturnedActivations, clients, steps, hidden=optional_tensor),
    st.builds(Gradients, clients, steps, grad=optional_tensor),
    st.builds(Aggregation, clients, steps, tensors=st.dictionaries(st.text(max_size=20), tensors(), max_size=4),
              num_examples=st.integers(0, 2**62), round=st.integers(0, 2**31)),
    st.builds(Control, clients, steps, command=st.text(max_size=64),
              payload=st.dictionaries(st.text(max_size=10).filter(lambda k: k != "round"), payload_values,
                                      max_size=15)
              | st.fixed_dictionaries({"round": st.integers(-1, 2**31)})),
)

EXPECTED = {"client": int, "step": int, "round": int, "num_examples": int, "train": bool, "command": str,
            "payload": dict, "tensors": dict, "hidden": (torch.Tensor, type(None)),
            "lengths": (torch.Tensor, type(None)), "grad": (torch.Tensor, type(None)), "cache": int, "past": int}


def assert_well_typed(msg):
    """Independent of the library's own check: each field has the type its message declares."""
    for name, value in vars(msg).items():
        assert isinstance(value, EXPECTED[name]), (name, value)
        assert not (isinstance(value, bool) and EXPECTED[name] is int), (name, value)
    assert 0 <= msg.client < 2**31 and 0 <= msg.step <= 2**62
    if isinstance(msg, ForwardActivations):
        assert 0 <= msg.cache < 2**31 and 0 <= msg.past < 2**31
    if isinstance(msg, Aggregation):
        assert all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in msg.tensors.items())
    if isinstance(msg, Control):
        assert all(isinstance(k, str) and (v is None or isinstance(v, (bool, int, float, str)))
                   for k, v in msg.payload.items())


def decode_or_refuse(blob: bytes) -> None:
    try:
        msg = decode(blob)
    except ProtocolError:
        return
    assert_well_typed(msg)


def frame(header, data: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def split_blob(blob: bytes) -> tuple[dict, dict, bytes]:
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    return header, json.loads(header["__metadata__"]["fields"]), blob[8 + n:]


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


# ---------- codec ----------

@FAST
@given(st.binary(max_size=300) | st.builds(lambda h, d: frame(h, d), json_values, st.binary(max_size=32))
       | st.builds(lambda m, d: frame({"__metadata__": m}, d), json_values, st.binary(max_size=32)))
def test_random_bytes_and_headers_only_raise_protocol_error(blob):
    decode_or_refuse(blob)


@st.composite
def mutated_encodings(draw):
    blob = encode(draw(messages))
    how = draw(st.sampled_from(["flip", "truncate", "extend", "splice", "length", "field", "drop", "entry",
                                "kind", "fields_text"]))
    if how == "flip":
        out = bytearray(blob)
        for i in draw(st.lists(st.integers(0, len(blob) - 1), min_size=1, max_size=6)):
            out[i] ^= 1 << draw(st.integers(0, 7))
        return bytes(out)
    if how == "truncate":
        return blob[:draw(st.integers(0, len(blob) - 1))]
    if how == "extend":
        return blob + draw(st.binary(min_size=1, max_size=32))
    if how == "splice":
        other = encode(draw(messages))
        return blob[:draw(st.integers(0, len(blob)))] + other[draw(st.integers(0, len(other))):]
    if how == "length":
        return struct.pack("<Q", draw(st.integers(0, 2**64 - 1))) + blob[8:]
    header, fields, data = split_blob(blob)
    meta = header["__metadata__"]
    names = [k for k in header if k != "__metadata__"]
    if how == "field" or not names and how == "entry":
        fields[draw(st.sampled_from(sorted(fields) + ["bogus", "hidden", "tensors"]))] = draw(
            json_values | st.fixed_dictionaries({"__tensors__": json_values}))
    elif how == "drop":
        del fields[draw(st.sampled_from(sorted(fields)))]
    elif how == "entry":
        entry = header[draw(st.sampled_from(names))]
        key = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        entry[key] = draw(json_values | st.sampled_from(["F4", "F6_E2M3", "C64", "U64", "F8_E5M2"])
                          | st.lists(st.integers(-1, 2**64 - 1), max_size=10))
    elif how == "kind":
        meta["kind"] = draw(json_values | st.sampled_from(["forward", "returned", "gradients", "aggregation",
                                                           "control"]))
    else:
        meta["fields"] = draw(json_values)
    if how != "fields_text":
        meta["fields"] = json.dumps(fields)
    return frame(header, data)


@FAST
@given(mutated_encodings())
def test_mutated_encodings_only_raise_protocol_error_or_decode_well_typed(blob):
    decode_or_refuse(blob)


@FAST
@given(messages, st.sampled_from([torch.float32, torch.bfloat16]))
def test_valid_messages_round_trip_and_re_encode_to_the_same_blob(msg, wire):
    blob = encode(msg, wire)
    out = decode(blob)
    assert type(out) is type(msg)
    assert_well_typed(out)
    if wire == torch.float32:
        assert all(same(getattr(out, k), v) for k, v in vars(msg).items())
    again = split_blob(encode(out, wire))  # same header and bytes (safetensors orders metadata keys at random)
    assert again == split_blob(blob)


# ---------- AEAD session ----------

IDENTITIES = Identity.generate(), Identity.generate()


def session_pair() -> tuple[AeadSession, AeadSession]:
    client_key, server_key = IDENTITIES
    handshake = ClientHandshake(3, client_key, server_key.public)
    reply, server_keys = server_accept(handshake.hello, server_key, {3: client_key.public})
    return AeadSession(handshake.finish(reply), "client"), AeadSession(server_keys, "server")


@FAST
@given(st.binary(max_size=200) | st.binary(min_size=24, max_size=200).map(lambda b: bytes(8) + b))
def test_random_envelopes_only_raise_crypto_error(envelope):
    """Pure random bytes, and random bytes behind the expected sequence number (on to the tag check)."""
    _, server = session_pair()
    with pytest.raises(CryptoError):
        server.open(envelope)


@st.composite
def envelope_mutations(draw, genuine: bytes, older: bytes):
    how = draw(st.sampled_from(["flip", "truncate", "extend", "splice", "header"]))
    if how == "flip":
        out = bytearray(genuine)
        for i in draw(st.lists(st.integers(0, len(genuine) - 1), min_size=1, max_size=4)):
            out[i] ^= 1 << draw(st.integers(0, 7))
        return bytes(out)
    if how == "truncate":
        return genuine[:draw(st.integers(0, len(genuine) - 1))]
    if how == "extend":
        return genuine + draw(st.binary(min_size=1, max_size=16))
    if how == "splice":
        return genuine[:draw(st.integers(0, len(genuine)))] + older[draw(st.integers(0, len(older))):]
    return struct.pack(">QQ", draw(st.integers(0, 3)), draw(st.integers(0, 2**64 - 1))) + genuine[16:]


@FAST
@given(st.data(), st.binary(max_size=64), st.integers(0, 2**62))
def test_mutated_envelopes_never_open_and_the_session_survives(data, plaintext, step):
    client, server = session_pair()
    older = client.seal(b"first", 0)
    server.open(older)
    genuine = client.seal(plaintext, step)
    for _ in range(3):
        forged = data.draw(envelope_mutations(genuine, older))
        assume(forged != genuine)
        with pytest.raises(CryptoError):
            server.open(forged)
    with pytest.raises(CryptoError, match="replayed"):
        server.open(older)
    assert server.open(genuine) == (plaintext, step)


def test_oversized_envelope_is_refused_before_decryption():
    """Past 2**31 - 1 bytes the AES-GCM backend panics (a BaseException); the session refuses first."""
    _, server = session_pair()
    with mmap.mmap(-1, 16 + 2**31) as huge:  # untouched anonymous pages: no real memory
        with pytest.raises(CryptoError, match="too large"):
            server.open(huge)


# ---------- chunk joiner ----------

def reference_join(pieces, limit):
    out = b""
    for piece, last in pieces:
        out += piece
        if len(out) > limit:
            return None
        if last:
            return out
    return None


@FAST
@given(st.lists(st.tuples(st.binary(max_size=40), st.booleans()), max_size=12)
       | st.builds(lambda d, n: list(chunking.split(d, n)), st.binary(max_size=300), st.integers(1, 64)),
       st.integers(0, 400))
def test_join_returns_exactly_the_pieces_or_protocol_error(pieces, limit):
    want = reference_join(pieces, limit)
    if want is None:
        with pytest.raises(ProtocolError):
            chunking.join(iter(pieces), limit)
    else:
        assert chunking.join(iter(pieces), limit) == want


# ---------- each class of crash the fuzzer found, pinned ----------

def meta(kind="gradients", fields=None, **entries):
    return {"__metadata__": {"kind": kind, "fields": json.dumps(fields or {"client": 0, "step": 0})}, **entries}


GRAD = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}


A = {"client": 0, "step": 0}  # the required fields
CASES = {  # id: (blob, expected message); the comment says what the unhardened decoder did
    "header-list": (frame([1]), "not a JSON object"),  # AttributeError
    "metadata-null": (frame({"__metadata__": None}), "no metadata object"),  # AttributeError
    "kind-list": (frame({"__metadata__": {"kind": ["x"]}}), "unknown message kind"),  # TypeError (unhashable)
    "deep-nesting": (struct.pack("<Q", 100_000) + b"[" * 100_000, "not valid JSON"),  # RecursionError
    "fields-list": (frame(meta(fields=[1])), "not a JSON object"),  # AttributeError
    "tensor-list-int": (frame(meta("aggregation", {**A, "tensors": {"__tensors__": 5}})), "tensor list"),  # TypeError
    "tensor-list-missing": (frame(meta("aggregation", {**A, "tensors": {"__tensors__": ["a"]}})),
                            "missing tensor 'a'"),  # KeyError
    "dtype-f6": (frame(meta(grad={**GRAD, "dtype": "F6_E2M3"}), bytes(4)), "unsupported dtype"),  # KeyError
    "dtype-complex": (frame(meta(grad={**GRAD, "dtype": "C64", "data_offsets": [0, 8]}), bytes(8)),
                      "unsupported dtype"),  # accepted a complex tensor
    "shape-2**63": (frame(meta(grad={**GRAD, "shape": [2**63, 0], "data_offsets": [0, 0]})),
                    "impossible shape"),  # TypeError from torch.empty
    "shape-stride-overflow": (frame(meta(grad={**GRAD, "shape": [2**31 - 1] * 7 + [0], "data_offsets": [0, 0]})),
                              "impossible shape"),
    "length-past-end": (struct.pack("<Q", 2**63) + b"{}", "runs past the end"),
    "duplicate-key": (b"\x1a\x00\x00\x00\x00\x00\x00\x00" + b'{"a": {}, "a": {}, "b": 1}', "key 'a' twice"),
    "unknown-field": (frame(meta(fields={**A, "train": True})), "unknown field 'train'"),
    "round-str": (frame(meta("aggregation", {**A, "round": "x"})),
                  "field 'round' must be an integer, got 'x'"),  # accepted
    "train-str": (frame(meta("forward", {**A, "train": "yes"})), "field 'train' must be true or false"),  # accepted
    "client-bool": (frame(meta("forward", {"client": True, "step": 0})), "field 'client' must be an integer"),
    "client-negative": (frame(meta("forward", {"client": -1, "step": 0})), "field 'client' must be between"),
    "payload-round-str": (frame(meta("control", {**A, "payload": {"round": "x"}})),
                          "entry 'round' must be an integer"),  # accepted; the server's int() raised ValueError
    "payload-list": (frame(meta("control", {**A, "payload": {"a": [1]}})), "must be a JSON scalar"),
    "command-long": (frame(meta("control", {**A, "command": "x" * 65})), "at most 64 characters"),
    "command-surrogate": (frame(meta("control", {**A, "command": "\ud800"})), "lone surrogate"),
    "grad-float": (frame(meta("gradients", {**A, "grad": 1.5})), "field 'grad' must be a tensor"),
    "grad-twice": (frame(meta("gradients", {**A, "grad": None}, grad=GRAD), bytes(4)), "sent twice"),
    "client-missing": (frame(meta("gradients", {"step": 0})), "field 'client' is missing"),
    "tensor-unknown-field": (frame(meta("gradients", A, hidden=GRAD), bytes(4)), "unknown field 'hidden'"),
}


@pytest.mark.parametrize("blob,match", CASES.values(), ids=CASES.keys())
def test_crafted_blob_is_a_protocol_error(blob, match):
    with pytest.raises(ProtocolError, match=match):
        decode(blob)
