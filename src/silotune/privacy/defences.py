"""Client-side defences against a curious trunk server: clip and noise what leaves the client.

Two things leave a client during training: the head output ``h1`` (every forward pass,
evaluation included) and the tail's gradient ``dL/dh2``. Each can be clipped and noised
here, before it is encoded, so the server (and anything behind it) only ever sees the
defended tensor. The settings are public (the audit's attacks train against the same
noise level they face); only the noise itself is secret.

Noise levels are *ratios*: the per-coordinate standard deviation as a multiple of the
signal's own per-coordinate scale, so ``1.0`` means noise as large as the signal whatever
the model's activation scale. The scale of one unit (a token of ``h1``, a sample of
``dL/dh2``) is ``clip / sqrt(coordinates)`` when the unit is clipped (the largest it can
be), else the unit's own RMS. For ``h1`` without clipping, ``h1_noise_scale: dimension``
instead scales the noise of each hidden dimension by how much that dimension varies over
the batch's tokens (its standard deviation), so every dimension's token-to-token signal gets
the same relative error: a few very large, nearly constant dimensions (which say nothing
about the tokens) then no longer set the noise of all the others. Noise and clipping touch
only a sequence's real positions, never its padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.masks import valid_mask


@dataclass
class PrivacySettings:
    h1_clip: float | None = None
    """Per-token L2 bound on ``h1`` (in the model's hidden-state units); None: no clipping."""
    h1_noise: float = 0.0
    """Gaussian noise on ``h1``: per-coordinate std as a multiple of the token's scale."""
    h1_noise_scale: str = "token"
    """What ``h1_noise`` is relative to without clipping: ``token`` (each token's RMS) or
    ``dimension`` (each hidden dimension's standard deviation over the batch's tokens)."""
    grad_clip: float | None = None
    """Per-sample L2 bound on the returned gradient ``dL/dh2``; None: no clipping."""
    grad_noise: float = 0.0
    """Gaussian noise on ``dL/dh2``: per-coordinate std as a multiple of the sample's scale."""
    delta: float = 1e-5
    """The delta of the (epsilon, delta) the audit reports for clipped, noised releases."""

    def validate(self, bad) -> None:
        for key in ("h1_clip", "grad_clip"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                bad(f"privacy.{key}", "must be positive (or null for no clipping)")
        for key in ("h1_noise", "grad_noise"):
            if not getattr(self, key) >= 0:
                bad(f"privacy.{key}", "must be non-negative")
        if not 0 < self.delta < 1:
            bad("privacy.delta", "must be in (0, 1)")
        if self.h1_noise_scale not in ("token", "dimension"):
            bad("privacy.h1_noise_scale", f"must be token or dimension, got {self.h1_noise_scale!r}")
        if self.h1_noise_scale == "dimension" and self.h1_clip:
            bad("privacy.h1_noise_scale", "dimension scaling applies without h1_clip (clipped noise is relative "
                "to the clip bound)")

    @property
    def active(self) -> bool:
        return bool(self.h1_clip or self.h1_noise or self.grad_clip or self.grad_noise)

    def describe(self) -> str:
        parts = []
        if self.h1_clip:
            parts.append(f"h1 clip {self.h1_clip:g}")
        if self.h1_noise:
            per_dim = " per dimension" if self.h1_noise_scale == "dimension" else ""
            parts.append(f"h1 noise {self.h1_noise:g}{per_dim}")
        if self.grad_clip:
            parts.append(f"dL/dh2 clip {self.grad_clip:g}")
        if self.grad_noise:
            parts.append(f"dL/dh2 noise {self.grad_noise:g}")
        return ", ".join(parts) or "none"


def dimension_std(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(1, 1, H) standard deviation of each hidden dimension over the real tokens of a batch
    (``mask`` (B, T, 1))."""
    count = mask.sum().clamp(min=1)
    mean = (h * mask).sum(dim=(0, 1)) / count
    return (((h - mean) ** 2 * mask).sum(dim=(0, 1)) / count).sqrt()[None, None, :]


def clip_rows(x: torch.Tensor, bound: float) -> torch.Tensor:
    """Scale each row of ``x`` (last dim) down to L2 norm at most ``bound``; differentiable."""
    norms = x.norm(dim=-1, keepdim=True)
    return x * torch.clamp(bound / (norms + 1e-12), max=1.0)


def defend_activations(h1: torch.Tensor, lengths: torch.Tensor, settings: PrivacySettings,
                       generator: torch.Generator | None) -> torch.Tensor:
    """``h1`` (B, T, H) as it may leave the client: per-token clipped, then noised."""
    if not (settings.h1_clip or settings.h1_noise):
        return h1
    mask = valid_mask(lengths, h1.shape[1]).unsqueeze(-1).to(h1.dtype)
    out = clip_rows(h1, settings.h1_clip) if settings.h1_clip else h1
    if settings.h1_noise:
        hidden = h1.shape[-1]
        if settings.h1_clip:
            scale = torch.full(h1.shape[:-1] + (1,), settings.h1_clip / hidden ** 0.5, dtype=h1.dtype)
        elif settings.h1_noise_scale == "dimension":
            scale = dimension_std(out.detach(), mask)
        else:
            scale = out.detach().pow(2).mean(-1, keepdim=True).sqrt()
        noise = torch.randn(h1.shape, generator=generator, dtype=h1.dtype)
        out = out + noise * scale * settings.h1_noise * mask
    return out


def defend_gradients(grad: torch.Tensor, lengths: torch.Tensor, settings: PrivacySettings,
                     generator: torch.Generator | None) -> torch.Tensor:
    """``dL/dh2`` (B, T, H) as it may leave the client: per-sample clipped, then noised."""
    if not (settings.grad_clip or settings.grad_noise):
        return grad
    batch, width, hidden = grad.shape
    mask = valid_mask(lengths, width).unsqueeze(-1).to(grad.dtype)
    out = grad * mask
    if settings.grad_clip:
        out = clip_rows(out.reshape(batch, -1), settings.grad_clip).reshape(grad.shape)
    if settings.grad_noise:
        coords = (lengths.to(grad.dtype) * hidden).clamp(min=1).reshape(batch, 1, 1)
        if settings.grad_clip:
            scale = settings.grad_clip / coords.sqrt()
        else:
            scale = (out.pow(2).sum(dim=(1, 2), keepdim=True) / coords).sqrt()
        noise = torch.randn(grad.shape, generator=generator, dtype=grad.dtype)
        out = out + noise * scale * settings.grad_noise * mask
    return out


class ClientDefence:
    """One client's defences, with its own seeded noise stream (runs are reproducible)."""

    def __init__(self, settings: PrivacySettings | None, seed: int):
        self.settings = settings or PrivacySettings()
        self.generator = torch.Generator().manual_seed(seed)

    def activations(self, h1: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return defend_activations(h1, lengths, self.settings, self.generator)

    def gradients(self, grad: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return defend_gradients(grad, lengths, self.settings, self.generator)
