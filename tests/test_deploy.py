"""Real processes over loopback: one server and three clients train exactly like the simulation."""

import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from silotune.config import load_config
from silotune.simulate import run


def cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # four tiny processes on a small machine: no oversubscription
    return subprocess.Popen([sys.executable, "-m", "silotune.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)


def wait_listening(proc, timeout=120):
    wait_for(proc, "listening", timeout)


PROMPTS = ["The movie was", "A quiet film about"]


def test_three_client_processes_equal_the_simulation(deployment, tmp_path):
    """Three client processes train like the simulation; then the server, kept serving, answers a client's split
    generation (KV caches on both sides) with the text the simulation's split model generates."""
    path, port = deployment
    server = cli("server", "--config", str(path), "--keep-serving")
    try:
        wait_listening(server)
        clients = [cli("client", "--config", str(path), "--id", str(k), "--server", f"localhost:{port}")
                   for k in range(3)]
        for c in clients:
            out, _ = c.communicate(timeout=300)
            assert c.returncode == 0, out
        wait_for(server, "serving generation")
        gen = cli("generate", "--config", str(path), "--id", "0", "--server", f"localhost:{port}", "--no-progress",
                  "--max-new-tokens", "6", "--output", str(tmp_path / "deployed.jsonl"), "--set",
                  "generate.stop_at_eos=false", *[a for p in PROMPTS for a in ("--prompt", p)])
        finish([gen], timeout=120)
        server.terminate()  # SIGTERM: a kept-serving server ends cleanly
        out, _ = server.communicate(timeout=60)
        assert server.returncode == 0, out
        assert "rejected: none" in out
    finally:
        server.kill()
    sim = run(load_config(path, [f"output={tmp_path / 'sim'}", "centralized=false"]), progress=False)
    from silotune.cli import main

    assert main(["generate", "--config", str(path), "--run", str(tmp_path / "sim"), "--no-progress",
                 "--max-new-tokens", "6", "--output", str(tmp_path / "simulated.jsonl"), "--set",
                 "generate.stop_at_eos=false", *[a for p in PROMPTS for a in ("--prompt", p)]]) == 0
    deployed = (tmp_path / "deployed.jsonl").read_text().splitlines()
    assert len(deployed) == 2 and deployed == (tmp_path / "simulated.jsonl").read_text().splitlines()
    expected = load_file(tmp_path / "sim/adapters/federated.safetensors")
    got = load_file(tmp_path / "net/server/trunk.safetensors")
    for k in range(3):
        client = load_file(tmp_path / f"net/client-{k}/adapters.safetensors")
        assert set(client) | set(got) == set(expected)
        for name, value in client.items():
            assert torch.allclose(value, expected[name], atol=1e-6, rtol=0), name
    for name, value in got.items():
        assert torch.allclose(value, expected[name], atol=1e-6, rtol=0), name
    assert sim["federated"]["steps"] == 12


def wait_for(proc, text, timeout=180):
    start, seen = time.monotonic(), []
    while time.monotonic() - start < timeout:
        line = proc.stdout.readline()
        seen.append(line)
        if text in line:
            return
        if not line and proc.poll() is not None:
            break
    raise AssertionError(f"never saw {text!r}: {''.join(seen)[-2000:]}")


def finish(procs, timeout=300):
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        outs.append(out)
        assert p.returncode == 0, out[-3000:]
    return outs


def test_killed_client_is_dropped_and_rejoins(deployment, tmp_path):
    path, port = deployment
    fast = ["--set", "deploy.client_timeout=3", "--set", "train.steps=18"]
    server = cli("server", "--config", str(path), *fast)
    try:
        wait_listening(server)
        addr = ["--server", f"localhost:{port}"]
        c0, c1 = (cli("client", "--config", str(path), "--id", str(k), *addr, *fast) for k in (0, 1))
        victim = cli("client", "--config", str(path), "--id", "2", *addr, *fast)
        wait_for(victim, "client 2 step 3")
        victim.kill()  # dies in the middle of round 1
        victim.wait()
        wait_for(c0, "client 0 step 5")  # the others go on without it
        again = cli("client", "--config", str(path), "--id", "2", *addr, *fast)
        outs = finish([c0, c1, again])
        assert "joining at round" in outs[2]
        server_out = finish([server])[0]
        assert "client 2 dropped from the rotation" in server_out
    finally:
        server.kill()
    assert (tmp_path / "net/server/trunk.safetensors").is_file()


@pytest.mark.parametrize("tee", [False, True], ids=["plain", "tee"])
def test_killed_server_resumes_from_checkpoint(deployment, tmp_path, tee):
    """SIGKILL the server mid-run and start it again: it resumes from its checkpoint and every client finishes.
    In TEE mode (the enclave keeps its trunk) the checkpoint is sealed, the new enclave opens it, and the clients
    open new sessions with the new enclave (attested again) on their own."""
    path, port = deployment
    slow = ["--set", "train.steps=24", "--set", "deploy.client_timeout=5"]
    if tee:
        slow += ["--set", "tee.mode=server", "--set", "tee.worker=inprocess", "--set", "tee.release_trunk=false"]
    server = cli("server", "--config", str(path), *slow)
    try:
        wait_listening(server)
        clients = [cli("client", "--config", str(path), "--id", str(k), "--server", f"localhost:{port}", *slow)
                   for k in range(3)]
        ckpt = tmp_path / "net/server/checkpoint.pt"
        deadline = time.monotonic() + 180
        while not ckpt.is_file() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ckpt.is_file()
        server.kill()  # SIGKILL: no chance to clean up
        server.wait()
        server = cli("server", "--config", str(path), *slow)
        out = finish(clients)
        server_out = finish([server])[0]
        assert "resumed from checkpoint" in server_out
        assert all("adapters in" in o for o in out)
    finally:
        server.kill()
    assert (tmp_path / ("net/server/trunk.sealed" if tee else "net/server/trunk.safetensors")).is_file()
    if tee:
        assert b"lora" not in (tmp_path / "net/server/checkpoint.pt").read_bytes()  # sealed: no tensor names either
