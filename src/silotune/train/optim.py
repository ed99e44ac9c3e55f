"""Optimizer settings shared by every party (clients, trunk server, centralized baseline)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class OptimSettings:
    lr: float = 1e-3
    """The AdamW learning rate of every party (and of the centralized run)."""
    weight_decay: float = 0.0
    """AdamW's weight decay."""
    grad_clip: float | None = 1.0
    """Each party clips the gradient norm of its own trainable parameters to this before each step; null: no clipping."""


def trainable(*modules: nn.Module) -> list[nn.Parameter]:
    seen, params = set(), []
    for m in modules:
        for p in m.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


class Stepper:
    """AdamW over the trainable parameters of some modules, with optional norm clipping."""

    def __init__(self, params: list[nn.Parameter], settings: OptimSettings):
        self.params = params
        self.settings = settings
        self.opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay) if params else None

    def zero_grad(self) -> None:
        """Called before each backward; gradients stay readable after ``step``."""
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        if self.opt is None:
            return
        if self.settings.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.settings.grad_clip)
        self.opt.step()

    def state_dict(self) -> dict:
        return self.opt.state_dict() if self.opt else {}

    def load_state_dict(self, state: dict) -> None:
        if self.opt and state:
            self.opt.load_state_dict(state)
