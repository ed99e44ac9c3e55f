"""Attack (c): a learned inversion model (BiSR's SIP idea) mapping ``h1`` back to tokens.

The attacker pushes public auxiliary text through the public pretrained head, applies
the client's defence with noise of its own (it knows the settings), and trains a small
bidirectional transformer to predict each position's token from the whole observed
sequence. Its output is a vector compared with the public embedding matrix, so the model
needs no vocabulary-sized layer of its own; training uses a sampled softmax (the batch's
tokens plus random negatives), prediction scores the whole vocabulary. Applied to the
victims' recorded ``h1`` it gives a guess per position, and its top candidates are the
shortlist that the search and optimisation attacks can start from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..models.masks import valid_mask
from ..models.partition import Stage
from ..train.batching import collate
from .knowledge import AttackerKnowledge


@dataclass
class LearnedSettings:
    width: int = 256
    """The hidden width of the inversion transformer."""
    layers: int = 2
    """Its transformer layers."""
    heads: int = 4
    """Its attention heads."""
    steps: int = 300
    """Its training steps on the attacker's public text."""
    batch_size: int = 32
    """Public sequences per training step."""
    lr: float = 2e-3
    """The peak learning rate (AdamW, one-cycle schedule)."""
    negatives: int = 2048
    """Random vocabulary rows per step besides the batch's own tokens (sampled softmax)."""


class InversionModel(nn.Module):
    def __init__(self, embedding: torch.Tensor, max_len: int, s: LearnedSettings):
        super().__init__()
        vocab, hidden = embedding.shape
        self.inp = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, s.width))
        self.pos = nn.Embedding(max_len, s.width)
        layer = nn.TransformerEncoderLayer(s.width, s.heads, 2 * s.width, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, s.layers, enable_nested_tensor=False)
        self.out = nn.Sequential(nn.LayerNorm(s.width), nn.Linear(s.width, hidden))
        self.register_buffer("vocab", F.normalize(embedding.float(), dim=-1), persistent=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(20.0)))
        self.bias = nn.Parameter(torch.zeros(vocab))

    def forward(self, h1: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Unit query vectors (B, T, H), one per position, compared with embedding rows."""
        width = h1.shape[1]
        pad = torch.arange(width)[None, :] >= lengths[:, None]
        x = self.inp(h1.float()) + self.pos(torch.arange(width))[None]
        return F.normalize(self.out(self.encoder(x, src_key_padding_mask=pad)), dim=-1)

    def scores(self, query: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        rows = self.vocab if ids is None else self.vocab[ids]
        bias = self.bias if ids is None else self.bias[ids]
        return self.logit_scale.exp() * query @ rows.T + bias

    @torch.no_grad()
    def topk(self, h1: torch.Tensor, lengths: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, k) most likely tokens per position and their log-probabilities."""
        query = self(h1, lengths)
        ids, logp = [], []
        for q in query:
            top = self.scores(q).log_softmax(-1).topk(k, dim=-1)
            ids.append(top.indices)
            logp.append(top.values)
        return torch.stack(ids), torch.stack(logp)


@torch.no_grad()
def public_activations(knowledge: AttackerKnowledge, head: Stage, batch_size: int = 32) -> list[dict]:
    """Batches of public text with the clean head output (the defence's noise is drawn later)."""
    out = []
    ids = knowledge.aux_ids
    for start in range(0, len(ids), batch_size):
        batch = collate([(x, x) for x in ids[start:start + batch_size]], knowledge.tok.pad_token_id)
        out.append({"ids": batch["input_ids"], "lengths": batch["lengths"],
                    "h1": head(batch["input_ids"], batch["lengths"]).float()})
    return out


def train_inverter(knowledge: AttackerKnowledge, settings: LearnedSettings, head: Stage | None = None,
                   progress: bool = False, seed: int = 0) -> InversionModel:
    """Train on public text through ``head`` (default: the public pretrained head) under the defence."""
    head = head or knowledge.head()
    data = public_activations(knowledge, head, settings.batch_size)
    max_len = max([knowledge.cfg.data.max_length] + [int(b["lengths"].max()) for b in data])
    torch.manual_seed(seed)
    model = InversionModel(knowledge.embedding, max_len, settings)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, settings.lr, total_steps=settings.steps, pct_start=0.1)
    rng = torch.Generator().manual_seed(seed)
    vocab = knowledge.embedding.shape[0]
    model.train()
    for _ in tqdm(range(settings.steps), desc="learned inversion", disable=not progress, leave=False):
        batch = data[int(torch.randint(len(data), (1,), generator=rng))]
        h1 = knowledge.defend(batch["h1"], batch["lengths"])  # fresh noise every time
        valid = valid_mask(batch["lengths"], h1.shape[1])
        targets = batch["ids"][valid]
        negatives = torch.randint(vocab, (settings.negatives,), generator=rng)
        ids, inverse = torch.unique(torch.cat([targets, negatives]), return_inverse=True)
        logits = model.scores(model(h1, batch["lengths"])[valid], ids)
        loss = F.cross_entropy(logits, inverse[: len(targets)])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()
