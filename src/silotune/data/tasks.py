"""Tasks and prompts: turn a built-in task or a user data file into train/test Examples.

An :class:`Example` is a ``prompt`` plus the ``target`` text the model must produce
right after it. Classification targets are verbalizers with a leading space
(``" positive"``) and carry ``label``, the index into ``TaskSpec.choices``.

Built-in tasks (fetched and cached by :mod:`silotune.data.fetch`):

==========================  ==============  =====================================================
``rotten_tomatoes``         classification  ``Review: {text}\\nSentiment:`` -> `` negative``/`` positive``
``strategyqa``              classification  ``Question: {text}\\nAnswer (yes or no):`` -> `` no``/`` yes``
``presuppositions_as_nli``  classification  ``Sentence 1: {premise}\\nSentence 2: {hypothesis}\\n``
                                            ``Relation (entailment, neutral or contradiction):``
                                            -> `` entailment``/`` neutral``/`` contradiction``
``xsum`` (``gem/xsum``)     generation      ``Document: {document}\\nOne-sentence summary:`` -> `` {summary}``
==========================  ==============  =====================================================

User data files (``.jsonl``, one JSON object per line, or ``.csv`` with a header line):

* classification rows have ``text`` and ``label``; ``label`` is an int index into
  ``choices`` or the choice string without its leading space (``"positive"``).
  Choices come from ``load_task(..., choices=[...])``; if omitted they are the sorted
  distinct string labels. Prompt: ``Text: {text}\\nLabel:``.
* generation rows have ``prompt`` and ``target``; the prompt is used as is and the
  target is appended verbatim (include a leading space if your tokenizer expects one).

The first row decides the kind (a ``prompt`` field means generation); other fields
are ignored. Malformed rows raise DataError naming the file and its 1-based line.

Splitting: examples are shuffled with ``random.Random(seed)``; the first ``n_test`` of
that order are the test set, the rest the training set; ``max_test``/``max_train`` then
keep prefixes, so a seed's test set never depends on ``max_train``. By default
``n_test = min(1000, round(0.2 * n))`` (rotten_tomatoes: 1000, strategyqa: 458,
presuppositions_as_nli: 146, xsum: 200); ``test_size`` or ``test_fraction`` override it.
Template fields are cut to ``max_chars`` characters (default 2000, at a word boundary,
marked with ``" ..."``); targets are never cut.

Nothing is dropped or cut without a word: ``load_task`` logs one warning line (naming the
file, what happened and how many) when fields were cut to ``max_chars``, when a class has
no training or no test example after the split (a class needs two examples to be in both),
or when a choice has no example at all; :mod:`silotune.data.userfile` warns about repeated
rows and :mod:`silotune.data.records` about skipped blank CSV rows.
"""

from __future__ import annotations

import logging
import os
import random
import string
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from silotune.data.fetch import ALIASES, canonical_task, ensure_task
from silotune.data.records import iter_jsonl
from silotune.data.userfile import read_user_file
from silotune.errors import DataError

DEFAULT_MAX_CHARS = 2000
DEFAULT_TEST_FRACTION = 0.2
DEFAULT_MAX_TEST = 1000

log = logging.getLogger(__name__)


def template_fields(template: str) -> list[str]:
    """The record fields a ``str.format`` template reads; ValueError if it is malformed or uses
    positional (``{}``, ``{0}``) or dotted/indexed (``{a.b}``, ``{a[0]}``) fields."""
    if not isinstance(template, str) or not template.strip():
        raise ValueError(f"the template must be a non-empty string, got {template!r}")
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise ValueError(f"bad template {template!r} ({exc})") from None
    if not all(n.isidentifier() for n in names):
        raise ValueError(f"template fields must be plain names, like {{text}}: {template!r}")
    return names


@dataclass
class Example:
    """One model input: ``prompt`` followed by the expected ``target``; ``label`` for classification."""

    prompt: str
    target: str
    label: int | None = None


@dataclass
class TaskSpec:
    """How records of a task become Examples.

    ``template`` is a :meth:`str.format` string over record fields. Classification
    records carry ``label`` (an index into ``choices``, the target verbalizers);
    generation records carry ``target_field``, prefixed with ``target_prefix``.
    """

    name: str
    kind: str  # 'classification' | 'generation'
    choices: list[str]
    template: str
    target_field: str | None = None
    target_prefix: str = " "

    def __post_init__(self) -> None:
        if self.kind not in ("classification", "generation"):
            raise ValueError(f"task {self.name}: kind must be 'classification' or 'generation', not {self.kind!r}")
        if (self.kind == "classification") != bool(self.choices):
            raise ValueError(f"task {self.name}: classification needs choices, generation must have none")
        if self.kind == "generation" and not self.target_field:
            raise ValueError(f"task {self.name}: generation needs a target_field")
        try:
            template_fields(self.template)
        except ValueError as exc:
            raise ValueError(f"task {self.name}: {exc}") from None

    @property
    def fields(self) -> list[str]:
        """Record fields the template uses."""
        return template_fields(self.template)

    @property
    def label_names(self) -> list[str]:
        """The choices without their leading space, as reports name the classes."""
        return [c.strip() for c in self.choices]

    def example(self, record: dict, *, max_chars: int | None = DEFAULT_MAX_CHARS, where: str = "record") -> Example:
        """The Example for one record; DataError naming ``where`` if a field is missing or wrong."""
        values = {}
        for name in self.fields:
            value = record.get(name)
            if not isinstance(value, str):
                raise DataError(f"{where}: missing or non-string field {name!r}")
            values[name] = truncate(value, max_chars)
        prompt = self.template.format(**values)
        if self.kind == "generation":
            target = record.get(self.target_field)
            if not isinstance(target, str):
                raise DataError(f"{where}: missing or non-string field {self.target_field!r}")
            return Example(prompt, self.target_prefix + target)
        label = record.get("label")
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(self.choices):
            raise DataError(f"{where}: label must be an int in [0, {len(self.choices)}), got {label!r}")
        return Example(prompt, self.choices[label], label)


@dataclass
class TaskData:
    """A task with its deterministic train/test split."""

    spec: TaskSpec
    train: list[Example] = field(default_factory=list)
    test: list[Example] = field(default_factory=list)

    def label_counts(self, indices: list[int] | None = None) -> dict[str, int]:
        """Training examples per class name (of ``indices`` into ``train``, default all), every class
        listed in choice order; empty for a generation task."""
        examples = self.train if indices is None else [self.train[i] for i in indices]
        counts = Counter(e.label for e in examples)
        return {name: counts.get(k, 0) for k, name in enumerate(self.spec.label_names)}


BUILTIN_TASKS: dict[str, TaskSpec] = {
    "rotten_tomatoes": TaskSpec(
        "rotten_tomatoes", "classification", [" negative", " positive"], "Review: {text}\nSentiment:"
    ),
    "strategyqa": TaskSpec("strategyqa", "classification", [" no", " yes"], "Question: {text}\nAnswer (yes or no):"),
    "presuppositions_as_nli": TaskSpec(
        "presuppositions_as_nli",
        "classification",
        [" entailment", " neutral", " contradiction"],
        "Sentence 1: {premise}\nSentence 2: {hypothesis}\nRelation (entailment, neutral or contradiction):",
    ),
    "xsum": TaskSpec("xsum", "generation", [], "Document: {document}\nOne-sentence summary:", target_field="summary"),
}
USER_CLASSIFICATION_TEMPLATE = "Text: {text}\nLabel:"


def truncate(text: str, max_chars: int | None) -> str:
    """``text`` cut to at most ``max_chars`` characters, at a word boundary, ending in ``" ..."``."""
    if max_chars is None or len(text) <= max_chars:
        return text
    keep = max(max_chars - 4, 1)
    cut = text[:keep]
    space = max(cut.rfind(" "), cut.rfind("\n"))
    if space >= keep * 0.8:
        cut = cut[:space]
    return cut.rstrip() + " ..."


def builtin_task_names() -> list[str]:
    """Canonical names of the built-in tasks (aliases such as ``gem/xsum`` also work)."""
    return list(BUILTIN_TASKS)


def default_test_size(n: int) -> int:
    """``min(1000, round(0.2 * n))``, at least 1 and leaving at least one training example."""
    return min(max(round(DEFAULT_TEST_FRACTION * n), 1), DEFAULT_MAX_TEST, n - 1)


def split_indices(n: int, n_test: int, seed: int) -> tuple[list[int], list[int]]:
    """``(train, test)`` index lists: the first ``n_test`` of a ``random.Random(seed)`` shuffle are test."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order[n_test:], order[:n_test]


def _is_builtin(name: object) -> bool:
    return isinstance(name, str) and (name in BUILTIN_TASKS or name in ALIASES)


def _load_records(name_or_path, choices, template) -> tuple[TaskSpec, list[tuple[str, dict]], str]:
    """The task's spec, its records (each with a location for error messages) and how messages name it
    (``task NAME`` for a built-in task, ``data file PATH`` for a user file)."""
    if _is_builtin(name_or_path):
        if choices is not None:
            raise ValueError(f"choices apply to user data files, not to built-in task {name_or_path!r}")
        name = canonical_task(name_or_path)
        spec = BUILTIN_TASKS[name]
        path = ensure_task(name)
        records = [(f"data file {path} line {line}", row) for line, row in iter_jsonl(path)]
    else:
        path = Path(name_or_path)
        looks_like_path = isinstance(name_or_path, os.PathLike) or bool(path.suffix)
        if path.suffix.lower() not in (".jsonl", ".csv"):
            if looks_like_path or path.exists():
                raise DataError(f"data file {path}: unsupported type {path.suffix or '(none)'!r}, use .jsonl or .csv")
            canonical_task(str(name_or_path))  # raises the unknown-task error listing known tasks
        kind, user_choices, rows = read_user_file(path, choices)
        if kind == "generation":
            spec = TaskSpec(path.stem, kind, [], "{prompt}", target_field="target", target_prefix="")
        else:
            spec = TaskSpec(path.stem, kind, user_choices, USER_CLASSIFICATION_TEMPLATE)
        records = [(f"data file {path} line {line}", row) for line, row in rows]
    if template is not None:
        spec = TaskSpec(spec.name, spec.kind, spec.choices, template, spec.target_field, spec.target_prefix)
    return spec, records, f"task {spec.name}" if _is_builtin(name_or_path) else f"data file {path}"


def _plural(n: int, word: str, plural: str | None = None) -> str:
    return f"{n:,} {word}" if n == 1 else f"{n:,} {plural or word + 's'}"


def _warn_cut_fields(spec: TaskSpec, records: list[tuple[str, dict]], max_chars: int | None, source: str) -> None:
    """One warning counting the records whose template fields were cut to ``max_chars``."""
    if max_chars is None:
        return
    sizes = [max(len(row[f]) for f in spec.fields) for _, row in records if spec.fields]
    over = [n for n in sizes if n > max_chars]
    if over:
        log.warning("%s: %s had a field longer than the %s-character cap (data.max_field_chars) and were cut "
                    "to it; the longest field had %s characters", source, _plural(len(over), "row"),
                    f"{max_chars:,}", f"{max(over):,}")


def _warn_class_coverage(spec: TaskSpec, labels: list[int], train: list[int], test: list[int], source: str) -> None:
    """Warnings for choices with no example, and classes absent from the training or the test set."""
    names = spec.label_names
    total = Counter(labels)
    in_train = Counter(labels[i] for i in train)
    in_test = Counter(labels[i] for i in test)
    empty = [names[k] for k in range(len(names)) if not total[k]]
    if empty:
        log.warning("%s: %s of %d choices %s no example: %s", source, len(empty), len(names),
                    "has" if len(empty) == 1 else "have", ", ".join(map(repr, empty)))
    for where, counts, effect in (("training", in_train, "the model never learns it"),
                                  ("test", in_test, "it is never evaluated")):
        missing = [k for k in sorted(total) if not counts[k]]
        if missing:
            listed = ", ".join(f"{names[k]!r} ({_plural(total[k], 'example')} in all)" for k in missing)
            hint = "; a class needs 2 examples to be in both train and test" if min(total[k] for k in missing) < 2 \
                else ""
            log.warning("%s: %s no %s example (%s%s): %s", source, _plural(len(missing), "class has", "classes have"),
                        where, effect, hint, listed)


def load_task(
    name_or_path: str | os.PathLike,
    *,
    seed: int = 0,
    test_fraction: float | None = None,
    test_size: int | None = None,
    max_train: int | None = None,
    max_test: int | None = None,
    choices: list[str] | None = None,
    template: str | None = None,
    max_chars: int | None = DEFAULT_MAX_CHARS,
) -> TaskData:
    """Load a built-in task (by name) or a user ``.jsonl``/``.csv`` file and split it deterministically.

    ``test_size`` (a count) or ``test_fraction`` (in (0, 1)) sets the test set size,
    default ``min(1000, round(0.2 * n))``. ``max_train``/``max_test`` keep only that
    many examples after splitting. ``choices`` are the verbalizers of a user
    classification file; ``template`` overrides the prompt template (a str.format
    string over the record fields); ``max_chars`` caps each template field (None: no cap).
    """
    if test_size is not None and test_fraction is not None:
        raise ValueError("give test_size or test_fraction, not both")
    if test_fraction is not None and not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    for arg, value in (("test_size", test_size), ("max_train", max_train), ("max_test", max_test)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"{arg} must be a non-negative int, got {value!r}")
    if max_chars is not None and max_chars < 8:
        raise ValueError(f"max_chars must be at least 8 (or None), got {max_chars}")

    spec, records, source = _load_records(name_or_path, choices, template)
    examples = [spec.example(row, max_chars=max_chars, where=where) for where, row in records]
    _warn_cut_fields(spec, records, max_chars, source)
    n = len(examples)
    if n < 2:
        raise DataError(f"{source}: need at least 2 examples to split into train and test, found {n}")
    if test_size is not None:
        n_test = test_size
    elif test_fraction is not None:
        n_test = max(1, round(test_fraction * n))
    else:
        n_test = default_test_size(n)
    if not 1 <= n_test <= n - 1:
        raise DataError(f"{source}: test size {n_test} must be between 1 and {n - 1} for {n} examples")
    train_idx, test_idx = split_indices(n, n_test, seed)
    if max_train is not None:
        train_idx = train_idx[:max_train]
    if max_test is not None:
        test_idx = test_idx[:max_test]
    if spec.kind == "classification":
        _warn_class_coverage(spec, [e.label for e in examples], train_idx, test_idx, source)
    return TaskData(spec, [examples[i] for i in train_idx], [examples[i] for i in test_idx])
