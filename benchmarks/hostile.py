"""Hostile participants against a real deployment: every attack, the server's answer, and honest harm.

Starts a trunk server and two honest client processes (tiny random llama with the real
SmolLM2 tokenizer, Rotten Tomatoes, TLS with mutual TLS off so that strangers can
connect), then mounts every attack of ``silotune.audit.hostile`` while they train: an
enrolled third client sending poisoned activations, gradients and updates, lying about
its example count, hogging its turn, replaying handshakes; strangers stalling and
flooding calls. Afterwards it compares the honest clients' and the trunk's adapters with
an in-process run the attacker never joined.
Run: ``python benchmarks/hostile.py``; writes benchmarks/results/hostile.md.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

from silotune.audit.hostile import results_table, run_deployment
from silotune.models.loading import resolve_model
from silotune.models.tiny import save_tiny_model
from silotune.report import machine


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/hostile.md")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = save_tiny_model(Path(tmp) / "m", "llama", seed=2, tokenizer_from=resolve_model("smollm2"))
        t0 = time.monotonic()
        report = run_deployment(Path(tmp) / "run", str(model), progress=lambda name: print("attack:", name,
                                                                                            flush=True))
        seconds = time.monotonic() - t0
    outcomes = report["outcomes"]
    accepted = [o for o in outcomes if not o.refused]
    s = report["summary"]
    finite = all(math.isfinite(x) for x in report["losses"])
    lines = [
        "# Hostile participants against a live deployment",
        "",
        f"Machine: {machine()}. Command: `python benchmarks/hostile.py` ({seconds:.0f} s).",
        "",
        "One trunk server and two honest client processes (tiny random llama, SmolLM2 tokenizer, Rotten "
        "Tomatoes, 3 enrolled clients, 12 steps each, FedAvg every 2) over TLS with mutual TLS **off**; "
        "client 2's enrolled identity and strangers attack while they train (`deploy.client_timeout: 3`, "
        "`auth_seconds: 2`, `receive_seconds: 5`).",
        "",
        f"**Attacks tried: {len(outcomes)}; accepted: {len(accepted)}.**",
        "",
        results_table(outcomes),
        "",
        "## Honest training",
        "",
        f"- honest clients finished: {s['finished']}; dropped (gone past the grace period): {s['dropped']}; "
        f"turns expired: {s['turns_expired']}",
        f"- {len(report['losses'])} honest losses, all finite: {finite}",
        f"- largest difference between the honest clients' and trunk's adapters and an in-process run "
        f"the attacker never joined: {report['max_diff']:.2e} (harmed: {'no' if report['max_diff'] <= 1e-6 else 'YES'})",
        f"- trunk steps: {s['trunk_steps']}, rounds: {s['rounds']}",
        "",
        "The server's refusals by reason (`OUTPUT/server/summary.json`):",
        "",
        "| reason | count |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in s["refused"].items()],
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))
    return 1 if accepted or report["max_diff"] > 1e-6 or not finite else 0


if __name__ == "__main__":
    sys.exit(main())
