"""Server checkpoints are atomic, round-trip the trunk state, and fail clearly when corrupt."""

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
    a.steps = 7
    a.aggregator.results[3] = {"head.x": torch.ones(2)}
    a._round_done(3)
    b = build_server(tiny_dirs["llama"], SplitSettings(1, 1), AdapterSettings(), OptimSettings(), 2, 0,
                     checkpoint=path)
    assert b.steps == 7 and b.aggregator.latest()[0] == 3
    for (n, p), (_, q) in zip(a.trunk.named_parameters(), b.trunk.named_parameters()):
        assert torch.equal(p, q), n
