"""Peak memory of each party on SmolLM2-135M: each one materialises only its own weights.

Every party loads in a fresh subprocess; we report the growth of its peak resident set
size (ru_maxrss) over the same process right after importing torch and transformers,
and the bytes of the parameters it holds. Run: ``python benchmarks/party_memory.py``;
writes benchmarks/results/party_memory.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, resource, sys
import torch, transformers
from silotune.models.partition import load_stage
from silotune.models.loading import resolve_model
d = resolve_model("smollm2")
a, c = int(sys.argv[2]), int(sys.argv[3])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
parts = {"client": ["head", "tail"], "server": ["trunk"], "unsplit": ["full"]}[sys.argv[1]]
stages = [load_stage(d, p, a, c) for p in parts]
if sys.argv[1] == "client" and stages[0].config.tie_word_embeddings:
    stages[1].lm_head.weight = stages[0].embed.weight
seen, nbytes = set(), 0
for s in stages:
    for p in s.parameters():
        if id(p) not in seen:  # touch every weight: memory-mapped pages count once resident
            seen.add(id(p)); nbytes += p.numel() * p.element_size(); float(p.sum())
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_mb": (peak - base) / 1024, "param_mb": nbytes / 2**20}))
"""


def measure(party: str, a: int, c: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, party, str(a), str(c)], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    from silotune.report import machine

    rows = []
    for a, c in [(1, 1), (2, 2), (4, 4)]:
        for party in ("client", "server", "unsplit"):
            m = measure(party, a, c)
            rows.append((a, c, party, m))
            print(a, c, party, m, flush=True)
    lines = ["# Peak memory of each party (SmolLM2-135M-Instruct, fp32)", "",
             f"Machine: {machine()}. Command: `python benchmarks/party_memory.py`.", "",
             "Peak RSS growth while loading the party's stages and reading every weight once (over the same "
             "process after imports), and the bytes of the parameters it holds. The client holds embedding (tied to the LM head), a head blocks, "
             "c tail blocks and the final norm; the server holds only the trunk blocks.", "",
             "| a | c | party | peak RSS growth (MiB) | parameters (MiB) |", "|---|---|---|---|---|"]
    for a, c, party, m in rows:
        lines.append(f"| {a} | {c} | {party} | {m['peak_mb']:.0f} | {m['param_mb']:.0f} |")
    out = Path(__file__).parent / "results" / "party_memory.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
