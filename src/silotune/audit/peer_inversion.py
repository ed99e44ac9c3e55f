"""The peer-client attack: invert another client's head activations with the shared head weights.

After federated averaging every client holds the same head, so a peer that reads a
victim's ``h1`` off the wire can search for the tokens that reproduce it. Position by
position (the head is causal), candidates are the tokens whose head output on their own
is closest in direction to the observed vector, and each is checked by running the head
on the recovered prefix plus that candidate; the one whose output matches best wins. With per-client AEAD the peer
sees only ciphertext sealed under keys it does not have, and recovers nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..crypto import AeadSession, CryptoError
from ..errors import ProtocolError
from ..models.partition import Stage
from ..protocol.codec import decode, encode
from ..protocol.messages import ForwardActivations


@torch.no_grad()
def token_signatures(head: Stage, batch_size: int = 4096) -> torch.Tensor:
    """Unit-norm head output of every vocabulary token seen alone: the attacker's shortlist index."""
    vocab = head.embed.weight.shape[0]
    out = []
    for start in range(0, vocab, batch_size):
        ids = torch.arange(start, min(start + batch_size, vocab))[:, None]
        out.append(F.normalize(head(ids, torch.ones(len(ids), dtype=torch.long))[:, 0].float(), dim=-1))
    return torch.cat(out)


@torch.no_grad()
def invert(head: Stage, h1: torch.Tensor, length: int, shortlist: int = 64,
           signatures: torch.Tensor | None = None) -> list[int]:
    """Tokens whose head output best reproduces ``h1[:length]`` (greedy, left to right).

    Candidates for each position are the tokens whose context-free head output points the
    same way as the observed vector; each is then checked exactly in context.
    """
    signatures = token_signatures(head) if signatures is None else signatures
    tokens: list[int] = []
    for t in range(length):
        target = h1[t].float()
        candidates = (signatures @ F.normalize(target, dim=0)).topk(min(shortlist, len(signatures))).indices
        prefix = torch.tensor(tokens, dtype=torch.long).expand(len(candidates), -1)
        ids = torch.cat([prefix, candidates[:, None]], dim=1)
        out = head(ids, torch.full((len(candidates),), t + 1))[:, t].float()
        tokens.append(int(candidates[(out - target).norm(dim=-1).argmin()]))
    return tokens


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
    recovered = 0
    signatures = token_signatures(head)
    for i, n in enumerate(batch["lengths"].tolist()):
        guess = invert(head, msg.hidden[i], n, shortlist, signatures)
        recovered += sum(int(a == b) for a, b in zip(guess, batch["input_ids"][i, :n].tolist()))
    return {"tokens": total, "recovered": recovered, "rate": recovered / max(total, 1), "readable": True}
