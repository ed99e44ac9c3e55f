"""docs/config.md is generated from the settings dataclasses: it must match them, and every key needs a description."""

import dataclasses
import typing
from dataclasses import dataclass, field

from silotune import configdoc
from silotune.audit.settings import AuditConfig
from silotune.config import RunConfig


def test_docs_config_md_is_the_generators_output():
    committed = configdoc.DOC_PATH.read_text(encoding="utf-8")
    assert committed == configdoc.render(), "docs/config.md is out of date: run python -m silotune.configdoc"


def test_every_key_has_a_description():
    assert configdoc.undocumented(RunConfig) == []
    assert configdoc.undocumented(AuditConfig) == []


def _leaves(cls, prefix=""):
    """Every leaf key of a config tree, walked independently of configdoc."""
    out, hints = [], typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += _leaves(tp, prefix + f.name + ".")
        elif not f.metadata.get("internal"):
            out.append(prefix + f.name)
    return out


def test_every_key_of_both_trees_is_in_the_document():
    text = configdoc.DOC_PATH.read_text(encoding="utf-8")
    leaves = _leaves(RunConfig) + _leaves(AuditConfig)
    assert len(leaves) > 100
    for key in leaves:
        assert f"| `{key}` |" in text, key
    assert "base_path" not in text  # set by the loader, not a key of the file


@dataclass
class _Inner:
    depth: int = 3
    """How deep | it goes."""


@dataclass
class _Outer:
    name: str = "x"
    """The name; None: derived."""
    ratio: float | None = 0.5
    tags: list[str] = field(default_factory=lambda: ["a", "b"])
    """Tags, ``plain``."""
    inner: _Inner = field(default_factory=_Inner)
    """The inner section."""
    hidden: int = field(default=0, metadata={"internal": True})


def test_keys_read_docstrings_types_and_defaults_from_the_dataclass():
    keys = {k.path: k for k in configdoc.keys(_Outer)}
    assert list(keys) == ["name", "ratio", "tags", "inner", "inner.depth"]
    assert (keys["name"].type, keys["name"].default, keys["name"].help) == ("str", "`x`", "The name; None: derived.")
    assert (keys["ratio"].type, keys["ratio"].default, keys["ratio"].help) == ("float or null", "`0.5`", "")
    assert (keys["tags"].type, keys["tags"].default) == ("list of str", "`[a, b]`")
    assert keys["inner"].type == "section" and keys["inner.depth"].default == "`3`"
    assert configdoc.undocumented(_Outer) == ["ratio"]
    rows = "\n".join(configdoc.table(list(keys.values())))
    assert "| `name` | str | `x` | The name; null: derived. |" in rows
    assert "| `tags` | list of str | `[a, b]` | Tags, `plain`. |" in rows
    assert "How deep \\| it goes." in rows


def test_check_mode_reports_a_stale_file(tmp_path):
    stale = tmp_path / "config.md"
    stale.write_text("old\n")
    assert configdoc.main(["--out", str(stale), "--check"]) == 1
    assert configdoc.main(["--out", str(stale)]) == 0
    assert configdoc.main(["--out", str(stale), "--check"]) == 0
    assert stale.read_text() == configdoc.render()
