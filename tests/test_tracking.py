"""Experiment tracking: TensorBoard events of simulated and deployed runs, log levels, progress bars."""

import json
import logging
import re
import subprocess
import sys
import threading

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from silotune import tracking
from silotune.cli import main
from silotune.config import load_config
from silotune.errors import ConfigError
from silotune.tracking import Tracker
from tests.test_deploy import cli, finish

TINY = ["--task", "rotten_tomatoes", "--clients", "2", "--steps", "8", "--set", "data.max_train=40",
        "--set", "data.max_test=12", "--set", "data.max_length=48", "--set", "split.head_blocks=1",
        "--set", "split.tail_blocks=1", "--set", "train.batch_size=4", "--set", "federation.local_steps=2"]
BAR = re.compile(r"\d+%\|")  # tqdm's "NN%|████|" (our bars, transformers', any library's)


@pytest.fixture(autouse=True)
def restore_logging():
    """main() sets up logging for the process: leave the root logger as the other tests expect it."""
    root = logging.getLogger()
    level = root.level
    yield
    for handler in [h for h in root.handlers if isinstance(h, tracking._StderrHandler)]:
        root.removeHandler(handler)
    root.setLevel(level)


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of a TensorBoard run folder as TensorBoard itself reads it: {tag: [(step, value), ...]}."""
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def values(points):
    return [v for _, v in points]


def test_simulation_events_hold_the_runs_numbers(tiny_chat_dir, tmp_path, capfd):
    out = tmp_path / "run"
    assert main(["simulate", "--model", str(tiny_chat_dir), *TINY, "--out", str(out)]) == 0
    err = capfd.readouterr().err
    for bar in ("federated (sequential)", "centralized", "evaluation (federated)", "evaluation (centralized)"):
        assert re.search(re.escape(bar) + r":\s+\d+%\|", err), bar  # progress bars are on by default
    m = json.loads((out / "metrics.json").read_text())
    fed, cen = m["federated"], m["centralized"]
    tb = out / "tensorboard"
    for k, client in enumerate(fed["clients"]):
        got = scalars(tb / f"client-{k}")
        assert [s for s, _ in got["train/loss"]] == [1, 2, 3, 4]
        assert values(got["train/loss"]) == pytest.approx(fed["curve"][k::2], rel=1e-6)  # curve: one step of each
        assert all(v > 0 for v in values(got["time/step_seconds"]))
        sent = values(got["wire/bytes_sent"])
        assert sent == sorted(sent) and 0 < sent[-1] <= client["bytes_up"]
        assert 0 < values(got["wire/bytes_received"])[-1] <= client["bytes_down"]
        assert got["fedavg/round"] == [(2, 0), (4, 1)]  # the averages each client loaded, after its steps 2 and 4
    server = scalars(tb / "server")
    assert values(server["fedavg/round"]) == [0, 1] and server["fedavg/round"][-1][0] == fed["trunk_steps"]
    assert values(server["fedavg/active_clients"]) == [2, 2]
    federated = scalars(tb / "federated")
    assert values(federated["train/loss"]) == pytest.approx(fed["curve"], rel=1e-6)
    assert federated["eval/accuracy"] == [(8, pytest.approx(fed["metrics"]["accuracy"]))]
    assert values(federated["wire/bytes_sent"]) == [sum(c["bytes_up"] for c in fed["clients"])]
    assert values(federated["wire/bytes_received"]) == [sum(c["bytes_down"] for c in fed["clients"])]
    assert values(federated["wire/bytes_per_step"]) == [pytest.approx(fed["bytes_per_step"])]
    centralized = scalars(tb / "centralized")
    assert values(centralized["train/loss"]) == pytest.approx(cen["curve"], rel=1e-6)
    assert values(centralized["eval/accuracy"]) == [pytest.approx(cen["metrics"]["accuracy"])]
    assert len(centralized["time/step_seconds"]) == 8


def test_no_progress_and_no_tensorboard_leave_stderr_and_the_folder_clean(tiny_chat_dir, tmp_path, capfd):
    out = tmp_path / "quiet"
    argv = ["simulate", "--model", str(tiny_chat_dir), *TINY, "--steps", "4", "--out", str(out), "--no-progress",
            "--set", "tracking.tensorboard=false"]
    assert main(argv) == 0
    captured = capfd.readouterr()
    assert not BAR.search(captured.err) and "\r" not in captured.err, captured.err[-2000:]
    assert captured.err.strip() == ""  # nor any log line: simulate logs warnings only, by default
    assert "federated split: accuracy" in captured.out
    assert (out / "metrics.json").is_file() and not (out / "tensorboard").exists()


def test_tracking_settings_are_checked():
    cfg = load_config(None, ["tracking.dir=tb/exp", "tracking.client_eval=false"])
    assert cfg.tracking.dir == "tb/exp" and cfg.tracking.tensorboard and not cfg.tracking.client_eval
    with pytest.raises(ConfigError, match="tracking: unknown key 'board'"):
        load_config(None, ["tracking.board=true"])
    with pytest.raises(ConfigError, match="tracking.dir"):
        load_config(None, ["tracking.dir=' '"])


def test_missing_tensorboard_warns_once_and_writes_nothing(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were not installed
    monkeypatch.setattr(tracking, "_missing_warned", threading.Event())
    with caplog.at_level(logging.WARNING, logger="silotune.tracking"):
        trackers = [Tracker(tmp_path / "tb" / name) for name in ("a", "b")]
        for t in trackers:
            t.train_step(1, 0.5, 0.1)
            t.close()
    assert not any(t.enabled for t in trackers) and not (tmp_path / "tb").exists()
    warnings = [r.getMessage() for r in caplog.records if r.name == "silotune.tracking"]
    assert len(warnings) == 1 and "pip install 'silotune[tracking]'" in warnings[0]


KILLED = """
import os, sys
from silotune.tracking import Tracker
from tests.test_deploy import cli, finish
t = Tracker(sys.argv[1])
for step in range(1, 6):
    t.train_step(step, 1.0 / step)
t.server_round(5, 0, 3, {"crypto": 2})  # a round flushes
t.train_step(6, 0.1)
os._exit(9)  # killed: no close, no atexit
"""


def test_a_killed_process_leaves_readable_events_up_to_its_last_flush(tmp_path):
    proc = subprocess.run([sys.executable, "-c", KILLED, str(tmp_path / "tb")], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    got = scalars(tmp_path / "tb")
    assert values(got["train/loss"])[:5] == pytest.approx([1.0, 0.5, 1 / 3, 0.25, 0.2])
    assert got["fedavg/round"] == [(5, 0)] and got["refused/crypto"] == [(5, 2)]


def test_a_restarted_party_replaces_its_stale_points(tmp_path):
    first = Tracker(tmp_path / "tb")
    for step in range(1, 7):
        first.train_step(step, float(step))
    first.close()
    resumed = Tracker(tmp_path / "tb", purge_step=5)  # e.g. a server resumed from its checkpoint at step 4
    resumed.train_step(5, 50.0)
    resumed.close()
    assert scalars(tmp_path / "tb")["train/loss"] == [(1, 1), (2, 2), (3, 3), (4, 4), (5, 50)]
    fresh = Tracker(tmp_path / "tb")  # a new run in the same folder: nothing of the old ones shows
    fresh.train_step(1, 7.0)
    fresh.close()
    assert scalars(tmp_path / "tb")["train/loss"] == [(1, 7)]


def test_log_level(capsys):
    say = logging.getLogger("silotune.test")
    for argv, shown in ((["tasks"], "warning"), (["--log-level", "info", "tasks"], "info"),
                        (["-v", "tasks"], "debug"), (["--log-level", "error", "tasks"], "error")):
        assert main(argv) == 0
        capsys.readouterr()
        for name in ("debug", "info", "warning", "error"):
            getattr(say, name)("%s line", name)
        err = capsys.readouterr().err
        levels = ["debug", "info", "warning", "error"]
        for name in levels:
            assert (f"{name} line" in err) == (levels.index(name) >= levels.index(shown)), (argv, err)
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ERROR silotune.test: error line$", err, re.M)
    with pytest.raises(SystemExit):
        main(["--log-level", "info", "-v", "tasks"])
    capsys.readouterr()
    main(["--log-level", "info", "tasks"])
    logging.getLogger("grpc.x").info("library line")  # other libraries: warnings only, unless debug
    logging.getLogger("grpc.x").warning("library warning")
    err = capsys.readouterr().err
    assert "library line" not in err and "library warning" in err


LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR) [\w.]+: ")


def test_deployment_logs_instead_of_printing_and_writes_events(deployment, tmp_path, capsys):
    """A real deployment (gRPC, TLS, AEAD) at the default log level (info): the server in this process (its
    stdout must stay empty), two client processes whose every output line is a log line (no print, and no
    progress bar off a terminal). Each party writes its events next to its outputs."""
    path, port = deployment
    two = ["--set", "federation.clients=2", "--set", "train.steps=8"]
    server = threading.Thread(target=main, args=(["server", "--config", str(path), *two],))
    server.start()
    clients = [cli("client", "--config", str(path), "--id", str(k), "--server", f"localhost:{port}", *two)
               for k in range(2)]  # they retry until the server listens
    outs = finish(clients)
    server.join(timeout=120)
    assert not server.is_alive()
    captured = capsys.readouterr()
    assert captured.out == ""
    for line in ("listening on port", "round 1 averaged", "all clients finished; 8 trunk steps; rejected: none"):
        assert line in captured.err, line
    net = tmp_path / "net"
    assert scalars(net / "server/tensorboard")["fedavg/round"] == [(4, 0), (8, 1)]
    for k, out in enumerate(outs):
        assert all(LOG_LINE.match(line) for line in out.splitlines()), out
        for line in (f"client {k} step 4 loss", f"client {k}: accuracy", f"client {k}: 4 steps"):
            assert line in out, line
        got = scalars(net / f"client-{k}/tensorboard")
        logged = [float(x) for x in re.findall(rf"client {k} step \d+ loss (\S+)", out)]
        assert values(got["train/loss"]) == pytest.approx(logged, abs=5e-5)  # the log lines, to 4 decimals
        assert [s for s, _ in got["train/loss"]] == [1, 2, 3, 4]
        assert got["fedavg/round"] == [(2, 0), (4, 1)]
        assert values(got["wire/bytes_sent"])[-1] > 0 and len(got["time/step_seconds"]) == 4
        assert got["eval/accuracy"][0][0] == 4 and 0 <= got["eval/accuracy"][0][1] <= 1
