"""How each next token is chosen: greedy, or sampled with temperature, top-k, top-p and a seed.

The knobs are those of transformers' ``GenerationConfig`` and so are the logits processors
that apply them (``RepetitionPenaltyLogitsProcessor``, ``TemperatureLogitsWarper``,
``TopKLogitsWarper``, ``TopPLogitsWarper``, in transformers' order); sampling draws from a
``torch.Generator`` seeded by ``generate.seed``, so a run is repeatable.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.generation import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


@dataclass
class GenerateSettings:
    """The ``generate:`` config section (``silotune generate``)."""

    max_new_tokens: int = 64
    """Tokens generated per prompt at most."""
    do_sample: bool = False
    """Sample each next token (with ``temperature``, ``top_k``, ``top_p``); false: greedy, the most likely token (as
    transformers' ``generate``)."""
    temperature: float = 1.0
    """Sampling: divide the logits by this."""
    top_k: int = 0
    """Sampling: keep the k most likely tokens (0: all)."""
    top_p: float = 1.0
    """Sampling: keep the smallest set of tokens whose probability reaches top_p."""
    repetition_penalty: float = 1.0
    """Above 1, tokens already in the sequence become less likely (1: off)."""
    seed: int = 0
    """Sampling's random stream."""
    stop: list[str] = field(default_factory=list)
    """Strings that end a sequence (not included in the text)."""
    stop_at_eos: bool = True
    """The tokenizer's end-of-sequence token ends a sequence."""
    use_cache: bool = True
    """Keep key/value caches on every party (false: re-run the whole prefix each token)."""
    batch_size: int = 8
    """Prompts decoded together."""
    max_prompt_tokens: int | None = None
    """Prompts are cut to their last N tokens (None: what the length limit leaves)."""
    chat: bool = False
    """Wrap each prompt in the tokenizer's chat template (instruct models)."""

    def validate(self, bad) -> None:
        for key in ("max_new_tokens", "batch_size"):
            if getattr(self, key) < 1:
                bad(f"generate.{key}", "must be at least 1")
        if not self.temperature > 0:
            bad("generate.temperature", "must be positive")
        if self.top_k < 0:
            bad("generate.top_k", "must be at least 0 (0: no top-k filter)")
        if not 0 < self.top_p <= 1:
            bad("generate.top_p", "must be in (0, 1]")
        if not self.repetition_penalty > 0:
            bad("generate.repetition_penalty", "must be positive")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            bad("generate.max_prompt_tokens", "must be at least 1 (or null)")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("generate.stop", "must be a list of non-empty strings")


class TokenChooser:
    """Next tokens from last-position logits (B, V), given the ids generated so far."""

    def __init__(self, settings: GenerateSettings):
        self.settings = settings
        self.processors = LogitsProcessorList()
        if settings.repetition_penalty != 1.0:
            self.processors.append(RepetitionPenaltyLogitsProcessor(settings.repetition_penalty))
        if settings.do_sample:
            if settings.temperature != 1.0:
                self.processors.append(TemperatureLogitsWarper(settings.temperature))
            if settings.top_k > 0:
                self.processors.append(TopKLogitsWarper(settings.top_k))
            if settings.top_p < 1.0:
                self.processors.append(TopPLogitsWarper(settings.top_p))
        self.generator = torch.Generator().manual_seed(settings.seed)

    @property
    def reads_history(self) -> bool:
        """Whether ``ids`` matter (the repetition penalty reads them): else the decoding loop need not build them."""
        return self.settings.repetition_penalty != 1.0

    def __call__(self, logits: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
        """``ids`` (B, L): each row's prompt and generated tokens so far (padding is the row's own pad token;
        only the repetition penalty reads them; None when ``reads_history`` is false)."""
        scores = self.processors(ids, logits.float())
        if not self.settings.do_sample:
            return scores.argmax(-1)
        probs = torch.softmax(scores, dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(1)


__all__ = ["GenerateSettings", "TokenChooser"]
