"""Fuzzing of everything that parses bytes from the network: codec decoder, AEAD opener, chunk joiner.

Feeds each target ``--inputs`` hostile inputs (100,000 by default): pure random bytes,
and mutations of valid encodings and envelopes (bit flips, byte substitutions,
truncation and extension, header JSON edits with wrong-typed values, edited length
prefixes, splices of two messages). Every outcome must be an acceptance or the target's
own error type (ProtocolError for the codec and the joiner, CryptoError for the AEAD
session); an accepted message must have fields of the right types, a mutated envelope
must never open, and a join must return exactly the bytes of its pieces. Counts the
outcomes and the inputs per second, and exits non-zero on any unexpected exception,
ill-typed message, wrong join or forged envelope.
Run: ``python benchmarks/fuzz.py``; writes benchmarks/results/fuzz.md.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import random
import re
import struct
import sys
import time
import traceback
from pathlib import Path

import safetensors
import torch
from tqdm import tqdm

from silotune.crypto.handshake import ClientHandshake, server_accept
from silotune.crypto.identity import CryptoError, Identity
from silotune.crypto.session import AeadSession
from silotune.errors import ProtocolError
from silotune.protocol import Aggregation, Control, ForwardActivations, Gradients, ReturnedActivations, decode, encode
from silotune.transport import chunking

ST_DTYPES = ["BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64", "C64",
             "F8_E5M2", "F8_E4M3", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "X", ""]
WRONG = ["x", "", 1.5, -1, 0, 2**31, 2**63, 10**30, True, False, None, [], [1, "a"], {}, {"a": [1]},
         {"__tensors__": 5}, {"__tensors__": ["nope"]}, {"__tensors__": [1]}, "A" * 100, float("nan"),
         float("inf"), {"round": "x"}, {str(i): i for i in range(20)}, "\ud800"]


# ---------- valid material ----------

def random_message(rng: random.Random):
    def tensor(*shape, dtype=torch.float32):
        if dtype == torch.int64:
            return torch.randint(0, 100, shape, generator=gen)
        return torch.randn(*shape, generator=gen).to(dtype)

    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    client, step = rng.randrange(2**31), rng.randrange(2**62)
    b, t, h = rng.randint(1, 3), rng.randint(1, 4), rng.randint(1, 8)
    kind = rng.randrange(5)
    if kind == 0:
        return ForwardActivations(client, step, hidden=tensor(b, t, h), lengths=tensor(b, dtype=torch.int64),
                                  train=rng.random() < 0.5)
    if kind == 1:
        return ReturnedActivations(client, step, hidden=tensor(b, t, h))
    if kind == 2:
        return Gradients(client, step, grad=tensor(b, t, h))
    if kind == 3:
        names = [f"head.{i}.lora_{ab}" for i in range(rng.randint(0, 3)) for ab in "AB"]
        return Aggregation(client, step, tensors={n: tensor(rng.randint(1, 4), h) for n in names},
                           num_examples=rng.randrange(2**40), round=rng.randrange(2**31))
    payload = rng.choice([{}, {"round": rng.randint(-1, 2**31)}, {"note": "hi", "x": 1.5, "y": None, "z": True}])
    return Control(client, step, command=rng.choice(["ack", "join", "bye", "fetch_aggregate", "not_ready"]),
                   payload=payload)


def well_typed(msg) -> bool:
    """An independent check (not the library's) that a decoded message has the field types it declares."""
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    def tensor_or_none(v):
        return v is None or isinstance(v, torch.Tensor)

    ok = is_int(msg.client) and is_int(msg.step) and msg.client >= 0 and msg.step >= 0
    if isinstance(msg, ForwardActivations):
        return ok and tensor_or_none(msg.hidden) and tensor_or_none(msg.lengths) and isinstance(msg.train, bool)
    if isinstance(msg, ReturnedActivations):
        return ok and tensor_or_none(msg.hidden)
    if isinstance(msg, Gradients):
        return ok and tensor_or_none(msg.grad)
    if isinstance(msg, Aggregation):
        return (ok and is_int(msg.num_examples) and is_int(msg.round) and isinstance(msg.tensors, dict)
                and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in msg.tensors.items()))
    if isinstance(msg, Control):
        return (ok and isinstance(msg.command, str) and isinstance(msg.payload, dict)
                and all(isinstance(k, str) and (v is None or isinstance(v, (str, int, float, bool)))
                        for k, v in msg.payload.items()))
    return False


# ---------- mutations ----------

def bit_flips(rng, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(out))
        out[i] ^= 1 << rng.randrange(8)
    return bytes(out)


def substitute(rng, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        out[rng.randrange(len(out))] = rng.randrange(256)
    return bytes(out)


def resize(rng, data: bytes) -> bytes:
    choice = rng.randrange(4)
    if choice == 0:
        return data[:rng.randrange(len(data))]  # truncate
    if choice == 1:
        return data + rng.randbytes(rng.randint(1, 64))  # extend
    i = rng.randrange(len(data) + 1)
    if choice == 2:
        return data[:i] + rng.randbytes(rng.randint(1, 16)) + data[i:]  # insert
    return data[:i] + data[i + rng.randint(1, 16):]  # delete


def splice(rng, a: bytes, b: bytes) -> bytes:
    return a[:rng.randrange(len(a) + 1)] + b[rng.randrange(len(b) + 1):]


def header_edit(rng, blob: bytes) -> bytes:
    """Parse the safetensors header and metadata, change one thing (mostly to a wrong type), re-frame."""
    n = int.from_bytes(blob[:8], "little")
    header, data = json.loads(blob[8:8 + n]), blob[8 + n:]
    meta = header["__metadata__"]
    fields = json.loads(meta["fields"])
    tensors = [k for k in header if k != "__metadata__"]
    choice = rng.randrange(10)
    if choice <= 3 or not tensors and choice <= 5:  # a field of the message gets a wrong value, or goes
        if choice == 3:
            fields.pop(rng.choice(list(fields)))
        else:
            fields[rng.choice(list(fields) + ["bogus", "hidden", "tensors", "kind"])] = rng.choice(WRONG)
        meta["fields"] = json.dumps(fields)
    elif choice <= 5:  # a tensor entry gets an unknown dtype, an impossible shape or bad offsets
        entry = header[rng.choice(tensors)]
        key = rng.choice(["dtype", "shape", "data_offsets"])
        if key == "dtype":
            entry["dtype"] = rng.choice(ST_DTYPES)
        elif key == "shape":
            entry["shape"] = rng.choice([[2**63, 0], [2**62, 2**62, 0], [1] * 100, [-1], [1.5], "x",
                                         entry["shape"] + [1], [2**31 - 1] * 7 + [0], [0]])
        else:
            entry["data_offsets"] = rng.choice([[0, 2**64], [5, 1], [-1, 3], [0], "x", [0, len(data) + 1]])
    elif choice == 6:
        meta["kind"] = rng.choice(["forward", "returned", "gradients", "aggregation", "control", "nope", 5])
    elif choice == 7:
        header["__metadata__"] = rng.choice([[], "x", 5, None, {"kind": meta["kind"]},
                                             {"kind": meta["kind"], "fields": 5}])
    elif choice == 8:
        meta["fields"] = rng.choice(["[]", "5", "null", "{", "[" * 5000, '{"a": 1, "a": 2}', '"x"'])
    else:  # text-level: a repeated key, an unknown entry or deep nesting
        text = json.dumps(header)
        text = "{" + rng.choice(['"__metadata__": {}, ', '"x": 1, ', '"a": {"b": ' * 3000]) + text[1:]
        head = text.encode()
        return struct.pack("<Q", len(head)) + head + data
    head = json.dumps(header).encode()
    return struct.pack("<Q", len(head)) + head + data


def length_edit(rng, blob: bytes) -> bytes:
    n = int.from_bytes(blob[:8], "little")
    new = rng.choice([0, 1, n - 1, n + 1, len(blob), len(blob) - 8, 2**63, 2**64 - 1, rng.randrange(2**64)])
    return struct.pack("<Q", new % 2**64) + blob[8:]


def hostile(rng, pool: list[bytes]) -> bytes:
    """One fuzz input: random bytes, or a mutated / spliced valid blob."""
    choice = rng.randrange(8)
    if choice == 0:
        return rng.randbytes(rng.randint(0, 256))
    base = rng.choice(pool)
    if choice == 1:
        return bit_flips(rng, base)
    if choice == 2:
        return substitute(rng, base)
    if choice == 3:
        return resize(rng, base)
    if choice == 4:
        return splice(rng, base, rng.choice(pool))
    if choice == 5:
        return length_edit(rng, base)
    return header_edit(rng, base)


# ---------- targets ----------

def reason(message: str) -> str:
    """An error line with its particulars (names, numbers, quoted values, details) blanked out."""
    message = re.sub(r"\(.*\)|'[^']*'|\"[^\"]*\"|got .*|of type \w+", "…", message)
    return re.sub(r"\d+", "N", message)


class Tally:
    """Outcomes of one target: accepted / each expected error / each unexpected exception, plus wrong results."""

    def __init__(self, name: str):
        self.name, self.counts, self.first, self.seconds = name, collections.Counter(), {}, 0.0
        self.wrong: collections.Counter = collections.Counter()  # ill-typed message, wrong join, forgery
        self.reasons: collections.Counter = collections.Counter()  # expected errors by message, details removed
        self.examples: list[str] = []

    def run(self, fn, arg, expected: tuple[type, ...]):
        try:
            result = fn(arg)
        except expected as exc:
            self.counts[type(exc).__name__] += 1
            self.reasons[reason(str(exc))] += 1
            return None
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # the point is to see anything at all that escapes (Rust panics too)
            name = f"unexpected {type(exc).__module__}.{type(exc).__name__}"
            self.counts[name] += 1
            self.first.setdefault(name, (arg[:200] if isinstance(arg, bytes) else repr(arg)[:200],
                                         traceback.format_exc()))
            return None
        self.counts["accepted"] += 1
        return result

    def fail(self, category: str, example: str) -> None:
        self.wrong[category] += 1
        if len(self.examples) < 10:
            self.examples.append(f"{category}: {' '.join(example.split())[:200]}")

    @property
    def unexpected(self) -> int:
        return sum(n for k, n in self.counts.items() if k.startswith("unexpected")) + sum(self.wrong.values())


def fuzz_codec(rng, n: int, bar) -> Tally:
    tally = Tally("codec decode")
    pool = [encode(random_message(rng), rng.choice([torch.float32, torch.bfloat16, torch.float16]))
            for _ in range(300)]
    for _ in range(n):
        msg = tally.run(decode, hostile(rng, pool), (ProtocolError,))
        if msg is not None and not well_typed(msg):
            tally.fail("ill-typed message accepted", repr(msg))
        bar.update()
    return tally


def session_pair() -> tuple[AeadSession, AeadSession]:
    client_id, server_id = Identity.generate(), Identity.generate()
    handshake = ClientHandshake(7, client_id, server_id.public)
    reply, server_keys = server_accept(handshake.hello, server_id, {7: client_id.public})
    return AeadSession(handshake.finish(reply), "client"), AeadSession(server_keys, "server")


def fuzz_aead(rng, n: int, bar) -> Tally:
    """Mutations of the next envelope (so most reach the tag check), replays and random bytes."""
    tally = Tally("AEAD open")
    client, server = session_pair()
    pool = [encode(random_message(rng)) for _ in range(50)]
    sent: list[bytes] = []
    genuine = client.seal(rng.choice(pool), rng.randrange(2**62))
    for i in range(n):
        choice = rng.randrange(6)
        if choice == 0:
            env = rng.randbytes(rng.randint(0, 128))
        elif choice == 1 and sent:
            env = rng.choice(sent)  # replay
        elif choice == 2:
            env = struct.pack(">Q", server.recv_seq) + rng.randbytes(rng.randint(0, 200))  # right seq, junk rest
        else:
            env = rng.choice([bit_flips, substitute, resize])(rng, genuine) if choice != 5 else \
                splice(rng, genuine, rng.choice(sent or [genuine]))
        opened = tally.run(server.open, env, (CryptoError,))
        if opened is not None and env != genuine:
            tally.fail("forged envelope opened", repr(env[:100]))
        elif opened is not None:  # a mutation that changed nothing: the genuine envelope, rightly opened
            tally.counts["accepted"] -= 1
            tally.counts["opened (mutation left the genuine envelope unchanged)"] += 1
        if opened is None and i % 20 == 19:  # the genuine envelope still opens after all those failures
            opened = server.open(genuine)
        if opened is not None:
            sent.append(genuine)
            genuine = client.seal(rng.choice(pool), rng.randrange(2**62))
        bar.update()
    return tally


def expected_join(pieces: list[tuple[bytes, bool]], limit: int) -> bytes | None:
    total, out = 0, b""
    for piece, last in pieces:
        total += len(piece)
        if total > limit:
            return None
        out += piece
        if last:
            return out
    return None


def fuzz_join(rng, n: int, bar) -> Tally:
    tally = Tally("chunk join")
    for _ in range(n):
        data = rng.randbytes(rng.choice([0, 1, rng.randint(0, 300)]))
        pieces = list(chunking.split(data, rng.randint(1, 64)))
        choice = rng.randrange(6)
        if choice == 0:
            pieces = [(rng.randbytes(rng.randint(0, 40)), rng.random() < 0.2) for _ in range(rng.randint(0, 12))]
        elif choice == 1 and pieces:
            pieces.pop(rng.randrange(len(pieces)))  # lost piece (maybe the last)
        elif choice == 2:
            i = rng.randrange(len(pieces))
            pieces[i] = (pieces[i][0], not pieces[i][1])  # early or missing end mark
        elif choice == 3:
            pieces += pieces[:rng.randint(1, 3)]  # trailing junk after the end
        limit = rng.choice([len(data), max(len(data) - 1, 0), rng.randint(0, 400), 0])
        joined = tally.run(lambda p: chunking.join(iter(p), limit), pieces, (ProtocolError,))
        want = expected_join(pieces, limit)
        if (joined is None) != (want is None) or joined is not None and joined != want:
            tally.fail("wrong join", f"{joined!r:.40} for {len(pieces)} pieces, limit {limit}, expected {want!r:.40}")
        bar.update()
    return tally


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--inputs", type=int, default=100_000, help="inputs per target (default 100000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/fuzz.md")
    args = p.parse_args()
    torch.set_num_threads(1)
    tallies = []
    for fn in (fuzz_codec, fuzz_aead, fuzz_join):
        rng = random.Random(f"{args.seed}-{fn.__name__}")
        with tqdm(total=args.inputs, desc=fn.__name__, mininterval=1.0) as bar:
            t0 = time.perf_counter()
            tally = fn(rng, args.inputs, bar)
            tally.seconds = time.perf_counter() - t0
        tally.counts = +tally.counts  # drop outcomes relabelled down to zero
        tallies.append(tally)
        print(f"{tally.name}: {dict(tally.counts)}" + (f", wrong: {dict(tally.wrong)}" if tally.wrong else ""),
              flush=True)
    write_report(args, tallies)
    return 1 if any(t.unexpected for t in tallies) else 0


def cpu_name() -> str:
    """The CPU model (platform.processor() is often empty on Linux; /proc/cpuinfo names it)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_report(args, tallies: list[Tally]) -> None:
    command = f"python benchmarks/fuzz.py --inputs {args.inputs} --seed {args.seed}"
    lines = ["# Fuzzing the network-facing parsers", "",
             f"Machine: {cpu_name()} ({platform.machine()}), {os.cpu_count()} CPU cores, {platform.system()}; "
             f"Python {platform.python_version()}, torch {torch.__version__}, safetensors {safetensors.__version__}. "
             f"Date: {datetime.date.today().isoformat()}. Command: `{command}`.", "",
             "Inputs: pure random bytes and mutations of valid encodings and envelopes (bit flips, byte "
             "substitutions, truncation, extension, insertion, deletion, edited length prefixes, header JSON "
             "edits with wrong-typed values, unknown dtypes, impossible shapes and offsets, repeated keys, deep "
             "nesting, splices of two messages). The AEAD target mutates the next genuine envelope (right "
             "sequence number), replays old ones and opens the genuine one every 20 inputs; the join target "
             "checks every result against a reference join.", "",
             "| target | inputs | seconds | inputs/s | outcomes |", "|---|---|---|---|---|"]
    for t in tallies:
        total = sum(t.counts.values())
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(t.counts.items(), key=lambda kv: -kv[1]))
        wrong = "".join(f"; WRONG {k} {v}" for k, v in t.wrong.items())
        lines.append(f"| {t.name} | {total} | {t.seconds:.1f} | {total / t.seconds:,.0f} | {outcomes}{wrong} |")
    unexpected = sum(t.unexpected for t in tallies)
    surprises = sum(n for t in tallies for k, n in t.counts.items() if k.startswith("unexpected"))
    lines += ["", f"unexpected exceptions: {surprises}",
              f"wrong results (ill-typed message accepted, wrong join, forged envelope opened): "
              f"{sum(sum(t.wrong.values()) for t in tallies)}", ""]
    lines += ["Most frequent refusals (particulars blanked out):", ""]
    for t in tallies:
        top = ", ".join(f"{r} ({n})" for r, n in t.reasons.most_common(8))
        lines.append(f"- {t.name}: {top}")
    lines.append("")
    for t in tallies:
        for name, (arg, tb) in t.first.items():
            lines += [f"## {t.name}: {name}", "", f"First input: `{arg!r}`", "", "```", tb.rstrip(), "```", ""]
        for example in t.examples:
            lines.append(f"- {t.name}: {example}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}" + (f" ({unexpected} unexpected)" if unexpected else ""))


if __name__ == "__main__":
    sys.exit(main())
