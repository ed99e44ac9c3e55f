"""The peer attack: plaintext activations give the tokens away, AEAD-sealed ones give nothing."""

from silotune.audit import peer_attack
from silotune.crypto import AeadSession, ClientHandshake, Identity, server_accept
from silotune.models.partition import load_stage
from silotune.train.batching import prompt_batch


def session(client_id, server, ident):
    hs = ClientHandshake(client_id, ident, server.public)
    _, keys = server_accept(hs.hello, server, {client_id: ident.public})
    return AeadSession(keys, "client"), AeadSession(keys, "server")


def test_peer_inverts_plaintext_but_not_encrypted_activations(tiny_chat_dir):
    from silotune.models.loading import load_tokenizer

    tok = load_tokenizer(tiny_chat_dir)
    head = load_stage(tiny_chat_dir, "head", 1, 1)  # the peer's copy equals the victim's after FedAvg
    batch = prompt_batch(tok, ["Review: a warm, funny and moving film\nSentiment:",
                               "Review: dull\nSentiment:"], 64)
    plain = peer_attack(head, batch, None, None)
    assert plain["readable"] and plain["rate"] > 0.5
    server = Identity.generate()
    victim, _ = session(0, server, Identity.generate())
    _, peer_view = session(1, server, Identity.generate())
    sealed = peer_attack(head, batch, victim, peer_view)
    assert not sealed["readable"] and sealed["recovered"] == 0
