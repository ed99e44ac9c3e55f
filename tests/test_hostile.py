"""Hostile participants against a live deployment: every attack refused and counted, honest training unharmed.

One server and two honest client processes train over TLS (mutual TLS off: anyone can
connect) while a third enrolled identity and strangers mount every attack in
``silotune.audit.hostile``: poisoned activations, gradients and updates, lies about
example counts, replayed and malformed handshakes, stalled and oversized streams, turn
hogging. The honest clients must finish with finite losses and exactly the adapters of
a run the attacker never joined.
"""

import math

from silotune.audit.hostile import run_deployment


def test_every_attack_is_refused_and_honest_training_is_unharmed(tmp_path, tiny_chat_dir):
    report = run_deployment(tmp_path, str(tiny_chat_dir))
    accepted = [(o.attack, o.answer) for o in report["outcomes"] if not o.refused]
    assert not accepted, accepted
    refused = report["summary"]["refused"]
    for reason in ("non_finite", "limit", "shape", "dtype", "update", "impersonation", "malformed", "handshake",
                   "busy", "deadline_auth", "no_session"):
        assert refused.get(reason, 0) >= 1, (reason, refused)
    assert report["summary"]["finished"] == [0, 1] and report["summary"]["dropped"] == [2]
    assert 2 in report["summary"]["turns_expired"]
    assert report["losses"] and all(math.isfinite(x) for x in report["losses"])
    assert report["max_diff"] <= 1e-6, report["max_diff"]
