"""Hostile participants: every attack an enrolled member or a stranger with a TLS connection can mount.

Each attack talks to a live trunk server over the real gRPC wire and reports what the
server answered and whether it was refused. Members hold a real enrolled identity
(they are in the federation); strangers hold none. ``honest_reference`` gives the
adapters the honest clients must end with if no attack changed anything, so a caller
(the test suite, ``benchmarks/hostile.py``) can check that honest training was unharmed.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import torch

from ..crypto import CryptoError, Identity
from ..crypto.handshake import ClientHandshake
from ..errors import ProtocolError, SiloTuneError
from ..protocol.messages import Aggregation, Control, ForwardActivations, Gradients
from ..transport.grpc_client import GrpcTransport
from ..transport.proto import silotune_pb2 as pb
from ..transport.proto import silotune_pb2_grpc as pb_grpc


@dataclass
class Target:
    """A live server and what an attacker holds: its address, the public server key and CA, and
    (for member attacks) one enrolled client's id and identity."""

    address: str
    server_public: bytes
    ca: bytes | None
    member: int
    member_key: Identity
    hidden: int
    max_batch: int
    max_length: int
    client_timeout: float
    auth_seconds: float
    layout: dict[str, tuple[int, ...]] = field(default_factory=dict)


@dataclass
class Outcome:
    attack: str
    who: str  # member | stranger
    refused: bool
    answer: str
    seconds: float = 0.0


def _short(text: str, n: int = 150) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _channel(t: Target) -> grpc.Channel:
    if t.ca is None:
        return grpc.insecure_channel(t.address)
    return grpc.secure_channel(t.address, grpc.ssl_channel_credentials(t.ca),
                               options=[("grpc.ssl_target_name_override", "localhost")])


def _member(t: Target, timeout: float = 30.0) -> GrpcTransport:
    return GrpcTransport(t.address, t.member, t.member_key, t.server_public, tls_root=t.ca, retries=0,
                         timeout=timeout, tls_server_name="localhost" if t.ca else None)


def _send(t: Target, msg) -> tuple[bool, str]:
    """(refused, answer) for one message sent by the member over a fresh session. An update that
    arrives after its round closed is aimed again at the round the server says is open."""
    tr = _member(t)
    try:
        reply = tr.call(msg)
        if isinstance(msg, Aggregation) and isinstance(reply, Control) and reply.payload.get("late"):
            msg.round = reply.payload["open_round"]
            reply = tr.call(msg)
        return False, f"accepted ({reply.kind} {reply.payload if isinstance(reply, Control) else ''})"
    except (ProtocolError, CryptoError) as exc:
        return True, _short(exc)
    finally:
        tr.close()


def _h1(t: Target, b: int = 2, n: int = 4, **kw) -> ForwardActivations:
    return ForwardActivations(t.member, 1, hidden=torch.randn(b, n, t.hidden), lengths=torch.full((b,), n),
                              train=False, **kw)


# ---- member attacks: one message each ----
def _poisoned_activations(t: Target) -> dict[str, Callable[[], object]]:
    nan = torch.randn(2, 4, t.hidden)
    nan[0, 1, 3] = float("nan")
    inf = torch.randn(2, 4, t.hidden)
    inf[1, 0, 0] = float("inf")
    ok = torch.full((2,), 4)
    m = t.member
    return {
        "NaN in activations": lambda: ForwardActivations(m, 1, hidden=nan, lengths=ok),
        "Inf in activations": lambda: ForwardActivations(m, 1, hidden=inf, lengths=ok),
        "batch above the limit": lambda: _h1(t, b=t.max_batch + 1),
        "sequence above the limit": lambda: _h1(t, n=t.max_length + 1),
        "empty batch": lambda: ForwardActivations(m, 1, hidden=torch.zeros(0, 4, t.hidden),
                                                  lengths=torch.zeros(0, dtype=torch.long)),
        "integer activations": lambda: ForwardActivations(m, 1, hidden=torch.ones(2, 4, t.hidden, dtype=torch.long),
                                                          lengths=ok),
        "wrong hidden size": lambda: ForwardActivations(m, 1, hidden=torch.randn(2, 4, t.hidden + 1), lengths=ok),
        "lengths beyond the sequence": lambda: ForwardActivations(m, 1, hidden=torch.randn(2, 4, t.hidden),
                                                                  lengths=torch.tensor([4, 9])),
        "activations without lengths": lambda: ForwardActivations(m, 1, hidden=torch.randn(2, 4, t.hidden)),
        "speaks for another client": lambda: ForwardActivations(1 if m == 0 else 0, 1, train=False,
                                                                hidden=torch.randn(2, 4, t.hidden), lengths=ok),
    }


def _poisoned_updates(t: Target) -> dict[str, Callable[[], object]]:
    def update(mutate=None, n=8, round_=0):
        tensors = {k: torch.zeros(s) for k, s in t.layout.items()}
        if mutate:
            mutate(tensors)
        return Aggregation(t.member, 1, tensors=tensors, num_examples=n, round=round_)

    first = next(iter(t.layout))

    def set_nan(ts):
        ts[first].view(-1)[0] = float("nan")

    def set_inf(ts):
        ts[first].view(-1)[0] = float("-inf")

    def drop_key(ts):
        del ts[first]

    def add_key(ts):
        ts["head.blocks.0.extra"] = torch.zeros(3)

    def reshape(ts):
        ts[first] = torch.zeros(ts[first].numel() + 1)

    def to_int(ts):
        ts[first] = ts[first].long()

    return {
        "NaN in an update": lambda: update(set_nan),
        "Inf in an update": lambda: update(set_inf),
        "10^18 examples claimed": lambda: update(n=10 ** 18),
        "zero examples claimed": lambda: update(n=0),
        "update missing a tensor": lambda: update(drop_key),
        "update with an extra tensor": lambda: update(add_key),
        "update with a wrong shape": lambda: update(reshape),
        "int64 update tensors": lambda: update(to_int),
        "update for a far future round": lambda: update(round_=1000),
        "non-integer aggregate round": lambda: Control(t.member, 1, command="fetch_aggregate",
                                                       payload={"round": "x"}),
        "unknown control command": lambda: Control(t.member, 1, command="shutdown"),
    }


def _garbage_plaintext(t: Target) -> tuple[bool, str]:
    """A correctly sealed message whose plaintext is not a SiloTune message (malformed header)."""
    tr = _member(t)
    try:
        tr.connect()
        tr._exchange(b"\xff" * 8 + b"{not json" + os.urandom(64), 1)
        return False, "accepted"
    except grpc.RpcError as exc:
        return True, _short(f"{exc.code().name}: {exc.details()}")
    finally:
        tr.close()


def _nan_gradient(t: Target) -> tuple[bool, str]:
    """Waits for the member's turn with an honest forward pass, then returns a NaN gradient."""
    tr = _member(t, timeout=120)
    try:
        fwd = _h1(t)
        fwd.train = True
        reply = tr.call(fwd)
        grad = torch.zeros_like(reply.hidden)
        grad[0, 0, 0] = float("nan")
        tr.call(Gradients(t.member, 1, grad=grad))
        return False, "accepted"
    except (ProtocolError, CryptoError) as exc:
        return True, _short(exc)
    finally:
        tr.close()


def _hog_turn(t: Target) -> tuple[bool, str]:
    """Holds the turn by re-sending its forward pass every 0.3 s, and measures how long the server let
    it: the holder's re-send returns at once, so one that had to wait means the turn was taken away. A
    probe (a gradient of the wrong shape, refused without touching anything) tells whether the server
    still keeps its step."""
    tr = _member(t, timeout=t.client_timeout + 30)
    fwd = _h1(t)
    fwd.train = True
    probe = Gradients(t.member, 1, grad=torch.zeros(1, 1, t.hidden))
    try:
        tr.call(fwd)  # granted the turn
        got = time.monotonic()
        while time.monotonic() - got < 4 * t.client_timeout:
            time.sleep(0.3)
            try:
                tr.call(probe)
            except ProtocolError as exc:
                if "no forward pass pending" in str(exc):
                    break  # the server dropped our step: the turn expired
            t0 = time.monotonic()
            tr.call(fwd)
            if time.monotonic() - t0 > 0.05:
                break  # had to wait for the turn
        held = time.monotonic() - got
    finally:
        tr.close()
    ok = held <= t.client_timeout + 1.5
    return ok, f"turn taken away after {held:.1f}s (limit deploy.client_timeout = {t.client_timeout:.0f}s)"


def _hello_attacks(t: Target) -> dict[str, Callable[[], tuple[bool, str]]]:
    def send(hello: pb.Hello) -> tuple[bool, str]:
        ch = _channel(t)
        try:
            pb_grpc.SiloTuneStub(ch).Handshake(iter([hello]), timeout=10)
            return False, "accepted (session established)"
        except grpc.RpcError as exc:
            return True, _short(f"{exc.code().name}: {exc.details()}")
        finally:
            ch.close()

    stranger = Identity.generate()

    def hello(client: int = t.member, key: Identity = t.member_key, **change) -> pb.Hello:
        """A fresh hello from ``client`` signed by ``key``, with fields changed before signing."""
        h = ClientHandshake(client, key, t.server_public).hello
        for k, v in change.items():
            setattr(h, k, v)
        h.signature = key.sign(h.signed_part())
        return pb.Hello(client_id=h.client_id, ephemeral=h.ephemeral, nonce=h.nonce, signature=h.signature,
                        timestamp_ms=h.timestamp_ms)

    def replay():
        captured = hello()
        first = send(captured)
        refused, answer = send(captured)
        return refused, f"{answer} (the original: {first[1]})"

    return {
        "replayed handshake hello": replay,
        "stale handshake hello (1 h old)": lambda: send(hello(timestamp_ms=int((time.time() - 3600) * 1000))),
        "all-zero X25519 key in hello": lambda: send(hello(ephemeral=bytes(32))),
        "hello signed by a stranger": lambda: send(hello(key=stranger)),
        "hello from an unknown client id": lambda: send(hello(client=10 ** 6, key=stranger)),
        "malformed hello (short key)": lambda: send(hello(ephemeral=b"\x01" * 5)),
    }


# ---- strangers: resource exhaustion ----
def _flood(t: Target, method: str, n: int, connections: int = 1) -> tuple[bool, str]:
    """``n`` calls (over ``connections`` connections) that never send their first message."""
    release = threading.Event()

    def stall():
        release.wait(60)
        return
        yield  # a generator that yields nothing until released

    channels = [_channel(t) for _ in range(connections)]
    codes: Counter[str] = Counter()
    lock = threading.Lock()

    def run(ch):
        stub = pb_grpc.SiloTuneStub(ch)
        try:
            if method == "Exchange":
                list(stub.Exchange(stall(), timeout=60))
            else:
                stub.Handshake(stall(), timeout=60)
            code = "OK"
        except grpc.RpcError as exc:
            code = exc.code().name
        with lock:
            codes[code] += 1

    t0 = time.monotonic()
    threads = [threading.Thread(target=run, args=(channels[i % connections],), daemon=True) for i in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(t.auth_seconds + 20)
    elapsed = time.monotonic() - t0
    release.set()
    for ch in channels:
        ch.close()
    ended = sum(codes.values())
    refused = ended == n and codes.get("OK", 0) == 0 and elapsed <= t.auth_seconds + 15
    detail = ", ".join(f"{k} x{v}" for k, v in sorted(codes.items()))
    return refused, f"all {ended}/{n} calls ended within {elapsed:.1f}s: {detail}"


def _big_unauthenticated_stream(t: Target) -> tuple[bool, str]:
    """A 512 MiB request whose first chunk names a session that does not exist."""
    sent = [0]
    piece = os.urandom(1 << 20)

    def chunks():
        for i in range(512):
            sent[0] += len(piece)
            yield pb.Chunk(client_id=t.member, session_id=os.urandom(16), data=piece, last=i == 511)

    ch = _channel(t)
    try:
        list(pb_grpc.SiloTuneStub(ch).Exchange(chunks(), timeout=60))
        return False, "accepted"
    except grpc.RpcError as exc:
        return True, _short(f"{exc.code().name} after {sent[0] >> 20} MiB were produced: {exc.details()}")
    finally:
        ch.close()


def _member_stalls(t: Target, n: int = 4) -> tuple[bool, str]:
    """The member opens ``n`` calls on its own live session, each stalling after the first chunk."""
    tr = _member(t)
    tr.connect()
    release = threading.Event()
    codes: Counter[str] = Counter()
    lock = threading.Lock()

    def chunks():
        yield pb.Chunk(client_id=t.member, session_id=tr.session.session_id, data=b"x" * 64, last=False)
        release.wait(60)

    def run():
        try:
            list(pb_grpc.SiloTuneStub(tr.channel).Exchange(chunks(), timeout=60))
            code = "OK"
        except grpc.RpcError as exc:
            code = exc.code().name
        with lock:
            codes[code] += 1

    threads = [threading.Thread(target=run, daemon=True) for _ in range(n)]
    for th in threads:
        th.start()
        time.sleep(0.05)
    time.sleep(1.0)
    busy = codes.get("UNAVAILABLE", 0)
    release.set()
    for th in threads:
        th.join(10)
    tr.close()
    return busy >= n - 2, f"{busy} of {n} concurrent calls refused as busy (2 allowed per client)"


def mount_all(t: Target, progress: Callable[[str], None] | None = None) -> list[Outcome]:
    """Every attack, one after another (turn hogging and resource floods first, while the honest
    clients train); returns what the server answered to each."""
    attacks: list[tuple[str, str, Callable[[], tuple[bool, str]]]] = [
        ("keeps the turn by re-sending forward passes", "member", lambda: _hog_turn(t)),
        ("50 stalled request streams on one connection", "stranger", lambda: _flood(t, "Exchange", 50)),
        ("50 stalled handshakes on one connection", "stranger", lambda: _flood(t, "Handshake", 50)),
        ("48 stalled request streams over 12 connections", "stranger", lambda: _flood(t, "Exchange", 48, 12)),
        ("512 MiB stream naming no session", "stranger", lambda: _big_unauthenticated_stream(t)),
    ]
    member_hellos = ("replayed", "stale", "zero", "short")
    for name, fn in _hello_attacks(t).items():
        attacks.append((name, "member" if any(w in name for w in member_hellos) else "stranger", fn))
    for name, make in {**_poisoned_activations(t), **_poisoned_updates(t)}.items():
        attacks.append((name, "member", lambda make=make: _send(t, make())))
    attacks += [
        ("sealed message with a malformed header", "member", lambda: _garbage_plaintext(t)),
        ("4 concurrent stalled calls on its own session", "member", lambda: _member_stalls(t)),
        ("NaN in the returned gradient", "member", lambda: _nan_gradient(t)),
    ]
    out = []
    for name, who, fn in attacks:
        if progress:
            progress(name)
        t0 = time.monotonic()
        try:
            refused, answer = fn()
        except SiloTuneError as exc:
            refused, answer = True, _short(exc)
        out.append(Outcome(name, who, refused, answer, time.monotonic() - t0))
    return out


def run_deployment(workdir, model: str, progress: Callable[[str], None] | None = None) -> dict:
    """A real deployment under attack: a server and two honest client processes over TLS (mutual TLS
    off, the harder case), a third enrolled identity and strangers attacking; then the honest
    clients' and the trunk's adapters compared with a run the attacker never joined.

    Returns {'outcomes', 'summary' (the server's), 'losses' (honest), 'max_diff', 'outputs'}."""
    import json
    import socket
    import subprocess
    import sys
    from pathlib import Path

    import yaml
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from ..client.runtime import adapter_state
    from ..config import load_config
    from ..deploy import make_keys
    from ..federation import build_client_parts
    from ..models.loading import resolve_model

    workdir = Path(workdir)
    keys = make_keys(workdir / "keys", 3, ["localhost", "127.0.0.1"])
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    raw = {"model": model, "split": {"head_blocks": 1, "tail_blocks": 1}, "adapters": {"lora": {"r": 4}},
           "optim": {"lr": 5.0e-3}, "data": {"max_train": 48, "max_test": 8, "max_length": 48},
           "federation": {"clients": 3, "local_steps": 2}, "train": {"steps": 36, "batch_size": 4},
           "deploy": {"keys": str(keys), "address": f"127.0.0.1:{port}", "mutual_tls": False,
                      "client_timeout": 3.0, "auth_seconds": 2.0, "receive_seconds": 5.0, "grace_seconds": 20.0},
           "output": str(workdir / "net")}
    path = workdir / "hostile.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def spawn(name, *args):  # output to a file: a full pipe would block a process that logs a lot
        log = open(workdir / f"{name}.log", "w")
        proc = subprocess.Popen([sys.executable, "-m", "silotune.cli", *args, "--config", str(path)],
                                stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
        log.close()
        return proc

    def output(name):
        return (workdir / f"{name}.log").read_text()

    server = spawn("server", "server")
    honest = []
    try:
        deadline = time.monotonic() + 300
        while "listening" not in output("server"):
            if server.poll() is not None or time.monotonic() > deadline:
                raise SiloTuneError(f"the server under attack never started listening: {output('server')[-2000:]}")
            time.sleep(0.2)
        honest = [spawn(f"client-{k}", "client", "--id", str(k), "--server", f"localhost:{port}") for k in (0, 1)]
        while not all("step 1 " in output(f"client-{k}") for k in (0, 1)):  # attack while they train
            if any(p.poll() is not None for p in honest) or time.monotonic() > deadline:
                raise SiloTuneError("the honest clients never started training")
            time.sleep(0.2)
        model_dir = resolve_model(cfg.model)
        start = adapter_state(*build_client_parts(model_dir, cfg.split, cfg.adapters, cfg.train.seed))
        mc = AutoConfig.from_pretrained(model_dir)
        target = Target(f"localhost:{port}", bytes.fromhex((keys / "server.pub").read_text().strip()),
                        (keys / "ca.crt").read_bytes(), 2, Identity.load(keys / "clients" / "client-2.pem"),
                        hidden=mc.hidden_size, max_batch=max(cfg.train.batch_size, cfg.train.eval_batch_size),
                        max_length=cfg.data.max_length, client_timeout=cfg.deploy.client_timeout,
                        auth_seconds=cfg.deploy.auth_seconds, layout={k: tuple(v.shape) for k, v in start.items()})
        outcomes = mount_all(target, progress)
        for p in [*honest, server]:
            p.wait(timeout=300)
    finally:
        for p in [server, *honest]:
            p.kill()
    outputs = [output("client-0"), output("client-1")]
    server_out = output("server")
    for name, p, out in [("client 0", honest[0], outputs[0]), ("client 1", honest[1], outputs[1]),
                         ("server", server, server_out)]:
        if p.returncode != 0:
            raise SiloTuneError(f"{name} exited with {p.returncode}: {out[-2000:]}")
    losses = [float(m.group(1)) for out in outputs for m in re.finditer(r"client \d+ step \d+ loss (\S+)", out)]
    expected = honest_reference(cfg, absent={2})
    got = {f"client-{k}": load_file(workdir / "net" / f"client-{k}" / "adapters.safetensors") for k in (0, 1)}
    got["trunk"] = load_file(workdir / "net" / "server" / "trunk.safetensors")
    max_diff = max(float((got[part][name] - value).abs().max())
                   for part, tensors in expected.items() for name, value in tensors.items())
    summary = json.loads((workdir / "net" / "server" / "summary.json").read_text())
    return {"outcomes": outcomes, "summary": summary, "losses": losses, "max_diff": max_diff,
            "outputs": {"server": server_out, "client 0": outputs[0], "client 1": outputs[1]}}


def honest_reference(cfg, absent: set[int]) -> dict[str, dict[str, torch.Tensor]]:
    """The adapters of a run in which the ``absent`` clients never take part (in-process, same code):
    {'client-K': tensors, 'trunk': tensors}, named as in the full model, as a deployment writes them."""
    from safetensors.torch import load

    from ..client.loop import run_concurrently
    from ..federation import build_parties, run_limits
    from ..models.loading import load_tokenizer, resolve_model
    from ..protocol.codec import wire_dtype
    from ..report import adapters_blob
    from ..simulate import budget, client_stream, prepare_data

    model_dir = resolve_model(cfg.model)
    tok = load_tokenizer(model_dir)
    _, rows, parts = prepare_data(cfg, tok)
    plan = budget(cfg)
    torch.manual_seed(cfg.train.seed)
    server, clients = build_parties(model_dir, cfg.split, cfg.adapters, cfg.optim, cfg.federation.clients,
                                    cfg.train.seed, wire_dtype(cfg.federation.wire_dtype), cfg.privacy,
                                    limits=run_limits(cfg), aggregation=cfg.aggregation)
    for k in absent:
        clients[k].finish()
    present = [c for c in clients if c.id not in absent]
    run_concurrently(present, [client_stream(cfg, tok, rows, parts[c.id], c.id) for c in present],
                     plan["steps_per_client"], cfg.federation.local_steps)  # as in simulate
    out = {f"client-{c.id}": load(adapters_blob([c.head, c.tail], cfg.adapters.method))
           for c in clients if c.id not in absent}
    out["trunk"] = load(adapters_blob([server.trunk], cfg.adapters.method))
    return out


def results_table(outcomes: list[Outcome]) -> str:
    rows = ["| attack | by | refused | the server's answer |", "|---|---|---|---|"]
    for o in outcomes:
        rows.append(f"| {o.attack} | {o.who} | {'yes' if o.refused else '**NO**'} | {o.answer.replace('|', '/')} |")
    return "\n".join(rows)
