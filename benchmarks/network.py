"""Cost of the network transport on SmolLM2: gRPC + TLS + per-client AEAD over loopback vs in-process.

One run, side by side: the same client steps (same batches, same config as the main job)
alternate between an in-process federation and one whose client talks to a gRPC server
on 127.0.0.1 (TLS on the channel, AES-256-GCM on every message). Reports the step-time
ratio, the bytes on the wire per step against the tensors that must cross (h1, h2,
dL/dh2, dL/dh1), the same with bf16 on the wire, and the share of step time spent in
encryption. Run: ``python benchmarks/network.py``; writes benchmarks/results/network.md.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from silotune.config import load_config
from silotune.crypto import Identity
from silotune.crypto.certs import make_tls
from silotune.federation import build_parties
from silotune.models.loading import load_tokenizer, resolve_model
from silotune.protocol.codec import wire_dtype
from silotune.report import machine
from silotune.simulate import prepare_data
from silotune.train.batching import BatchStream
from silotune.transport.base import WireStats
from silotune.transport.grpc_client import GrpcTransport
from silotune.transport.grpc_server import SiloTuneServicer, start_server

BLOCKS, STEPS_PER_BLOCK = 4, 5


def grpc_connect(keys, wire: str, holder: dict):
    def connect(trunk_server):
        servicer = SiloTuneServicer(trunk_server, keys["server"], {0: keys[0].public}, wire_dtype(wire))
        server, port = start_server(servicer, "127.0.0.1:0", (keys["tls"]["server.crt"], keys["tls"]["server.key"]))
        holder.update(server=server, servicer=servicer)
        return GrpcTransport(f"localhost:{port}", 0, keys[0], keys["server"].public, tls_root=keys["tls"]["ca.crt"],
                             wire_dtype=wire_dtype(wire))
    return connect


def main() -> None:
    root = Path(__file__).resolve().parent.parent
    cfg = load_config(root / "configs/rotten_tomatoes.yaml", ["data.max_train=2000"])
    model_dir = resolve_model(cfg.model)
    tok = load_tokenizer(model_dir)
    _, rows, _ = prepare_data(cfg, tok)
    keys = {"server": Identity.generate(), 0: Identity.generate(), "tls": make_tls(["localhost"])}
    hidden = None
    setups = {}
    for name, wire in (("in-process", "fp32"), ("grpc", "fp32"), ("grpc-bf16", "bf16")):
        holder: dict = {}
        connect = None if name == "in-process" else grpc_connect(keys, wire, holder)
        server, (client,) = build_parties(model_dir, cfg.split, cfg.adapters, cfg.optim, 1, cfg.train.seed,
                                          wire_dtype(wire), connect=connect)
        hidden = server.trunk.config.hidden_size
        setups[name] = {"client": client, "holder": holder, "times": [], "required": 0,
                        "stream": BatchStream(rows, cfg.train.batch_size, tok.pad_token_id, 0)}
    for s in setups.values():  # warm-up step each
        s["client"].train_step(next(s["stream"]))
        s["client"].transport.stats = WireStats()
        s["client"].transport.crypto_seconds = 0.0
        if s["holder"]:
            s["holder"]["servicer"].crypto_seconds = 0.0
    for _ in range(BLOCKS):
        for s in setups.values():
            for _ in range(STEPS_PER_BLOCK):
                batch = next(s["stream"])
                t0 = time.perf_counter()
                s["client"].train_step(batch)
                s["times"].append(time.perf_counter() - t0)
                b, t = batch["input_ids"].shape
                s["required"] += 4 * b * t * hidden * 4  # h1, h2, dL/dh2, dL/dh1 in fp32
    base = statistics.median(setups["in-process"]["times"])
    lines = ["# Network transport cost (SmolLM2-135M-Instruct, Rotten Tomatoes config)", "",
             f"Machine: {machine()}. Command: `python benchmarks/network.py`. {BLOCKS} interleaved blocks of "
             f"{STEPS_PER_BLOCK} steps per setup, batch {cfg.train.batch_size}, a={cfg.split.head_blocks}, "
             f"c={cfg.split.tail_blocks}; server on 127.0.0.1 in the same process (own gRPC threads).", "",
             "| setup | median step (s) | step time / in-process | wire bytes per step (MB) | wire / fp32 tensors | "
             "encryption share of step time |", "|---|---|---|---|---|---|"]
    for name, s in setups.items():
        steps = len(s["times"])
        stats = s["client"].transport.stats
        wire_bytes = stats.total / steps
        med = statistics.median(s["times"])
        crypto = getattr(s["client"].transport, "crypto_seconds", 0.0)
        if s["holder"]:
            crypto += s["holder"]["servicer"].crypto_seconds
        share = f"{100 * crypto / sum(s['times']):.2f} %" if s["holder"] else "—"
        lines.append(f"| {name} | {med:.3f} | {med / base:.3f} | {wire_bytes / 1e6:.3f} | "
                     f"{stats.total / s['required']:.3f} | {share} |")
        print(lines[-1], flush=True)
    for s in setups.values():
        if s["holder"]:
            s["holder"]["server"].stop(0)
    lines += ["", "Wire bytes count what the client's transport sent and received for the training messages: "
              "codec headers, AEAD headers and tags, and protobuf chunk framing included.", ""]
    out = root / "benchmarks/results/network.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
