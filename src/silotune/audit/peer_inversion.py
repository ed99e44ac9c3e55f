"""The peer-client attack: invert another client's head activations with the shared head weights.

After federated averaging every client holds the same head, so a peer that reads a
victim's ``h1`` off the wire can search for the tokens that reproduce it. Position by
position (the head is causal), candidates are the tokens whose head output on their own
is closest in direction to the observed vector, and each is checked by running the head
on the recovered prefix plus that candidate; the one whose output matches best wins
(``search_inversion``). With per-client AEAD the peer sees only ciphertext sealed under
keys it does not have, and recovers nothing.
"""

from __future__ import annotations

import torch

from ..crypto import AeadSession, CryptoError
from ..errors import ProtocolError
from ..models.partition import Stage
from ..protocol.codec import decode, encode
from ..protocol.messages import ForwardActivations
from .search_inversion import search_invert


def peer_attack(head: Stage, batch: dict, victim_session: AeadSession | None,
                peer_session: AeadSession | None, shortlist: int = 64) -> dict:
    """What a peer recovers from the victim's forward message as it crosses the wire.

    Without sessions the wire carries the codec bytes; with them, the AEAD envelope sealed
    for the server, which the peer tries to open with its own session.
    """
    with torch.no_grad():
        h1 = head(batch["input_ids"], batch["lengths"])
    wire = encode(ForwardActivations(0, 1, hidden=h1, lengths=batch["lengths"]))
    if victim_session is not None:
        wire = victim_session.seal(wire, 1)
    total = int(batch["lengths"].sum())
    try:
        observed = wire if peer_session is None else peer_session.open(wire)[0]
        msg = decode(observed)
    except (CryptoError, ProtocolError):
        return {"tokens": total, "recovered": 0, "rate": 0.0, "readable": False}
    guess = search_invert(head, msg.hidden, msg.lengths, shortlist)
    recovered = 0
    for i, n in enumerate(batch["lengths"].tolist()):
        recovered += sum(int(a == b) for a, b in zip(guess[i, :n].tolist(), batch["input_ids"][i, :n].tolist()))
    return {"tokens": total, "recovered": recovered, "rate": recovered / max(total, 1), "readable": True}
