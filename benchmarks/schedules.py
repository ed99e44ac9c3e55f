"""Schedules side by side, shaped like FedSEA-LLaMA's Table 7: wall time, samples per second, accuracy.

FedSEA-LLaMA (Llama-2-7B, 1,000 samples, batch 1, LoRA r 8, one client block per side, fp16 on
GPUs) reports sequential 689 s; client-batch 630 / 542 / 489 s at 2 / 4 / 8 clients;
server-hierarchical 348 / 174 / 86 s; centralized 382 s. This runs the same table with SmolLM2 on
whatever machine it is started on, every configuration in one run (the machine is noisy: compare
within a run): for N in 2, 4, 8 clients, the sequential schedule, client-batch with K = N (one trunk
pass for every client's step) and hierarchical with M = N replicas (one client per replica, every
replica a process joined by gloo, or NCCL on GPUs), and the centralized run, all on the same
training samples (``--samples``, batch 1, LoRA r 8 on q/k/v/o, a = c = 1), with held-out accuracy
for each (Rotten Tomatoes, ``--test`` reviews).

Timings are the training loop only (each party's weights already loaded; hierarchical: from a
barrier once every replica has loaded). On a CPU machine the replicas and the client threads share
the cores, so the hierarchical speed-up is bounded by the number of cores, not by M.

Run: ``python benchmarks/schedules.py [--samples 192] [--test 200]`` (about 15 minutes on 2 cores);
writes ``benchmarks/results/schedules.md`` and ``schedules.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from silotune.config import load_config
from silotune.report import machine
from silotune.simulate import run

ROOT = Path(__file__).resolve().parent.parent
BASE = ["privacy.h1_clip=null", "privacy.h1_noise=0", "privacy.grad_clip=null", "privacy.grad_noise=0",
        "train.batch_size=1", "split.head_blocks=1", "split.tail_blocks=1", "adapters.lora.r=8",
        "federation.local_steps=8", "federation.batch_wait=5"]


def configs(clients: list[int]) -> list[tuple[str, int, list[str]]]:
    out = []
    for n in clients:
        out.append(("sequential", n, ["federation.schedule=sequential"]))
        out.append(("client-batch", n, ["federation.schedule=client-batch", f"federation.batch_clients={n}"]))
        out.append(("hierarchical", n, ["federation.schedule=hierarchical", f"federation.replicas={n}"]))
    return out


def one(name: str, n: int, extra: list[str], args, centralized: bool) -> dict:
    overrides = BASE + extra + [f"train.steps={args.samples}", f"federation.clients={n}",
                                f"data.max_test={args.test}", f"centralized={str(centralized).lower()}",
                                f"output=runs/bench-schedules/{name}-{n}", f"model={args.model}"]
    cfg = load_config(ROOT / "configs/rotten_tomatoes.yaml", overrides)
    r = run(cfg, progress=False)
    rows = []
    for side in ("federated", "centralized"):
        if side not in r:
            continue
        s = r[side]
        rows.append({"schedule": name if side == "federated" else "centralized", "clients": n if side == "federated"
                     else 1, "samples": s["examples"], "seconds": round(s["train_seconds"], 2),
                     "samples_per_second": round(s["samples_per_second"], 3),
                     "accuracy": s["metrics"].get("accuracy"), "trunk_passes": s.get("trunk_passes")})
    return rows


def table(rows: list[dict]) -> str:
    seq = {r["clients"]: r["seconds"] for r in rows if r["schedule"] == "sequential"}
    lines = ["| schedule | clients | samples | train seconds | samples/s | vs sequential (same clients) | "
             "trunk passes | held-out accuracy |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{seq[r['clients']] / r['seconds']:.2f}x" if r["clients"] in seq else "-"
        acc = f"{r['accuracy']:.3f}" if r["accuracy"] is not None else "-"
        lines.append(f"| {r['schedule']} | {r['clients']} | {r['samples']} | {r['seconds']:.1f} | "
                     f"{r['samples_per_second']:.2f} | {ratio} | {r['trunk_passes'] or '-'} | {acc} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=192, help="training samples (batch 1: one step each)")
    ap.add_argument("--test", type=int, default=200, help="held-out reviews scored for accuracy")
    ap.add_argument("--clients", type=int, nargs="*", default=[2, 4, 8])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "schedules"))
    args = ap.parse_args()
    start, rows = time.perf_counter(), []
    for i, (name, n, extra) in enumerate(configs(args.clients)):
        got = one(name, n, extra, args, centralized=i == 0)
        rows.extend(got)
        print(json.dumps(got), flush=True)
    order = {"sequential": 0, "client-batch": 1, "hierarchical": 2, "centralized": 3}
    rows.sort(key=lambda r: (order[r["schedule"]], r["clients"]))
    wall = time.perf_counter() - start
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"machine": machine(), "args": vars(args), "rows": rows,
                                                    "wall_seconds": wall}, indent=2) + "\n")
    out.with_suffix(".md").write_text(
        f"# Schedules side by side (`python benchmarks/schedules.py --samples {args.samples} --test {args.test}`)\n\n"
        f"Machine: {machine()}. SmolLM2-135M-Instruct ({args.model}), Rotten Tomatoes, {args.samples} training "
        f"samples at batch 1, LoRA r 8 on q/k/v/o, a = c = 1, fp32, FedAvg every 8 local steps; accuracy on "
        f"{args.test} held-out reviews. Seconds are the training loop only; all rows measured in one run "
        f"({wall / 60:.0f} min in all).\n\n{table(rows)}\n")
    print(table(rows))


if __name__ == "__main__":
    main()
