"""The CLI: help for every command, one-line errors for bad input, and a complete run folder."""

import json
import subprocess
import sys

import pytest

from silotune.cli import main


def test_help_documents_every_command(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for cmd in ("simulate", "fetch", "tasks"):
        assert cmd in out
    with pytest.raises(SystemExit):
        main(["simulate", "--help"])
    assert "--config" in capsys.readouterr().out


def error_of(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ")
    return err[0]


def test_missing_config_file(capsys):
    assert "nope.yaml not found" in error_of(capsys, ["simulate", "--config", "nope.yaml"])


def test_malformed_config(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: [1,\n")
    assert f"{bad} line" in error_of(capsys, ["simulate", "--config", str(bad)])
    bad.write_text("train:\n  stepz: 3\n")
    assert "unknown key 'stepz'" in error_of(capsys, ["simulate", "--config", str(bad)])


def test_bad_model_and_split(capsys, tiny_chat_dir, tmp_path):
    assert "not found" in error_of(capsys, ["simulate", "--model", str(tmp_path / "missing")])
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert/config.json").write_text(json.dumps({"model_type": "bert"}))
    assert "unknown architecture 'bert'" in error_of(capsys, ["simulate", "--model", str(tmp_path / "bert")])
    msg = error_of(capsys, ["simulate", "--model", str(tiny_chat_dir), "--set", "split.head_blocks=3",
                            "--set", "split.tail_blocks=2", "--task", "rotten_tomatoes"])
    assert "a + c = 5" in msg


def test_malformed_data_row(capsys, tiny_chat_dir, tmp_path):
    data = tmp_path / "mine.jsonl"
    data.write_text('{"text": "good", "label": "pos"}\n{"text": "bad"}\n')
    msg = error_of(capsys, ["simulate", "--model", str(tiny_chat_dir), "--task", str(data)])
    assert str(data) in msg and "line 2" in msg


def test_no_traceback_from_the_real_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "silotune.cli", "simulate", "--config", str(tmp_path / "x.yaml")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.startswith("error:")


def test_simulate_writes_the_run_folder(capsys, tiny_chat_dir, tmp_path):
    out = tmp_path / "run"
    argv = ["simulate", "--model", str(tiny_chat_dir), "--task", "rotten_tomatoes", "--clients", "2",
            "--steps", "6", "--out", str(out), "--no-progress", "--set", "data.max_train=40",
            "--set", "data.max_test=12", "--set", "split.head_blocks=1", "--set", "split.tail_blocks=1",
            "--set", "train.batch_size=4", "--set", "federation.local_steps=3"]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    report = (out / "report.md").read_text()
    for key in ("federated", "centralized"):
        acc = metrics[key]["metrics"]["accuracy"]
        assert f"accuracy {acc:.4f}" in report
    assert (out / "loss.png").stat().st_size > 1000
    assert (out / "adapters/federated.safetensors").is_file()
    assert (out / "adapters/centralized.safetensors").is_file()
    assert metrics["federated"]["bytes_per_step"] > 0 and "| 1 |" in report
