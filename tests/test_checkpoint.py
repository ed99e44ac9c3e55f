"""Server checkpoints are atomic, round-trip the trunk state, and fail clearly when corrupt."""

import os
from pathlib import Path

import pytest
import torch

from silotune.adapters import AdapterSettings
from silotune.errors import SiloTuneError
from silotune.federation import SplitSettings, build_server
from silotune.server import checkpoint as ckpt
from silotune.train.optim import OptimSettings


def test_crash_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    ckpt.save(path, {"round": 1})

    def dies(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"half a checkpo")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies)
    with pytest.raises(OSError):
        ckpt.save(path, {"round": 2})
    monkeypatch.undo()
    assert ckpt.load(path)["round"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"garbage")
    with pytest.raises(SiloTuneError, match="checkpoint .* unreadable"):
        ckpt.load(path)


def test_server_state_roundtrips(tiny_dirs, tmp_path):
    path = tmp_path / "c.pt"
    a = build_server(tiny_dirs["llama"], SplitSettings(1, 1), AdapterSettings(), OptimSettings(), 2, 0,
                     checkpoint=path)
    with torch.no_grad():
        for p in a.trunk.parameters():
            if p.requires_grad:
                p.add_(0.5)
    a.runtime.steps = 7
    a.aggregator.load_state_dict({"round": 3, "aggregate": {k: v + 1 for k, v in a.aggregator.start.items()}})
    a._round_done(3)
    b = build_server(tiny_dirs["llama"], SplitSettings(1, 1), AdapterSettings(), OptimSettings(), 2, 0,
                     checkpoint=path)
    assert b.steps == 7 and b.aggregator.latest()[0] == 3
    for (n, p), (_, q) in zip(a.trunk.named_parameters(), b.trunk.named_parameters()):
        assert torch.equal(p, q), n


def _state(round_: int = 1) -> dict:
    return {"round": round_, "trunk": {"w": torch.arange(64, dtype=torch.float32)},
            "optim": {"state": {0: {"exp_avg": torch.zeros(4)}}, "param_groups": [{"lr": 0.1}]}}


def test_flipped_byte_in_tensor_data_is_refused_before_unpickling(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    ckpt.save(path, _state())
    data = bytearray(path.read_bytes())
    data[data.index(_state()["trunk"]["w"].numpy().tobytes()) + 160] ^= 0x01  # one bit of w[40]
    path.write_bytes(bytes(data))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("unpickled a corrupt checkpoint"))
    with pytest.raises(ckpt.CheckpointError, match=rf"checkpoint {path}: SHA-256 digest mismatch"):
        ckpt.load(path)


def test_truncated_and_foreign_files_are_refused(tmp_path):
    path = tmp_path / "checkpoint.pt"
    ckpt.save(path, _state())
    data = path.read_bytes()
    for cut in (len(data) - 10, 30, 3, 0):
        path.write_bytes(data[:cut])
        with pytest.raises(SiloTuneError, match=rf"checkpoint {path} is truncated"):
            ckpt.load(path)
    legacy = tmp_path / "legacy.pt"
    torch.save({"version": 1, "round": 0}, legacy)  # a v1 checkpoint: plain torch.save, no digest
    with pytest.raises(SiloTuneError, match="pre-v2 checkpoint .*--fresh"):
        ckpt.load(legacy)


def test_non_finite_tensor_is_refused_even_with_a_valid_digest(tmp_path):
    state = _state()
    state["optim"]["state"][0]["exp_avg"][2] = float("nan")
    with pytest.raises(ckpt.CheckpointError, match="refusing to save .* optim.state.0.exp_avg holds NaN"):
        ckpt.save(tmp_path / "refused.pt", state)
    assert not (tmp_path / "refused.pt").exists()
    path = tmp_path / "checkpoint.pt"  # written by hand: a correct header and digest around a NaN payload
    torch.save({"version": ckpt.VERSION, **state}, tmp_path / "payload")
    path.write_bytes(ckpt._frame((tmp_path / "payload").read_bytes()))
    with pytest.raises(ckpt.CheckpointError, match=rf"checkpoint {path}: tensor optim.state.0.exp_avg holds NaN"):
        ckpt.load(path)


def test_save_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    for r in (1, 2, 3):
        ckpt.save(path, _state(r))
    assert ckpt.load(path)["round"] == 3 and ckpt.load(ckpt.previous(path))["round"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "checkpoint.pt.prev"]
    assert path.stat().st_mode & 0o777 == 0o600
    ckpt.remove(path)
    assert list(tmp_path.iterdir()) == [] and ckpt.load_latest(path) is None


def test_load_latest_falls_back_to_prev_and_logs(tmp_path, caplog):
    path = tmp_path / "checkpoint.pt"
    ckpt.save(path, _state(1))
    ckpt.save(path, _state(2))
    assert ckpt.load_latest(path)[0]["round"] == 2
    path.write_bytes(path.read_bytes()[:-1])
    with caplog.at_level("WARNING"):
        state, used = ckpt.load_latest(path)
    assert state["round"] == 1 and used == ckpt.previous(path)
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].startswith(f"checkpoint {path} is truncated")
    assert any("using the previous checkpoint" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")


def test_load_latest_with_both_corrupt_is_a_clear_error(tmp_path):
    path = tmp_path / "checkpoint.pt"
    ckpt.save(path, _state(1))
    ckpt.save(path, _state(2))
    path.write_bytes(b"garbage")
    prev = ckpt.previous(path)
    prev.write_bytes(prev.read_bytes()[:100])
    with pytest.raises(ckpt.CheckpointError, match=rf"no usable checkpoint: checkpoint {path} is unreadable.*"
                                                   rf"checkpoint {prev} is truncated"):
        ckpt.load_latest(path)


def test_crash_between_renames_leaves_prev_usable(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    ckpt.save(path, _state(1))
    ckpt.save(path, _state(2))
    real = os.replace

    def dies_on_final_rename(src, dst):
        if Path(dst) == path:
            raise OSError("power cut")
        real(src, dst)

    monkeypatch.setattr(os, "replace", dies_on_final_rename)
    with pytest.raises(OSError):
        ckpt.save(path, _state(3))
    monkeypatch.undo()
    assert not path.exists()  # the current one became .prev, the new one never landed
    state, used = ckpt.load_latest(path)
    assert state["round"] == 2 and used == ckpt.previous(path)


def test_corrupt_checkpoint_is_never_kept_as_prev(tmp_path):
    path = tmp_path / "checkpoint.pt"
    ckpt.save(path, _state(1))
    ckpt.save(path, _state(2))
    path.write_bytes(b"garbage")
    ckpt.save(path, _state(3))
    assert ckpt.load(path)["round"] == 3 and ckpt.load(ckpt.previous(path))["round"] == 1


def test_server_resumes_from_prev_when_the_latest_checkpoint_is_corrupt(tiny_dirs, tmp_path, caplog):
    path = tmp_path / "c.pt"

    def server():
        return build_server(tiny_dirs["llama"], SplitSettings(1, 1), AdapterSettings(), OptimSettings(), 2, 0,
                            checkpoint=path)

    a = server()
    a.runtime.steps = 5
    a._round_done(0)
    a.runtime.steps = 9
    a._round_done(1)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with caplog.at_level("WARNING"):
        b = server()
    assert b.steps == 5
    assert any(str(path) in r.getMessage() and "digest mismatch" in r.getMessage() for r in caplog.records)
