"""TEE mode's cost: the trunk's step in a server-side enclave with masked offload, against the plain trunk.

One trunk step (forward and backward of SmolLM2's trunk with LoRA, a = c = 1, one optimizer step) on a
batch of ``--batch`` sequences of ``--tokens`` tokens, for each variant in turn, round after round in one
run (the machine is noisy: compare within a run):

* ``plain``: the trunk runtime in this process, fp32;
* ``enclave, no offload``: the same runtime inside the enclave process (what the pipe and process cost);
* ``enclave + offload fp64``: the shipped default: every frozen linear of the trunk sent to the worker
  process under one-time-pad masks of 1e6 x the input RMS, the worker computing in float64, the mask
  products precomputed by the enclave after each step (here back to back, so the precomputation is inside
  the measured step time: in a run it overlaps the clients' work), every product checked (Freivalds);
* ``enclave + offload fp64, no integrity check``: the same without checking the worker's products;
* ``enclave + offload fp32``: masks of 1e2 x RMS, worker in float32 (faster, and measurably less exact
  and less hiding: see ``benchmarks/results/mask_precision.md``).

It reports the median step time and its ratio to plain, and for the offload variants the enclave's share
of FLOPs (online only, and counting the precomputed mask products) and of time (the step minus the time the
enclave waited for the worker). Everything here runs on the same CPU cores: the enclave, the worker and the
host share them, as they would not with a GPU worker.

Run: ``python benchmarks/tee.py [--batch 4] [--tokens 64] [--rounds 5]``; writes
``benchmarks/results/tee.md`` and ``tee.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from silotune.adapters import AdapterSettings
from silotune.compute import Compute, fp32_trainables
from silotune.federation import SplitSettings
from silotune.models.loading import resolve_model
from silotune.models.partition import load_config, load_stage
from silotune.report import machine
from silotune.server.boundary import Boundary, Limits
from silotune.server.runtime import Part, TrunkRuntime
from silotune.tee.enclave import EnclaveRuntime, enclave_spec
from silotune.tee.settings import TeeSettings
from silotune.train.optim import OptimSettings

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {
    "enclave, no offload": dict(offload=False),
    "enclave + offload fp64 (default)": dict(offload=True),
    "enclave + offload fp64, no integrity check": dict(offload=True, verify=False),
    "enclave + offload fp32, masks 1e2": dict(offload=True, offload_dtype="fp32", mask_scale=1e2),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tee"))
    args = ap.parse_args()
    model_dir = resolve_model(args.model)
    split, adapters, optim = SplitSettings(1, 1), AdapterSettings(), OptimSettings()
    config = load_config(model_dir)
    boundary = Boundary(Limits.unbounded(config))
    trunk = load_stage(model_dir, "trunk", 1, 1)
    from silotune.adapters import apply_method, trained_layers

    apply_method(trunk, adapters, 0, trained_layers(config, adapters, 1, 1))
    fp32_trainables(trunk)
    runtimes = {"plain": TrunkRuntime(trunk, optim, boundary)}
    started = time.perf_counter()
    for name, extra in VARIANTS.items():
        tee = TeeSettings(mode="server", **extra)
        spec = enclave_spec(model_dir, split, adapters, optim, 0, Compute.default(), tee,
                            platform_key=Ed25519PrivateKey.generate().private_bytes_raw())
        runtimes[name] = EnclaveRuntime(spec, boundary, tee)
    print(f"loaded in {time.perf_counter() - started:.0f} s", flush=True)
    gen = torch.Generator().manual_seed(0)
    h1 = torch.randn(args.batch, args.tokens, config.hidden_size, generator=gen)
    lengths = torch.full((args.batch,), args.tokens)
    grad = torch.randn(h1.shape, generator=gen) * 1e-4

    def step(rt, k):
        """(the step as the clients wait for it, the step and the enclave's mask precomputation after it)"""
        start = time.perf_counter()
        rt.backward(rt.forward([Part(0, k, h1, lengths)]), {0: grad})
        stepped = time.perf_counter() - start
        if hasattr(rt, "stats"):
            rt.stats()  # answered once the enclave has refilled its mask pool
        return stepped, time.perf_counter() - start

    times = {name: [] for name in runtimes}
    for name, rt in runtimes.items():
        step(rt, 0)  # warm-up (and the first mask pool fill)
    before = {name: rt.stats() for name, rt in runtimes.items() if name != "plain"}
    for r in range(args.rounds):
        for name, rt in runtimes.items():
            times[name].append(step(rt, r + 1))
        print(f"round {r + 1}: " + ", ".join(f"{n} {t[-1][1]:.2f}s" for n, t in times.items()), flush=True)
    rows = []
    base = statistics.median(t for t, _ in times["plain"])
    for name, rt in runtimes.items():
        med = statistics.median(t for t, _ in times[name])
        full = statistics.median(t for _, t in times[name])
        row = {"variant": name, "median_seconds": round(med, 3), "ratio_to_plain": round(med / base, 2),
               "median_with_precompute": round(full, 3), "ratio_with_precompute": round(full / base, 2),
               "seconds": [round(t, 3) for t, _ in times[name]]}
        if name != "plain":
            s, b = rt.stats(), before[name]
            if s["offload"]:
                d = {k: s[k] - b[k] for k in ("worker_flops", "online_flops", "precompute_flops", "on_demand_flops",
                                              "worker_seconds", "precompute_seconds", "verify_flops")}
                d["online_flops"] += d.pop("verify_flops")  # the integrity checks are online enclave work
                enclave_flops = d["online_flops"] + d["precompute_flops"] + d["on_demand_flops"]
                total = sum(t for _, t in times[name])
                row.update({"online_flop_share": d["online_flops"] / (d["online_flops"] + d["worker_flops"]),
                            "enclave_flop_share_with_precompute": enclave_flops / (enclave_flops + d["worker_flops"]),
                            "worker_time_share": d["worker_seconds"] / total,
                            "precompute_time_share": d["precompute_seconds"] / total,
                            "enclave_time_share": 1 - d["worker_seconds"] / total,
                            "offloaded_layers": s["offloaded_layers"]})
            rt.close()
        rows.append(row)
    desc = machine()
    out = {"machine": desc, "model": str(args.model), "batch": args.batch, "tokens": args.tokens,
           "rounds": args.rounds, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(out, indent=1))
    lines = [f"# TEE mode: one trunk step, plain vs enclave (`python benchmarks/tee.py --batch {args.batch} "
             f"--tokens {args.tokens} --rounds {args.rounds}`)", "",
             f"Machine: {desc}. {args.model}, trunk of a = c = 1 (all but the first and last block), LoRA r 8 on "
             f"q/k/v/o, batch {args.batch} x {args.tokens} tokens, forward + backward + AdamW step; median of "
             f"{args.rounds} rounds, variants interleaved in each round. The enclave, its worker and this process "
             "share the same CPU cores.", "",
             "The step is timed as the host sees it; the enclave then refills its mask pool (in a run, while the "
             "clients compute): the second pair of columns adds that time.", "",
             "| variant | step (s) | vs plain | step + mask precomputation (s) | vs plain | enclave FLOP share: "
             "online / with precomputed masks | time share: waiting for the worker / precomputing masks |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        flops = (f"{r['online_flop_share']:.1%} / {r['enclave_flop_share_with_precompute']:.1%}"
                 if "online_flop_share" in r else "-")
        tshare = (f"{r['worker_time_share']:.0%} / {r['precompute_time_share']:.0%}"
                  if "worker_time_share" in r else "-")
        lines.append(f"| {r['variant']} | {r['median_seconds']:.2f} | {r['ratio_to_plain']:.2f}x | "
                     f"{r['median_with_precompute']:.2f} | {r['ratio_with_precompute']:.2f}x | {flops} | {tshare} |")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
