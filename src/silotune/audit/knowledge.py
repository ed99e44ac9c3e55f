"""What the attacker knows: exactly what a trunk operator knows, and nothing else.

- the public pretrained weights (it can load the head and tail a client starts from);
- the run's configuration, shared by every party: model, split, adapter method, and the
  privacy defence's settings (no security by obscurity: attacks simulate the same
  defence, with noise of their own, when they train or search);
- the adapters it aggregated in the clear (FedAvg payloads and averages from the tap);
- public auxiliary text disjoint from every client's data;
- what it received (the tap's records).

Never the clients' tokens, labels, loss, or the noise they drew.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..adapters import apply_method, load_trainable_state, trained_layers
from ..config import RunConfig
from ..models.masks import valid_mask
from ..models.partition import Stage, load_stage
from ..privacy.defences import clip_rows, defend_activations


class AttackerKnowledge:
    def __init__(self, model_dir: Path, cfg: RunConfig, tok, aux_ids: list[list[int]],
                 aux_labels: list[int | None], seed: int = 1234):
        self.model_dir, self.cfg, self.tok = Path(model_dir), cfg, tok
        self.aux_ids, self.aux_labels = aux_ids, aux_labels
        self.privacy = cfg.privacy
        self.generator = torch.Generator().manual_seed(seed)  # the attacker's own noise, never the clients'
        self._stages: dict[tuple, Stage] = {}

    def _stage(self, part: str, adapters: dict[str, torch.Tensor] | None, tag) -> Stage:
        key = (part, tag)
        if key not in self._stages:
            a, c = self.cfg.split.head_blocks, self.cfg.split.tail_blocks
            stage = load_stage(self.model_dir, part, a, c)
            if adapters is not None:
                apply_method(stage, self.cfg.adapters, self.cfg.train.seed,
                             trained_layers(stage.config, self.cfg.adapters, a, c))
                prefix = f"{part}."
                load_trainable_state(stage, {k[len(prefix):]: v for k, v in adapters.items() if k.startswith(prefix)})
            for p in stage.parameters():
                p.requires_grad_(False)
            self._stages[key] = stage.eval()
        return self._stages[key]

    def head(self, adapters: dict[str, torch.Tensor] | None = None, tag=None) -> Stage:
        """The pretrained head, or the pretrained head with aggregated adapters (``tag`` names them)."""
        return self._stage("head", adapters, tag if adapters is not None else None)

    def tail(self, adapters: dict[str, torch.Tensor] | None = None, tag=None) -> Stage:
        return self._stage("tail", adapters, tag if adapters is not None else None)

    @property
    def embedding(self) -> torch.Tensor:
        """The public token embedding (V, H): clients never train it."""
        return self.head().embed.weight.detach()

    def defend(self, h1: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``h1`` as a client's defence would release it, with the attacker's own noise."""
        return defend_activations(h1, lengths, self.privacy, self.generator)

    def noise_model(self, h1: torch.Tensor, lengths: torch.Tensor):
        """``std(observed (N, H)) -> (N, H)``: the defence's noise std behind observed tokens of
        the batch ``h1`` (B, T, H), per coordinate.

        Known from the settings: ``noise * clip / sqrt(H)`` when clipped; else ``noise`` times
        each token's RMS, or each dimension's standard deviation over the batch's tokens (as
        the client scaled it), estimated from the observation: the noise multiplies the
        signal's second moment by (1 + noise^2)."""
        p, hidden = self.privacy, h1.shape[-1]
        shrink = (1 + p.h1_noise ** 2) ** 0.5
        if p.h1_noise and p.h1_noise_scale == "dimension" and not p.h1_clip:
            valid = valid_mask(lengths, h1.shape[1])
            per_dim = h1[valid].float().std(0, unbiased=False)

        def std(observed: torch.Tensor) -> torch.Tensor:
            obs = observed.float()
            if not p.h1_noise:
                return torch.zeros(obs.shape)
            if p.h1_clip:
                return torch.full(obs.shape, p.h1_noise * p.h1_clip / hidden ** 0.5)
            if p.h1_noise_scale == "dimension":
                return (p.h1_noise * per_dim / shrink).expand_as(obs)
            return p.h1_noise * obs.pow(2).mean(-1, keepdim=True).sqrt().expand_as(obs) / shrink
        return std

    def deterministic_part(self, h1: torch.Tensor) -> torch.Tensor:
        """What the defence does to ``h1`` without noise (the per-token clip), for matching."""
        return clip_rows(h1, self.privacy.h1_clip) if self.privacy.h1_clip else h1
