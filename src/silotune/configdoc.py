"""Generate ``docs/config.md``, the reference of every configuration key, from the settings dataclasses.

Every field of a settings dataclass is described by its *attribute docstring*: the string
literal on the lines right after the field, as Sphinx's autodoc reads them::

    @dataclass
    class TrainSettings:
        steps: int = 240
        \"\"\"Optimizer steps of the centralized run; the federation spends the same examples.\"\"\"

This module reads those strings from the classes' source (``ast``), walks the whole
``RunConfig`` tree (and the audit's ``AuditConfig``) from the dataclasses as they are when
it runs, and renders one table row per key: dotted path, type, default and description.
A top-level section's class docstring, past its summary line, follows its table as notes.
A field whose metadata has ``internal: True`` is set by SiloTune, not by a config file,
and is left out. ``tests/test_configdoc.py`` checks that the committed file equals this
output and that every field has a description::

    python -m silotune.configdoc            # rewrite docs/config.md
    python -m silotune.configdoc --check    # exit 1 if docs/config.md is out of date
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import re
import sys
import textwrap
import types
import typing
from dataclasses import dataclass
from pathlib import Path

DOC_PATH = Path(__file__).resolve().parents[2] / "docs" / "config.md"


@dataclass(frozen=True)
class Key:
    """One documented configuration key (or a section, whose ``type`` is ``section``)."""

    path: str
    type: str
    default: str
    help: str


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """``{field name: attribute docstring}`` of a dataclass, read from its source."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = ast.parse(source).body[0].body
    docs = {}
    for stmt, after in zip(body, body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[stmt.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return docs


def type_name(tp) -> str:
    """A config type as a user writes it in YAML: ``int``, ``list of str``, ``float or null``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        names = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin is list:
        return f"list of {type_name(args[0])}"
    if origin is dict:
        return f"mapping of {type_name(args[0])} to {type_name(args[1])}"
    if tp is Path:
        return "path"
    return getattr(tp, "__name__", str(tp))


def yaml_value(value) -> str:
    """A default value as it would be written in a YAML file (flow style)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return value if value.strip() and value == value.strip() else f'"{value}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(yaml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {yaml_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def keys(cls: type, prefix: str = "") -> list[Key]:
    """Every key of the dataclass ``cls`` and of its nested sections, depth first, in field order."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        path, tp = prefix + f.name, hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.append(Key(path, "section", "", docs.get(f.name, "")))
            out += keys(tp, path + ".")
            continue
        default = _default(f)
        shown = "(required)" if default is dataclasses.MISSING else f"`{yaml_value(default)}`"
        out.append(Key(path, type_name(tp), shown, docs.get(f.name, "")))
    return out


def section_notes(cls: type) -> str:
    """The paragraphs of a section class's own docstring after its summary line ("" if none)."""
    doc = cls.__dict__.get("__doc__") or ""
    if doc.startswith(cls.__name__ + "("):  # the signature dataclasses write when a class has no docstring
        return ""
    parts = inspect.cleandoc(doc).split("\n\n", 1)
    return parts[1].strip() if len(parts) > 1 else ""


def undocumented(cls: type) -> list[str]:
    """Dotted paths of the keys (and sections) of ``cls`` that have no description."""
    return [k.path for k in keys(cls) if not k.help]


def markdown_text(doc: str) -> str:
    """A docstring as user-facing markdown: reST's double backquotes become markdown's single ones, Python's
    None is YAML's null, and a pipe is escaped for the table cell."""
    return re.sub(r"\bNone\b", "null", doc.replace("``", "`")).replace("|", "\\|")


def table(rows: list[Key]) -> list[str]:
    """A markdown table of ``rows``."""
    lines = ["| key | type | default | description |", "|---|---|---|---|"]
    for k in rows:
        lines.append(f"| `{k.path}` | {k.type} | {k.default} | {markdown_text(k.help)} |")
    return lines


def sections(cls: type) -> list[str]:
    """One heading and table per top-level section of ``cls``; its plain keys first, under "top level"."""
    all_keys = keys(cls)
    top = [k for k in all_keys if "." not in k.path and k.type != "section"]
    lines = []
    if top:
        lines += ["### Top level", ""] + table(top) + [""]
    hints = typing.get_type_hints(cls)
    for section in (k for k in all_keys if "." not in k.path and k.type == "section"):
        inner = [k for k in all_keys if k.path.startswith(section.path + ".")]
        lines += [f"### `{section.path}:`", "", markdown_text(section.help), ""] + table(inner) + [""]
        notes = section_notes(hints[section.path])
        if notes:
            lines += [" ".join(par.split()).replace("``", "`") + "\n" for par in notes.split("\n\n")]
    return lines


HEADER = """# Configuration reference

<!-- Generated by `python -m silotune.configdoc` from the settings dataclasses' field docstrings;
do not edit by hand: edit the docstrings and re-run it (tests/test_configdoc.py checks they agree). -->

A run configuration is a YAML file whose sections map one-to-one onto these keys; every key is
optional (the default applies) and an unknown key or a wrongly typed value is refused with one
error line naming the file and the key. On the command line, `--set key=value` overrides any key
(the value is read as YAML: quote strings that contain `:` or braces, e.g.
`--set 'data.template="Q: {text}\\nA:"'`); a run folder's `config.yaml` holds every key as resolved.
`null` means "none" or "derive it", as each description says.
"""


def render() -> str:
    """The whole of ``docs/config.md``."""
    from .audit.settings import AuditConfig
    from .config import RunConfig

    lines = [HEADER, "## Run configuration (`silotune simulate`, `server`, `client`)", ""]
    lines += sections(RunConfig)
    lines += ["## Audit configuration (`silotune audit --config`)", "",
              "An audit file names a run configuration (`base`) and the defences and attacks to measure on it.", ""]
    lines += sections(AuditConfig)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m silotune.configdoc", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DOC_PATH, help=f"where to write (default {DOC_PATH})")
    parser.add_argument("--check", action="store_true", help="exit 1 if the file differs from the output")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.is_file() else ""
        if current != text:
            print(f"{args.out} is out of date: run python -m silotune.configdoc", file=sys.stderr)
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out} ({text.count(chr(10))} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
