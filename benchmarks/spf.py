"""LoRA vs SPF vs LoRA+SPF: held-out accuracy at the same small budget, federated split, SmolLM2.

SPF (sparsification parameter fine-tuning, ``silotune/adapters/spf.py``) trains a fixed subset
of the frozen base weights: the top ``adapters.spf.ratio`` of the heads of each Q/K/V projection
and of the rows of each FFN up-projection, ranked by the L1 norm of their pretrained weights.
This benchmark measures what that buys against LoRA alone, and beside LoRA, on two tasks:

* Rotten Tomatoes (``configs/rotten_tomatoes.yaml``) and strategyqa (``configs/strategyqa.yaml``);
* methods (``adapters.method``):

  - ``lora``: the configs' LoRA (r 8, alpha 16 on q/k/v/o in head, trunk and tail), at the
    configs' lr 1e-3;
  - ``spf``: SPF alone, ratio 0.5, AdamW lr 1e-4 (the lr of the public SPF reimplementation,
    see /work/shared/SEEDS.md);
  - ``lora+spf``: the configs' LoRA and SPF ratio 0.5 on the same layers, lr 1e-4. The framework
    has one optimizer lr (``optim.lr``) for every trainable tensor of a party; the reimplementation
    trains its LoRA and its sparse deltas with one AdamW at 1e-4, so this run does the same (its
    LoRA therefore learns at a tenth of the ``lora`` run's lr: read the table with that in mind);
  - ``lora-lr1e-4`` (not run by default; ``--methods lora-lr1e-4``): the configs' LoRA at the SPF
    runs' lr 1e-4, a control that tells the method from the lr.

  No lr is tuned per method or task.

Every run: 4 IID clients, batch 8, FedAvg every 10 local steps, seed 0, the privacy defences off
(as ``benchmarks/accuracy.py``: these runs measure the fine-tuning method, not the defence),
``centralized=false``, ``train.steps`` (default 80 = 20 steps per client = 2 rounds) and
``data.max_test`` (default 300) held-out examples of each task (strategyqa has 458).

Records per run: accuracy, the test set's majority-class rate, the trainable parameter count
(what one client trains in head + tail, what the server trains in the trunk, and the model's
total), seconds per step (federated training time / centralized-equivalent steps), and the final
training loss (mean over the last round's client steps) next to the first steps' loss.

Writes benchmarks/results/spf.json after every run (a re-run skips runs already there with the
same budget; ``--fresh`` starts over; ``--out`` writes elsewhere) and benchmarks/results/spf.md at
the end, keeping the hand-written ``## Reading`` section of an existing spf.md; run folders land
in runs/spf-*.

Run: ``nice -n 10 .venv/bin/python benchmarks/spf.py`` (defaults: ``--steps 80 --test 300
--tasks rotten_tomatoes strategyqa --methods lora spf lora+spf``): 23 minutes on 2 CPU cores shared
with other jobs (Rotten Tomatoes about 4.5-6 min a run, strategyqa about 2-2.5 min); the lr control
(``--methods lora-lr1e-4``) took 12 more minutes under heavier load.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import Counter
from pathlib import Path

from silotune.config import load_config
from silotune.data import load_task
from silotune.report import machine, public
from silotune.simulate import run

CONFIGS = {"rotten_tomatoes": "configs/rotten_tomatoes.yaml", "strategyqa": "configs/strategyqa.yaml"}
NO_DEFENCE = ["privacy.h1_clip=null", "privacy.h1_noise=0", "privacy.grad_clip=null", "privacy.grad_noise=0"]
CLIENTS = 4
SPF_RATIO = 0.5
METHODS = {  # name: (label, overrides); lora keeps the config's lr (1e-3)
    "lora": ("LoRA (lr 1e-3)", ["adapters.method=lora"]),
    "spf": (f"SPF ratio {SPF_RATIO} (lr 1e-4)", ["adapters.method=spf", f"adapters.spf.ratio={SPF_RATIO}",
                                                  "optim.lr=1e-4"]),
    "lora+spf": (f"LoRA + SPF ratio {SPF_RATIO} (lr 1e-4)", ["adapters.method=lora+spf",
                                                              f"adapters.spf.ratio={SPF_RATIO}", "optim.lr=1e-4"]),
    # not run by default: LoRA at the SPF runs' lr, to tell the method from the lr in the comparison
    "lora-lr1e-4": ("LoRA (lr 1e-4; lr control)", ["adapters.method=lora", "optim.lr=1e-4"]),
}
DEFAULT_METHODS = ["lora", "spf", "lora+spf"]
STEPS, MAX_TEST = 80, 300
READING = "## Reading"  # the .md from here on is written by hand and kept when the table is rewritten
OUT = Path(__file__).resolve().parent / "results" / "spf.json"


def key(task: str, method: str) -> str:
    return f"{task}-{method}"


def overrides(task: str, method: str, steps: int, max_test: int) -> list[str]:
    return (NO_DEFENCE + [f"federation.clients={CLIENTS}", f"train.steps={steps}", f"data.max_test={max_test}",
                          "centralized=false"] + METHODS[method][1])


def count_trainable(result: dict) -> dict:
    """Trainable parameters: one client's head + tail, the server's trunk, and their sum (the model's)."""
    server, clients = result["federated"]["_parties"]
    client = sum(p.numel() for p in clients[0].stepper.params)
    trunk = sum(p.numel() for p in server.runtime.stepper.params)
    return {"client": client, "trunk": trunk, "total": client + trunk}


def majority(cfg) -> dict:
    """The majority-class rate of the run's test set (the split ``run`` evaluates on)."""
    test = load_task(cfg.data.task, seed=cfg.train.seed, max_train=cfg.data.max_train, max_test=cfg.data.max_test,
                     choices=cfg.data.choices).test
    label, n = Counter(e.label for e in test).most_common(1)[0]
    return {"label": str(label), "count": n, "n": len(test), "rate": n / len(test)}


def one_run(root: Path, task: str, method: str, steps: int, max_test: int) -> dict:
    ov = overrides(task, method, steps, max_test)
    cfg = load_config(root / CONFIGS[task], ov + [f"output=runs/spf-{key(task, method)}"])
    start = time.perf_counter()
    r = run(cfg, progress=False)
    wall = time.perf_counter() - start
    params = count_trainable(r)
    entry = public(r)
    fed = entry["federated"]
    curve = fed.pop("curve", None) or []
    per_round = CLIENTS * cfg.federation.local_steps
    last, first = curve[-per_round:], curve[:CLIENTS]
    fed.pop("clients", None)
    entry.update(task=task, method=method, lr=cfg.optim.lr, steps=steps, max_test=max_test,
                 trainable=params, majority=majority(cfg), wall_seconds=wall,
                 seconds_per_step=fed["train_seconds"] / r["plan"]["centralized_steps"],
                 final_train_loss=sum(last) / max(len(last), 1), first_train_loss=sum(first) / max(len(first), 1),
                 config={"file": CONFIGS[task], "overrides": ov})
    return entry


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=STEPS, help="train.steps (centralized-equivalent steps)")
    ap.add_argument("--test", type=int, default=MAX_TEST, help="data.max_test: held-out examples per task")
    ap.add_argument("--tasks", nargs="*", choices=list(CONFIGS), default=list(CONFIGS))
    ap.add_argument("--methods", nargs="*", choices=list(METHODS), default=DEFAULT_METHODS)
    ap.add_argument("--fresh", action="store_true", help="forget earlier results and run everything again")
    ap.add_argument("--out", type=Path, default=OUT, help="the JSON file (the .md goes next to it)")
    args = ap.parse_args()
    root = Path(__file__).resolve().parent.parent
    out = args.out
    results = {} if args.fresh or not out.is_file() else json.loads(out.read_text())
    argv = ["--fresh"] if args.fresh else []
    if args.steps != STEPS:
        argv.append(f"--steps {args.steps}")
    if args.test != MAX_TEST:
        argv.append(f"--test {args.test}")
    if args.tasks != list(CONFIGS):
        argv.append("--tasks " + " ".join(args.tasks))
    if args.methods != DEFAULT_METHODS:
        argv.append("--methods " + " ".join(args.methods))
    command = " ".join(["nice -n 10 .venv/bin/python benchmarks/spf.py"] + argv)
    for task in args.tasks:
        for method in args.methods:
            name = key(task, method)
            old = results.get(name)
            if old and old["steps"] == args.steps and old["max_test"] == args.test:
                print(f"{name}: done earlier, skipped", flush=True)
                continue
            entry = one_run(root, task, method, args.steps, args.test)
            entry["command"] = command
            results[name] = entry
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=2))
            print(f"{name}: accuracy {entry['federated']['metrics']['accuracy']:.4f} "
                  f"(majority {entry['majority']['rate']:.3f}), {entry['trainable']['total']:,} trainable, "
                  f"{entry['seconds_per_step']:.2f} s/step, loss {entry['first_train_loss']:.3f} -> "
                  f"{entry['final_train_loss']:.3f} ({entry['wall_seconds']:.0f} s)", flush=True)
    write_markdown(results, out.with_suffix(".md"))


def stderr_points(p: float, n: int) -> float:
    return 100 * math.sqrt(p * (1 - p) / n)


def write_markdown(results: dict, path: Path) -> None:
    commands: dict[str, list] = {}
    for r in results.values():
        commands.setdefault(r.get("command", "?"), []).append(r)
    runs = "; ".join(f"`{c}` ({len(rs)} runs, {sum(r['wall_seconds'] for r in rs) / 60:.1f} min wall including "
                     "model loading and evaluation)" for c, rs in commands.items())
    lines = ["# LoRA vs SPF vs LoRA+SPF at the same budget (SmolLM2-135M-Instruct, federated split)", "",
             f"Machine: {machine()}, shared with other engineers' jobs (run under `nice -n 10`). "
             f"Commands: {runs}.", "",
             f"Setup: each task's config (`{CONFIGS['rotten_tomatoes']}`, `{CONFIGS['strategyqa']}`: a=2, c=2, "
             f"batch 8, FedAvg every 10 local steps, seed 0) with the privacy defences off, {CLIENTS} IID clients, "
             "`centralized=false`. LoRA is the configs' (r 8, alpha 16 on q/k/v/o in head, trunk and tail). "
             f"SPF: ratio {SPF_RATIO} of the heads of each Q/K/V projection and of the rows of each up-projection, "
             "in every block. lr: LoRA at the configs' 1e-3; SPF and LoRA+SPF at 1e-4, the public SPF "
             "reimplementation's single AdamW lr (the framework has one lr per party, so LoRA+SPF's LoRA also "
             "trains at 1e-4). Nothing tuned per method or task. grad_clip 1.0 (global norm) everywhere.", "",
             "| task | method | steps | test examples | accuracy | majority class | trainable params "
             "(client head+tail / trunk) | s/step | train loss first -> final | wire per client step |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    order = [key(t, m) for t in CONFIGS for m in METHODS]
    for name in [k for k in order if k in results]:
        r = results[name]
        acc = r["federated"]["metrics"]["accuracy"]
        n = r["test_examples"]
        tp = r["trainable"]
        lines.append(f"| {r['task']} | {METHODS[r['method']][0]} | {r['steps']} | {n} | **{acc:.3f}** "
                     f"(+/- {stderr_points(acc, n):.1f}) | {r['majority']['rate']:.3f} | {tp['total']:,} "
                     f"({tp['client']:,} / {tp['trunk']:,}) | {r['seconds_per_step']:.2f} | "
                     f"{r['first_train_loss']:.3f} -> {r['final_train_loss']:.3f} | "
                     f"{r['federated']['bytes_per_step'] / 1e6:.2f} MB |")
    ns = sorted({r["test_examples"] for r in results.values()})
    lines += ["", "Accuracy's +/- is one standard error in points, sqrt(p(1-p)/n): about "
              + ", ".join(f"{stderr_points(0.5, n):.1f} points at p = 0.5 and {stderr_points(0.8, n):.1f} at "
                          f"p = 0.8 on {n} examples" for n in ns)
              + "; a difference between two methods on the same test set needs roughly 1.4x that (and more, "
              "one seed) before it means anything.",
              "s/step: the federation's training time (4 clients taking turns through one trunk, threads in "
              "one process) divided by the centralized-equivalent steps (`train.steps`); it excludes model "
              "loading and evaluation. Train loss: first = mean of the first 4 client steps, final = mean of "
              "the last round's 40 client steps (batch 8, so noisy). Wire: bytes up and down per client step, "
              "activations and gradients plus the FedAvg'd head and tail tensors (fp32).", ""]
    text = "\n".join(lines)
    if path.is_file() and READING in (old := path.read_text()):
        text += "\n" + old[old.index(READING):]  # a hand-written reading of the numbers is kept
    path.write_text(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
