"""The peer-client attack on SmolLM2: a peer with the shared head inverts a victim's activations.

For Rotten Tomatoes test reviews, the victim's head output h1 (a = 1 and a = 2 blocks)
is what crosses the wire. Without encryption the peer decodes it and recovers tokens with
``silotune.audit.invert``; with per-client AEAD it holds only ciphertext under keys it
cannot derive. Run: ``python benchmarks/peer_attack.py``; writes benchmarks/results/peer_attack.md.
"""

from __future__ import annotations

from pathlib import Path

from silotune.audit import peer_attack
from silotune.crypto import AeadSession, ClientHandshake, Identity, server_accept
from silotune.data import load_task
from silotune.models.loading import load_tokenizer, resolve_model
from silotune.models.partition import load_stage
from silotune.report import machine
from silotune.train.batching import prompt_batch

N_REVIEWS, MAX_TOKENS = 8, 48


def sessions():
    server = Identity.generate()
    out = []
    for cid in (0, 1):
        ident = Identity.generate()
        hs = ClientHandshake(cid, ident, server.public)
        _, keys = server_accept(hs.hello, server, {cid: ident.public})
        out.append((AeadSession(keys, "client"), AeadSession(keys, "server")))
    return out


def main() -> None:
    model_dir = resolve_model("smollm2")
    tok = load_tokenizer(model_dir)
    task = load_task("rotten_tomatoes", max_test=N_REVIEWS)
    batch = prompt_batch(tok, [e.prompt for e in task.test], MAX_TOKENS)
    (victim, _), (peer_client, _) = sessions()
    lines = ["# Peer-client inversion of head activations (SmolLM2-135M-Instruct)", "",
             f"Machine: {machine()}. Command: `python benchmarks/peer_attack.py`. {N_REVIEWS} Rotten Tomatoes "
             f"test prompts, up to {MAX_TOKENS} tokens; the peer holds the same (federated-averaged) head.", "",
             "| head blocks a | wire | tokens | recovered by the peer | rate |", "|---|---|---|---|---|"]
    for a in (1, 2):
        head = load_stage(model_dir, "head", a, 1)
        for label, v, p in (("plaintext (no encryption)", None, None), ("per-client AEAD", victim, peer_client)):
            r = peer_attack(head, batch, v, p)
            lines.append(f"| {a} | {label} | {r['tokens']} | {r['recovered']} | {100 * r['rate']:.1f} % |")
            print(lines[-1], flush=True)
    out = Path(__file__).parent / "results/peer_attack.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text("\n".join(lines + [""]))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
