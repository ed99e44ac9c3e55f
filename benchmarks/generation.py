"""Split generation: what the KV caches on every party buy, in speed and in bytes per generated token.

SmolLM2-135M-Instruct split a = c = 2 (the shipped xsum config), LoRA adapters, the real client and
server code over the in-process transport (messages encoded and counted as on the network, fp32 wire).
Prompts are BIG-bench xsum test documents cut to ``--prompt-tokens`` tokens; ``--new`` tokens are decoded
greedily for each (no early stop, so every variant decodes the same number of tokens). Variants, side by
side in one run and round after round (the machine is noisy: compare within a run):

* ``split, KV caches``: each party caches its own blocks (prefill once, then one hidden vector per
  sequence and cut per step);
* ``split, no cache``: every step re-runs the whole sequence through the three parties (what a party
  without a cache must do);
* ``centralized, KV cache``: the unsplit model in one process with one cache (the local baseline);
* ``transformers generate``: the unsplit model's own ``generate`` (reference for the tokens and speed).

Every variant's tokens must equal transformers' greedy tokens (checked, reported). Reports tokens per
second (medians over rounds), the speedup of caches over no cache, and wire bytes per generated token.

Run: ``python benchmarks/generation.py [--prompts 4] [--prompt-tokens 96] [--new 32] [--rounds 3]``;
writes ``benchmarks/results/generation.md`` and ``generation.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from silotune.adapters import AdapterSettings, LoraSettings
from silotune.data import load_task
from silotune.federation import SplitSettings, build_parties
from silotune.generation import GenerateSettings, LocalDecoder, RecomputeDecoder, SplitDecoder, generate_ids
from silotune.generation.loop import prompt_ids
from silotune.models.loading import load_tokenizer, resolve_model
from silotune.models.partition import stage_from_model
from silotune.report import machine
from silotune.train.optim import OptimSettings

ROOT = Path(__file__).resolve().parent.parent


def hf_generate(model, ids, lengths, new):
    """transformers' generate, one prompt at a time (no padding scheme involved): new tokens per row."""
    out = []
    for i, n in enumerate(lengths.tolist()):
        prompt = ids[i : i + 1, :n]
        gen = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, do_sample=False,
                             pad_token_id=0, eos_token_id=None, min_new_tokens=new)
        out.append(gen[0, n:].tolist())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=96)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args()
    torch.manual_seed(0)
    model_dir = resolve_model("smollm2")
    tok = load_tokenizer(model_dir)
    task = load_task("xsum", seed=0, max_test=args.prompts)
    ids, lengths = prompt_ids(tok, [e.prompt for e in task.test[: args.prompts]], args.prompt_tokens)
    adapters = AdapterSettings(method="lora", lora=LoraSettings(r=8, alpha=16))
    server, (client,) = build_parties(model_dir, SplitSettings(2, 2), adapters, OptimSettings(lr=0.0), 1, seed=0)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.float32).eval()
    full = stage_from_model(ref, "full")
    settings = GenerateSettings(max_new_tokens=args.new, stop_at_eos=False, batch_size=len(lengths))
    wire = client.transport.stats
    variants = {
        "split, KV caches": lambda: generate_ids(SplitDecoder(client), ids, lengths, settings, wire=wire),
        "split, no cache": lambda: generate_ids(RecomputeDecoder(client.logits), ids, lengths, settings, wire=wire),
        "centralized, KV cache": lambda: generate_ids(LocalDecoder(full), ids, lengths, settings),
    }
    want = None
    times: dict[str, list[float]] = {name: [] for name in [*variants, "transformers generate"]}
    results = {}
    for r in range(args.rounds):
        start = time.perf_counter()
        with torch.no_grad():
            hf = hf_generate(ref, ids, lengths, args.new)
        times["transformers generate"].append(time.perf_counter() - start)
        want = want or hf
        for name, run in variants.items():
            g = run()
            times[name].append(g.seconds)
            results[name] = {"equal_to_transformers": g.tokens == want, "new_tokens": g.new_tokens,
                             "bytes_per_token": (g.bytes_up + g.bytes_down) / g.new_tokens,
                             "bytes_up": g.bytes_up, "bytes_down": g.bytes_down}
            print(f"round {r}: {name}: {g.seconds:.2f} s, {g.new_tokens / g.seconds:.1f} tok/s", flush=True)
    n_tokens = args.new * len(lengths)
    for name, ts in times.items():
        med = statistics.median(ts)
        results.setdefault(name, {"equal_to_transformers": True, "new_tokens": n_tokens, "bytes_per_token": 0})
        results[name].update(seconds=med, seconds_all=ts, tokens_per_second=n_tokens / med)
    cached, uncached = results["split, KV caches"], results["split, no cache"]
    summary = {"speedup": uncached["seconds"] / cached["seconds"],
               "bytes_ratio": uncached["bytes_per_token"] / cached["bytes_per_token"]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"machine": machine(), "args": vars(args), "prompt_lengths": lengths.tolist(), "results": results,
              **summary}
    (out / "generation.json").write_text(json.dumps(record, indent=2))
    lines = [
        "# Split generation: KV caches vs none (SmolLM2-135M-Instruct)", "",
        f"Machine: {machine()}. Command: `python benchmarks/generation.py --prompts {args.prompts} "
        f"--prompt-tokens {args.prompt_tokens} --new {args.new} --rounds {args.rounds}`.", "",
        f"{len(lengths)} xsum test documents as one batch (prompt lengths {lengths.tolist()} tokens), {args.new} new "
        f"tokens each, greedy, split a = c = 2 with LoRA over the in-process transport (every message encoded and "
        f"counted as on the network, fp32 wire). Median of {args.rounds} interleaved rounds.", "",
        "| variant | tokens equal transformers' | seconds | tokens/s | wire bytes per generated token |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        bpt = f"{r['bytes_per_token']:,.0f}" if r["bytes_per_token"] else "(no wire)"
        lines.append(f"| {name} | {'yes' if r['equal_to_transformers'] else 'NO'} | {r['seconds']:.2f} | "
                     f"{r['tokens_per_second']:.1f} | {bpt} |")
    lines += ["", f"KV caches: **{summary['speedup']:.2f}x** the tokens per second of no cache, "
              f"**{summary['bytes_ratio']:.1f}x** fewer wire bytes per generated token.", ""]
    (out / "generation.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
