"""Federated split vs centralized accuracy on SmolLM2-135M-Instruct (the issue's benchmark).

Runs, each with the same model, method, data, total examples and seed on both sides:
  1. Rotten Tomatoes, 4 clients, IID, LoRA: federated split and centralized;
  2. Rotten Tomatoes, 4 clients, Dirichlet alpha=0.5: federated split (the centralized run does not
     depend on the partition, so run 1's baseline applies);
  3. strategyqa, 4 clients, IID: federated split and centralized;
  4. Rotten Tomatoes IID with the shipped default privacy defence (the config as is), federated only.
Runs 1-3 measure the split itself, so they turn the privacy defences off; run 4 measures what the
default defence costs at the full budget.
Writes benchmarks/results/accuracy.md and accuracy.json; each run's folder lands in runs/bench-*.

Run: ``python benchmarks/accuracy.py`` (about an hour on 2 CPU cores), or
``python benchmarks/accuracy.py --only rt_iid`` for one run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from silotune.config import load_config
from silotune.report import machine, public
from silotune.simulate import run

NO_DEFENCE = ["privacy.h1_clip=null", "privacy.h1_noise=0", "privacy.grad_clip=null", "privacy.grad_noise=0"]
RUNS = {
    "rt_iid": ("configs/rotten_tomatoes.yaml", NO_DEFENCE),
    "rt_dirichlet": ("configs/rotten_tomatoes.yaml", ["data.partition=dirichlet", "data.alpha=0.5",
                                                      "centralized=false"] + NO_DEFENCE),
    "strategyqa": ("configs/strategyqa.yaml", NO_DEFENCE),
    "rt_iid_default_defence": ("configs/rotten_tomatoes.yaml", ["centralized=false"]),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", choices=list(RUNS))
    args = ap.parse_args()
    root = Path(__file__).resolve().parent.parent
    out_json = root / "benchmarks" / "results" / "accuracy.json"
    results = json.loads(out_json.read_text()) if out_json.is_file() else {}
    for name in args.only or RUNS:
        config, overrides = RUNS[name]
        cfg = load_config(root / config, overrides + [f"output=runs/bench-{name}"])
        start = time.perf_counter()
        r = run(cfg, progress=True)
        entry = public(r)
        for side in ("federated", "centralized"):
            if side in entry:
                entry[side].pop("curve", None)
        entry["wall_seconds"] = time.perf_counter() - start
        entry["config"] = {"file": config, "overrides": overrides}
        entry["defence"] = cfg.privacy.describe()
        results[name] = entry
        out_json.parent.mkdir(exist_ok=True)
        out_json.write_text(json.dumps(results, indent=2))
        print(name, {s: entry[s]["metrics"] for s in ("federated", "centralized") if s in entry}, flush=True)
    write_markdown(results, out_json.with_suffix(".md"))


def write_markdown(results: dict, path: Path) -> None:
    lines = ["# Federated split vs centralized accuracy (SmolLM2-135M-Instruct)", "",
             f"Machine: {machine()}. Command: `python benchmarks/accuracy.py`.", "",
             "| run | task | partition | privacy defence | federated split | centralized | gap (points) | "
             "train examples each | wire per client step |", "|---|---|---|---|---|---|---|---|---|"]
    base = {}
    for name, r in results.items():
        fed = r["federated"]["metrics"]["accuracy"]
        cen = r.get("centralized", {}).get("metrics", {}).get("accuracy")
        if cen is not None:
            base[r["task"]] = cen
        cen_used = cen if cen is not None else base.get(r["task"])
        partition = " ".join(o.split("=")[1] for o in r["config"]["overrides"] if o.startswith("data.")) or "iid"
        gap = f"{100 * (fed - cen_used):+.2f}" if cen_used is not None else "—"
        cen_txt = f"{cen:.4f}" if cen is not None else (f"({cen_used:.4f}, from the IID run)" if cen_used else "—")
        defence = r.get("defence", "none")  # runs made before the defences existed had none
        lines.append(f"| {name} | {r['task']} | {partition} | {defence} | {fed:.4f} | {cen_txt} | {gap} | "
                     f"{r['federated']['examples']} | {r['federated']['bytes_per_step'] / 1e6:.2f} MB |")
    sizes = ", ".join(f"{k}: {v['test_examples']}" for k, v in results.items())
    lines += ["", f"Test sets: {sizes} held-out examples (fixed-seed split).", ""]
    path.write_text("\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
