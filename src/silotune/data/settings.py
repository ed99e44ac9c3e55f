"""The ``data:`` configuration section: which task, how its records become prompts, how it is split.

``DataSettings`` is one section of the run configuration (``silotune.config.RunConfig``);
``validate`` checks its values with one error line per key, and ``load_configured_task``
loads the task exactly as the section says, so every command reads data the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

from silotune.data.tasks import DEFAULT_MAX_CHARS, TaskData, load_task, template_fields
from silotune.data.userfile import normalize_choices
from silotune.train.batching import KEEP_PROMPT_TAIL

PARTITIONS = ("iid", "dirichlet")
MIN_FIELD_CHARS = 8  # room for a word and the " ..." that marks a cut
MIN_LENGTH = 2 * KEEP_PROMPT_TAIL  # the prompt's half must hold the tail a cut keeps


@dataclass
class DataSettings:
    """The ``data:`` section: the task, its prompts, its train/test split and its split among clients.

    **Your own data.** ``data.task: path/to/file.jsonl`` (one JSON object per line) or ``.csv`` (a header line,
    then one row per example). The first row decides the kind: a ``prompt`` field makes a *generation* file (every
    row needs ``prompt`` and ``target``; the target is appended verbatim, so give it a leading space if your
    tokenizer expects one), otherwise a *classification* file (every row needs ``text`` and ``label``). A label is
    a choice's name (``positive``) or, with ``data.choices`` set, also its index (``1``). Other fields are ignored,
    but ``data.template`` may use them (``"Title: {title}\\nReview: {text}\\nSentiment:"``). Quote label names that
    YAML would read as booleans: ``choices: ["no", "yes"]``.

    A malformed row stops the run with one line naming the file and the line. Anything that is kept but probably
    not what you meant is logged as one warning line naming the file, what happened and how many: fields cut to
    ``data.max_field_chars`` (with the longest original length), a class with no training or no test example after
    the split (a class with a single example always lacks one of them), a choice no row uses, rows repeating an
    earlier row's text (which can land in both the training and the test set), texts given different labels, and
    skipped blank CSV rows. Reports name classes by their label names (``label_counts`` in ``metrics.json``, the
    per-client table of ``report.md``).
    """

    task: str = "rotten_tomatoes"
    """A built-in task (``silotune tasks`` lists them) or the path of your own ``.jsonl`` or ``.csv`` file
    (classification rows: ``text`` and ``label``; generation rows: ``prompt`` and ``target``)."""
    choices: list[str] | None = None
    """Your classification file's label names in index order: the words the model learns to answer
    (a leading space is added). Integer labels index them. null: the file's distinct string labels, sorted."""
    template: str | None = None
    """The prompt: a Python format string over the record's fields, e.g. ``"Review: {text}\\nSentiment:"``;
    the label word (or target) follows it. null: the task's own (``Text: {text}\\nLabel:`` for a classification
    file, the ``prompt`` field as it is for a generation file)."""
    max_field_chars: int | None = DEFAULT_MAX_CHARS
    """Every field the template reads is cut to this many characters (at a word boundary, marked ``" ..."``)
    before tokenizing; a warning counts the rows cut. null: no cut. Targets are never cut."""
    test_fraction: float | None = None
    """The share of the examples held out as the test set, in (0, 1) (at least one example).
    null: 20%, at most 1,000 examples."""
    max_train: int | None = None
    """Keep at most this many training examples (after the split); null: all of them."""
    max_test: int | None = 500
    """Evaluate on at most this many test examples (after the split); null: the whole test set."""
    max_length: int = 128
    """The most tokens of one example, prompt and target together: a target keeps at most half of them, and a
    longer prompt is cut in its middle (its start and its last tokens, the question cue, are kept)."""
    partition: str = "iid"
    """How the training examples are split among the clients: ``iid`` (shuffled, equal shares) or
    ``dirichlet`` (each class spread in Dirichlet(``alpha``) proportions: label-skewed clients)."""
    alpha: float = 0.5
    """``dirichlet``: the concentration; small values give strongly skewed clients, large ones near IID."""

    def validate(self, bad) -> None:
        """Call ``bad(key, message)`` for the first invalid value."""
        if not isinstance(self.task, str) or not self.task.strip():
            bad("data.task", "must name a built-in task or a .jsonl/.csv file")
        if self.choices is not None:
            try:
                normalize_choices(self.choices)
            except ValueError as exc:
                bad("data.choices", str(exc))
        if self.template is not None:
            try:
                template_fields(self.template)
            except ValueError as exc:
                bad("data.template", str(exc))
        if self.max_field_chars is not None and self.max_field_chars < MIN_FIELD_CHARS:
            bad("data.max_field_chars", f"must be at least {MIN_FIELD_CHARS} (or null for no cut), "
                f"got {self.max_field_chars}")
        if self.test_fraction is not None and not 0 < self.test_fraction < 1:
            bad("data.test_fraction", f"must be between 0 and 1 (exclusive), or null, got {self.test_fraction}")
        for key in ("max_train", "max_test"):
            value = getattr(self, key)
            if value is not None and value < 1:
                bad(f"data.{key}", f"must be at least 1 (or null for no limit), got {value}")
        if self.max_length < MIN_LENGTH:
            bad("data.max_length", f"must be at least {MIN_LENGTH} tokens (a cut prompt keeps its last "
                f"{KEEP_PROMPT_TAIL}), got {self.max_length}")
        if self.partition not in PARTITIONS:
            bad("data.partition", f"must be iid or dirichlet, got {self.partition!r}")
        if self.alpha <= 0:
            bad("data.alpha", "must be positive")


def load_configured_task(settings: DataSettings, seed: int, *, all_train: bool = False) -> TaskData:
    """The task as ``settings`` describe it, split with ``seed``; ``all_train`` ignores ``max_train``
    (the audit keeps the examples beyond it as the attacker's public data)."""
    return load_task(settings.task, seed=seed, test_fraction=settings.test_fraction,
                     max_train=None if all_train else settings.max_train, max_test=settings.max_test,
                     choices=settings.choices, template=settings.template, max_chars=settings.max_field_chars)
