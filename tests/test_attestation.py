"""Enclave attestation: a quote binds the enclave's measurement to its handshake key and the client's challenge.

The attacker in most of these tests is the host running a (simulated) enclave: it holds the server's
identity key, so it can sign any server hello, but not the platform key, and not the enclave's ephemeral
secret. Only the quote check stands between it and the client's keys.
"""

import dataclasses
import logging
import os
import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from silotune.crypto import AeadSession, ClientHandshake, CryptoError, Identity, ServerHello, server_accept
from silotune.tee.attestation import (
    MAX_EVIDENCE,
    MAX_QUOTE,
    SILOTUNE_ROOT,
    AttestationError,
    AttestationPolicy,
    Attester,
    Quote,
    SimulatedBackend,
    SimulatedVerifier,
    enclave_code_files,
    measurement,
    report_data,
    verify_quote,
)

CONFIG = {"model": "smollm2-135m", "method": "lora", "rank": 8, "targets": ["q_proj", "v_proj"]}


@pytest.fixture(scope="module")
def platform_key():
    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def platform(platform_key):
    return SimulatedBackend(platform_key)


@pytest.fixture(scope="module")
def ids():
    return {"server": Identity.generate(), 0: Identity.generate()}


@pytest.fixture(scope="module")
def expected():
    return measurement(enclave_code_files(), CONFIG)


@pytest.fixture
def policy(platform, expected):
    return AttestationPolicy(platform.verifier(), expected)


def handshake(ids, enclave, attestation):
    """A client hello, and the server's (enclave's) answer to it."""
    hs = ClientHandshake(0, ids[0], ids["server"].public, attestation=attestation)
    reply, server_keys = server_accept(hs.hello, ids["server"], {0: ids[0].public}, enclave=enclave)
    return hs, reply, server_keys


def host_signed(ids, hs, reply, **changes) -> ServerHello:
    """What a host holding the server's identity key can send: any fields, correctly signed."""
    forged = dataclasses.replace(reply, **changes)
    forged.signature = ids["server"].sign(forged.signed_part(hs.hello))
    return forged


def raw_x25519() -> bytes:
    return X25519PrivateKey.generate().public_key().public_bytes(serialization.Encoding.Raw,
                                                                 serialization.PublicFormat.Raw)


# ---------- the good path ----------

def test_good_quote_verifies_and_both_sides_derive_the_same_keys(ids, platform, expected, policy):
    hs, reply, server_keys = handshake(ids, Attester(platform, expected), policy)
    quote = Quote.from_bytes(reply.quote)
    assert quote.backend == "simulated" and quote.measurement == expected
    verify_quote(quote, platform.verifier(), expected, reply.ephemeral, hs.hello.nonce)
    client_keys = hs.finish(reply)
    assert client_keys == server_keys
    c, s = AeadSession(client_keys, "client"), AeadSession(server_keys, "server")
    assert s.open(c.seal(b"h1", 0)) == (b"h1", 0)
    assert c.open(s.seal(b"h2", 0)) == (b"h2", 0)


def test_quote_round_trips_through_bytes(platform, expected):
    quote = Attester(platform, expected).quote(raw_x25519(), os.urandom(16))
    assert Quote.from_bytes(quote.to_bytes()) == quote


def test_the_quote_is_signed_as_part_of_the_transcript(ids, platform, expected):
    """A client that does not require attestation still talks to an enclave; a host stripping the quote breaks
    the server's signature."""
    hs, reply, server_keys = handshake(ids, Attester(platform, expected), None)
    assert hs.finish(reply) == server_keys
    hs, reply, _ = handshake(ids, Attester(platform, expected), None)
    with pytest.raises(CryptoError, match="bad signature"):
        hs.finish(dataclasses.replace(reply, quote=b""))


# ---------- refusals ----------

def test_enclave_with_another_measurement_is_refused(ids, platform, expected, policy):
    other = measurement(enclave_code_files(), {**CONFIG, "rank": 16})
    hs, reply, _ = handshake(ids, Attester(platform, other), policy)
    with pytest.raises(AttestationError, match="measurement") as exc:
        hs.finish(reply)
    assert other.hex()[:16] in str(exc.value) and expected.hex()[:16] in str(exc.value)


def test_quote_over_a_different_key_is_refused(ids, platform, expected, policy):
    """The host keeps the enclave's genuine quote but puts its own ephemeral key in the hello."""
    hs, reply, _ = handshake(ids, Attester(platform, expected), policy)
    forged = host_signed(ids, hs, reply, ephemeral=raw_x25519())
    with pytest.raises(AttestationError, match="different key"):
        hs.finish(forged)


def test_replayed_quote_is_refused(ids, platform, expected, policy):
    """A quote (and ephemeral key) from an earlier handshake, presented for a new client's challenge."""
    earlier, old_reply, _ = handshake(ids, Attester(platform, expected), policy)
    old_quote = Quote.from_bytes(old_reply.quote)
    verify_quote(old_quote, platform.verifier(), expected, old_reply.ephemeral, earlier.hello.nonce)  # genuine
    hs = ClientHandshake(0, ids[0], ids["server"].public, attestation=policy)
    replay = host_signed(ids, hs, ServerHello(os.urandom(16), old_reply.ephemeral, os.urandom(16)),
                         quote=old_reply.quote)
    with pytest.raises(AttestationError, match="replayed"):
        hs.finish(replay)
    with pytest.raises(AttestationError, match="replayed"):
        verify_quote(old_quote, platform.verifier(), expected, old_reply.ephemeral, hs.hello.nonce)


def test_quote_signed_by_another_platform_key_is_refused(ids, expected, policy):
    rogue = SimulatedBackend.generate()
    hs, reply, _ = handshake(ids, Attester(rogue, expected), policy)
    with pytest.raises(AttestationError, match="bad platform signature"):
        hs.finish(reply)


def test_quote_from_another_backend_is_refused(platform_key, expected, policy):
    """Signed by the trusted key, but claiming to come from another backend."""

    class Other(SimulatedBackend):
        name = "sgx-gramine"

    eph, challenge = raw_x25519(), os.urandom(16)
    quote = Attester(Other(platform_key), expected).quote(eph, challenge)
    with pytest.raises(AttestationError, match="backend 'sgx-gramine'"):
        policy.check(quote.to_bytes(), eph, challenge)


def test_every_tampered_byte_is_refused(platform, expected, policy):
    eph, challenge = raw_x25519(), os.urandom(16)
    genuine = Attester(platform, expected).quote(eph, challenge).to_bytes()
    policy.check(genuine, eph, challenge)
    for i in range(len(genuine)):
        for bit in (0x01, 0x80):
            tampered = bytearray(genuine)
            tampered[i] ^= bit
            with pytest.raises(AttestationError):
                policy.check(bytes(tampered), eph, challenge)


def _mutations(genuine: bytes):
    """Each malformed input, and the reason the parser must give for refusing it."""
    head = b"STQ1" + bytes([9]) + b"simulated" + bytes(64)
    return {
        "empty": (b"", "bad magic"),
        "magic only": (b"STQ1", "truncated in the backend name length"),
        "bad magic": (b"XXXX" + genuine[4:], "bad magic"),
        "truncated": (genuine[:-1], "truncated in the signature"),
        "trailing byte": (genuine + b"\0", "1 bytes after its end"),
        "empty backend name": (b"STQ1" + bytes([0]) + genuine[14:], "backend name ''"),
        "upper-case backend name": (b"STQ1" + bytes([9]) + b"SIMULATED" + genuine[14:], "backend name 'SIMULATED'"),
        "non-ASCII backend name": (b"STQ1" + bytes([9]) + b"simulat\xc3\xa9" + genuine[14:], "not ASCII"),
        "oversized signature length": (head + (MAX_EVIDENCE + 1).to_bytes(4, "big") + bytes(16),
                                       f"signature of {MAX_EVIDENCE + 1} bytes, at most"),
        "oversized quote": (genuine + bytes(MAX_QUOTE), f"bytes, at most {MAX_QUOTE}"),
        "not bytes": (genuine.hex(), "expected bytes, got str"),
    }


@pytest.mark.parametrize("case", list(_mutations(b"")))
def test_malformed_quote_bytes_are_refused(platform, expected, case):
    genuine = Attester(platform, expected).quote(raw_x25519(), os.urandom(16)).to_bytes()
    assert genuine[4:14] == bytes([9]) + b"simulated"
    data, reason = _mutations(genuine)[case]
    with pytest.raises(AttestationError, match="malformed quote") as exc:
        Quote.from_bytes(data)
    assert reason in str(exc.value)


def test_malformed_quote_in_a_server_hello_is_refused(ids, platform, expected, policy):
    hs, reply, _ = handshake(ids, Attester(platform, expected), policy)
    with pytest.raises(AttestationError, match="malformed quote"):
        hs.finish(host_signed(ids, hs, reply, quote=reply.quote + b"\0"))


def test_client_requiring_attestation_refuses_a_hello_without_quote(ids, policy):
    hs, reply, _ = handshake(ids, None, policy)
    assert reply.quote == b""
    with pytest.raises(AttestationError, match="no enclave quote"):
        hs.finish(reply)


# ---------- the simulated backend says what it is ----------

def test_simulated_backend_says_it_gives_no_hardware_protection(platform, expected, policy, caplog):
    assert platform.hardware_protection is False and platform.verifier().hardware_protection is False
    assert "simulated enclave: separate OS process, no hardware protection" in platform.describe()
    eph, challenge = raw_x25519(), os.urandom(16)
    with caplog.at_level(logging.WARNING, logger="silotune.tee.attestation"):
        policy.check(Attester(platform, expected).quote(eph, challenge).to_bytes(), eph, challenge)
    assert "no hardware protection" in caplog.text


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_platform_key_file_round_trips_and_is_permission_checked(tmp_path, platform):
    path = tmp_path / "platform.pem"
    platform.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = SimulatedBackend.load(path)
    assert loaded.public_key == platform.public_key
    eph, challenge = raw_x25519(), os.urandom(16)
    quote = loaded.quote(bytes(32), report_data(eph, challenge))
    SimulatedVerifier(platform.public_key).verify(quote)
    path.chmod(0o644)
    with pytest.raises(CryptoError, match="chmod 600"):
        SimulatedBackend.load(path)
    with pytest.raises(AttestationError, match="not found"):
        SimulatedBackend.load(tmp_path / "missing.pem")


# ---------- measurement ----------

def test_measurement_covers_code_paths_and_config_but_not_listing_order(tmp_path):
    (tmp_path / "tee").mkdir()
    a, b = tmp_path / "enclave.py", tmp_path / "tee" / "masking.py"
    a.write_text("def run(): return 1\n")
    b.write_text("MASK = 'fresh'\n")
    base = measurement([a, b], CONFIG, root=tmp_path)
    assert len(base) == 32
    assert measurement([b, a], CONFIG, root=tmp_path) == base
    assert measurement([a, b], dict(reversed(list(CONFIG.items()))), root=tmp_path) == base  # canonical JSON
    assert measurement([a, b], {**CONFIG, "rank": 4}, root=tmp_path) != base
    b.write_text("MASK = 'reused'\n")
    assert measurement([a, b], CONFIG, root=tmp_path) != base
    b.write_text("MASK = 'fresh'\n")
    assert measurement([a, b], CONFIG, root=tmp_path) == base
    moved = tmp_path / "tee" / "enclave.py"  # same content under another path
    moved.write_text(a.read_text())
    assert measurement([moved, b], CONFIG, root=tmp_path) != base
    with pytest.raises(AttestationError, match="listed twice"):
        measurement([a, a, b], CONFIG, root=tmp_path)
    with pytest.raises(AttestationError, match="not plain JSON"):
        measurement([a, b], {"lr": float("nan")}, root=tmp_path)


def test_enclave_code_files_are_the_tee_package_and_the_crypto_it_runs(expected):
    files = enclave_code_files()
    names = {f.relative_to(SILOTUNE_ROOT).as_posix() for f in files}
    assert {"silotune/tee/attestation.py", "silotune/crypto/handshake.py", "silotune/crypto/session.py"} <= names
    assert all(f.is_file() for f in files)
    assert measurement(list(reversed(files)), CONFIG) == expected
