"""Handshake authentication, per-client keys, and AEAD rejection of tampering, replay and reordering."""

import pytest

from silotune.crypto import (
    AeadSession,
    ClientHandshake,
    CryptoError,
    Identity,
    load_enrollment,
    save_enrollment,
    server_accept,
)


@pytest.fixture(scope="module")
def ids():
    return {"server": Identity.generate(), 0: Identity.generate(), 1: Identity.generate()}


def connect(ids, client_id, identity=None):
    hs = ClientHandshake(client_id, identity or ids[client_id], ids["server"].public)
    reply, server_keys = server_accept(hs.hello, ids["server"], {0: ids[0].public, 1: ids[1].public})
    client_keys = hs.finish(reply)
    return AeadSession(client_keys, "client"), AeadSession(server_keys, "server")


def test_both_sides_derive_the_same_keys_and_talk(ids):
    c, s = connect(ids, 0)
    for step in range(3):
        assert s.open(c.seal(b"h1 activations %d" % step, step)) == (b"h1 activations %d" % step, step)
        assert c.open(s.seal(b"h2", step)) == (b"h2", step)


def test_unknown_client_and_bad_signature_are_refused(ids):
    with pytest.raises(CryptoError, match="unknown client 7"):
        connect(ids, 7, Identity.generate())
    with pytest.raises(CryptoError, match="bad signature"):
        connect(ids, 0, ids[1])  # client 1's key claiming to be client 0


def test_client_refuses_an_impostor_server(ids):
    hs = ClientHandshake(0, ids[0], ids["server"].public)
    reply, _ = server_accept(hs.hello, Identity.generate(), {0: ids[0].public})
    with pytest.raises(CryptoError, match="server hello"):
        hs.finish(reply)


def test_tampered_replayed_and_reordered_messages_are_rejected(ids):
    c, s = connect(ids, 0)
    m0, m1, m2 = (c.seal(b"payload-%d" % i, i) for i in range(3))
    bad = bytearray(m0)
    bad[-1] ^= 1
    with pytest.raises(CryptoError, match="tampered"):
        s.open(bytes(bad))
    forged_step = m0[:8] + (5).to_bytes(8, "big") + m0[16:]  # same ciphertext, other step
    with pytest.raises(CryptoError, match="tampered"):
        s.open(forged_step)
    assert s.open(m0)[0] == b"payload-0"
    with pytest.raises(CryptoError, match="replayed"):
        s.open(m0)
    with pytest.raises(CryptoError, match="out-of-order"):
        s.open(m2)
    assert s.open(m1)[0] == b"payload-1" and s.open(m2)[0] == b"payload-2"


def test_peer_client_cannot_decrypt_another_clients_traffic(ids):
    victim, victim_server = connect(ids, 0)
    peer, peer_server = connect(ids, 1)
    recorded = victim.seal(b"secret activations", 0)
    for attacker in (peer, peer_server):  # the peer's own keys, either direction
        with pytest.raises(CryptoError):
            attacker.open(recorded)
    assert victim_server.open(recorded)[0] == b"secret activations"


def test_keys_and_enrollment_files_roundtrip(tmp_path, ids):
    ids[0].save(tmp_path / "c0.pem")
    assert Identity.load(tmp_path / "c0.pem").public == ids[0].public
    assert (tmp_path / "c0.pem").stat().st_mode & 0o777 == 0o600
    save_enrollment(tmp_path / "enrolled.json", {0: ids[0].public})
    assert load_enrollment(tmp_path / "enrolled.json") == {0: ids[0].public}
    (tmp_path / "bad.pem").write_text("nope")
    with pytest.raises(CryptoError, match="not a PEM"):
        Identity.load(tmp_path / "bad.pem")


def test_a_relayed_session_tolerates_drops_but_not_replays_reordering_or_another_context(ids):
    """``ordered=False`` (a client's session with the enclave, through the untrusted host): a message the relay
    dropped does not break the session; a replayed or older message, or one opened as another kind, is refused."""
    hs = ClientHandshake(0, ids[0], ids["server"].public)
    reply, server_keys = server_accept(hs.hello, ids["server"], {0: ids[0].public})
    c, s = AeadSession(hs.finish(reply), "client", ordered=False), AeadSession(server_keys, "server", ordered=False)
    m0, m1, m2 = (c.seal(b"h1-%d" % i, i, b"forward") for i in range(3))
    assert s.open(m1, b"forward") == (b"h1-1", 1)  # m0 was dropped by the relay
    with pytest.raises(CryptoError, match="replayed"):
        s.open(m0, b"forward")  # older than one already accepted
    with pytest.raises(CryptoError, match="replayed"):
        s.open(m1, b"forward")
    with pytest.raises(CryptoError, match="tampered"):
        s.open(m2, b"gradients")  # relayed as another kind of message
    assert s.open(m2, b"forward") == (b"h1-2", 2)


def test_only_an_attested_enclave_may_answer_without_a_server_identity(ids):
    with pytest.raises(ValueError, match="server_public or attestation"):
        ClientHandshake(0, ids[0], None)
    hs = ClientHandshake(0, ids[0], ids["server"].public)
    with pytest.raises(ValueError, match="enclave"):
        server_accept(hs.hello, None, {0: ids[0].public})
