"""The decoding loop: prompts in, new tokens out, stopping as transformers' ``generate`` does.

A batch of right-padded prompts is prefilled once, then every step feeds each row its chosen
token (``sampling.TokenChooser``) until every row has stopped: at the end-of-sequence token
(kept in the ids, as transformers does, and never in the text), at a stop string (cut from the
text) or after ``max_new_tokens``. Rows that stopped keep decoding a pad token until the batch
ends (their outputs are ignored), so every party's batch keeps its shape. The loop measures
the time of the prefill and of the decode steps, and, given the transport's counters, the
bytes that crossed the wire.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .decoders import Decoder
from .sampling import GenerateSettings, TokenChooser


@dataclass
class Generation:
    """What one call generated: per row, its new token ids (end-of-sequence included if reached) and text."""

    tokens: list[list[int]]
    texts: list[str] = field(default_factory=list)
    prompt_tokens: int = 0
    new_tokens: int = 0  # tokens generated, every row together
    steps: int = 0  # decode steps (the batch's longest row)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0

    @property
    def seconds(self) -> float:
        return self.prefill_seconds + self.decode_seconds

    def merge(self, other: Generation) -> Generation:
        self.tokens += other.tokens
        self.texts += other.texts
        for key in ("prompt_tokens", "new_tokens", "steps", "prefill_seconds", "decode_seconds", "bytes_up",
                    "bytes_down"):
            setattr(self, key, getattr(self, key) + getattr(other, key))
        return self

    def summary(self) -> dict:
        total = max(self.new_tokens, 1)
        return {"prompts": len(self.tokens), "prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens,
                "seconds": round(self.seconds, 4), "tokens_per_second": round(self.new_tokens / max(self.seconds, 1e-9), 3),
                "bytes_per_token": round((self.bytes_up + self.bytes_down) / total, 1),
                "bytes_up": self.bytes_up, "bytes_down": self.bytes_down}


def _history(seq: list[list[int]], pad_id: int) -> torch.Tensor:
    """(B, L) each row's prompt and generated tokens so far, right-padded."""
    width = max(len(s) for s in seq)
    return torch.tensor([s + [pad_id] * (width - len(s)) for s in seq])


def _stopped_text(tok, new: list[int], stop: list[str], eos: set[int]) -> tuple[str, bool]:
    """The row's text so far, cut at the first stop string, and whether it hit one."""
    text = tok.decode([t for t in new if t not in eos], skip_special_tokens=True)
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


@torch.no_grad()
def generate_ids(decoder: Decoder, ids: torch.Tensor, lengths: torch.Tensor, settings: GenerateSettings,
                 eos_ids: set[int] = frozenset(), pad_id: int = 0, tok=None, wire=None) -> Generation:
    """Generate for one batch of right-padded prompts ``ids`` (B, T) with ``lengths`` (B,). ``tok``: needed for
    stop strings and texts; ``wire``: a transport's ``WireStats`` to measure the bytes of this batch."""
    choose = TokenChooser(settings)
    rows = len(lengths)
    eos = set(eos_ids) if settings.stop_at_eos else set()
    up0, down0 = (wire.bytes_up, wire.bytes_down) if wire is not None else (0, 0)
    seq = [ids[i, : int(n)].tolist() for i, n in enumerate(lengths)]
    new: list[list[int]] = [[] for _ in range(rows)]
    texts = [""] * rows
    done = [False] * rows
    t0 = time.perf_counter()
    logits = decoder.prefill(ids, lengths)
    t1 = time.perf_counter()
    steps = 0
    try:
        for _ in range(settings.max_new_tokens):
            chosen = choose(logits, _history(seq, pad_id) if choose.reads_history else None).tolist()
            for i, t in enumerate(chosen):
                if done[i]:
                    continue
                new[i].append(t)
                seq[i].append(t)
                if t in eos:
                    done[i] = True
                elif settings.stop and tok is not None:
                    texts[i], hit = _stopped_text(tok, new[i], settings.stop, eos)
                    done[i] = hit
            steps += 1
            if all(done) or steps == settings.max_new_tokens:
                break
            feed = torch.tensor([pad_id if d else s[-1] for d, s in zip(done, seq)])
            logits = decoder.extend(feed)
    finally:
        decoder.close()
    t2 = time.perf_counter()
    if tok is not None:
        texts = [_stopped_text(tok, n, settings.stop, eos)[0].strip() for n in new]
    out = Generation(new, texts, prompt_tokens=int(lengths.sum()), new_tokens=sum(len(n) for n in new), steps=steps,
                     prefill_seconds=t1 - t0, decode_seconds=t2 - t1)
    if wire is not None:
        out.bytes_up, out.bytes_down = wire.bytes_up - up0, wire.bytes_down - down0
    return out


def prompt_ids(tok, prompts: list[str], max_prompt_tokens: int, chat: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded prompt ids and lengths; each prompt keeps its last ``max_prompt_tokens`` tokens."""
    if chat:
        encoded = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                           tokenize=True) for p in prompts]
        encoded = [e["input_ids"] if isinstance(e, dict) or hasattr(e, "keys") else e for e in encoded]
    else:
        encoded = [tok(p).input_ids for p in prompts]
    encoded = [(e[-max_prompt_tokens:] if len(e) > max_prompt_tokens else e) or [tok.eos_token_id] for e in encoded]
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), tok.pad_token_id, dtype=torch.long)
    for i, e in enumerate(encoded):
        ids[i, : len(e)] = torch.tensor(e)
    return ids, torch.tensor([len(e) for e in encoded])


def generate_text(decoder: Decoder, tok, prompts: list[str], settings: GenerateSettings, max_length: int,
                  wire=None, progress=None) -> Generation:
    """Generate for every prompt, ``settings.batch_size`` at a time; prompts are cut (from the left) so that
    prompt and new tokens fit in ``max_length``. ``progress``: a callback(n_done) (e.g. a tqdm's update)."""
    budget = max_length - settings.max_new_tokens
    if budget < 1:
        raise ValueError(f"generate.max_new_tokens = {settings.max_new_tokens} leaves no room for a prompt in "
                         f"{max_length} tokens (raise data.max_length / boundary.max_length)")
    budget = min(budget, settings.max_prompt_tokens or budget)
    eos = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    out = Generation([])
    for start in range(0, len(prompts), settings.batch_size):
        chunk = prompts[start:start + settings.batch_size]
        ids, lengths = prompt_ids(tok, chunk, budget, settings.chat)
        out.merge(generate_ids(decoder, ids, lengths, settings, eos, tok.pad_token_id, tok, wire))
        if progress is not None:
            progress(len(chunk))
    return out


__all__ = ["Generation", "generate_ids", "generate_text", "prompt_ids"]
