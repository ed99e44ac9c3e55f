"""Federated split vs centralized ROUGE on BIG-bench xsum, with the same budget, decoded with KV caches.

Runs ``configs/xsum.yaml`` (SmolLM2-135M-Instruct, 4 clients, LoRA, the audited gradient defence) through
``silotune.simulate.run``: the federation and the centralized baseline train on the same examples, then each
summarises the same held-out documents greedily to the end of the line (the split model with a KV cache on
every party, the centralized one with one cache) and is scored with ROUGE. Before training, the base model
(untrained adapters: LoRA's B is zero) is scored the same way, for reference. A second federated run with the
privacy defence off (``--no-defence``, federated only: the centralized run has no defence) separates what the
split costs from what the defence costs; it is added to the results already in ``xsum_rouge.json``.

Run: ``python benchmarks/xsum_rouge.py [--steps 160] [--max-test 100]``, then
``python benchmarks/xsum_rouge.py --no-defence``; writes ``benchmarks/results/xsum_rouge.md`` and ``xsum_rouge.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from silotune.config import load_config
from silotune.eval.loop import evaluate
from silotune.generation import LocalDecoder
from silotune.models.loading import load_tokenizer, resolve_model
from silotune.report import machine
from silotune.simulate import centralized_model, prepare_data, run

ROOT = Path(__file__).resolve().parent.parent
KEYS = ("rouge1", "rouge2", "rougeL")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=160)
    p.add_argument("--max-test", type=int, default=100)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--no-defence", action="store_true", help="add a federated run with the privacy defence off")
    args = p.parse_args()
    out = Path(args.out)
    overrides = [f"train.steps={args.steps}", f"data.max_test={args.max_test}", "output=runs/bench-xsum-rouge"]
    if args.no_defence:
        record = json.loads((out / "xsum_rouge.json").read_text())
        cfg = load_config(ROOT / "configs" / "xsum.yaml", overrides + [
            "output=runs/bench-xsum-rouge-nodefence", "centralized=false", "privacy.grad_clip=null",
            "privacy.grad_noise=0"])
        fed = run(cfg, progress=False)["federated"]
        record["federated_no_defence"] = {k: fed["metrics"][k] for k in KEYS}
        record["federated_no_defence_train_seconds"] = fed["train_seconds"]
        record["samples"]["federated_no_defence"] = fed["metrics"].get("samples")
        write(out, record, cfg)
        return
    cfg = load_config(ROOT / "configs" / "xsum.yaml", overrides)
    model_dir = resolve_model(cfg.model)
    tok = load_tokenizer(model_dir)
    task, _, _ = prepare_data(cfg, tok)
    from silotune.compute import Compute

    start = time.perf_counter()
    base = centralized_model(cfg, model_dir, Compute.resolve(cfg.compute))
    base_metrics = evaluate(lambda b: base(b["input_ids"], b["lengths"]).float(), tok, task, cfg.data.max_length,
                            cfg.train.eval_batch_size, cfg.train.max_new_tokens, decoder=LocalDecoder(base))
    base_seconds = time.perf_counter() - start
    result = run(cfg, progress=False)
    fed, cen = result["federated"], result["centralized"]
    record = {"machine": machine(), "args": vars(args), "base": base_metrics, "base_eval_seconds": base_seconds,
              "federated": {k: fed["metrics"][k] for k in KEYS}, "centralized": {k: cen["metrics"][k] for k in KEYS},
              "federated_train_seconds": fed["train_seconds"], "centralized_train_seconds": cen["train_seconds"],
              "examples": fed["examples"], "test": fed["metrics"]["n"],
              "samples": {"federated": fed["metrics"].get("samples"), "centralized": cen["metrics"].get("samples")}}
    record["batch_size"], record["local_steps"] = cfg.train.batch_size, cfg.federation.local_steps
    record["max_new_tokens"] = cfg.train.max_new_tokens
    write(out, record, cfg)


def write(out: Path, record: dict, cfg) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "xsum_rouge.json").write_text(json.dumps(record, indent=2, default=str))
    rows = [("base model (no training)", record["base"]),
            ("federated split (4 clients), gradient clip + noise defence (the config's)", record["federated"])]
    if "federated_no_defence" in record:
        rows.append(("federated split (4 clients), no defence", record["federated_no_defence"]))
    rows.append(("centralized", record["centralized"]))
    args = record["args"]
    lines = ["# xsum: federated split vs centralized ROUGE (SmolLM2-135M-Instruct)", "",
             f"Machine: {record['machine']}. Commands: `python benchmarks/xsum_rouge.py --steps {args['steps']} "
             f"--max-test {args['max_test']}` (configs/xsum.yaml), then the same with `--no-defence`.", "",
             f"Same budget: {record['examples']} training examples each ({args['steps']} centralized steps of batch "
             f"{cfg.train.batch_size}; the 4 clients share them, FedAvg every {cfg.federation.local_steps} local "
             f"steps). {record['test']} held-out documents, greedy summaries to the end of the line (at most "
             f"{cfg.train.max_new_tokens} tokens), decoded with a KV cache on every party (split) or one cache "
             "(centralized).", "",
             "| model | ROUGE-1 | ROUGE-2 | ROUGE-L |", "|---|---|---|---|"]
    for name, m in rows:
        lines.append(f"| {name} | {m['rouge1']:.4f} | {m['rouge2']:.4f} | {m['rougeL']:.4f} |")
    lines += ["", f"Training time: federated {record['federated_train_seconds']:.0f} s, centralized "
              f"{record['centralized_train_seconds']:.0f} s (the machine was shared during these runs)."]
    empty = {k: sum(1 for x in (v or []) if not x["prediction"]) for k, v in record["samples"].items()}
    lines += ["", f"Empty summaries among the first 3 samples (the model ends at once): {empty}.", ""]
    (out / "xsum_rouge.md").write_text("\n".join(lines))
    print("\n".join(lines))

if __name__ == "__main__":
    main()
