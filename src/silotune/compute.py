"""Where a party computes and in which dtype: the ``compute:`` config section, resolved to torch.

Every party (a client's head and tail, the trunk server, the centralized baseline) runs its
stages on one device (``auto``, ``cpu``, ``cuda`` or ``cuda:N``) with its frozen base weights
in one compute dtype (``fp32`` or ``bf16``). Trainable adapters stay float32 whatever the
compute dtype, and the loss is computed in float32. The wire is device-free: whatever a party
sends is first made a CPU float32 tensor (``to_wire``), and whatever it receives is moved onto
its device (``Compute.inputs``), so two parties on different devices or dtypes interoperate.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEVICE_FORMS = "auto, cpu, cuda or cuda:N (N a GPU index)"
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


@dataclass
class ComputeSettings:
    device: str = "auto"
    """``auto`` (the current CUDA GPU when PyTorch sees one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    dtype: str = "fp32"
    """The dtype of the frozen base weights and activations: ``fp32`` or ``bf16`` (adapters stay fp32)."""

    def validate(self, bad) -> None:
        if not isinstance(self.device, str) or not _DEVICE.fullmatch(self.device):
            bad("compute.device", f"must be {DEVICE_FORMS}, got {self.device!r}")
        if self.dtype not in DTYPES:
            bad("compute.dtype", f"must be one of {', '.join(DTYPES)}, got {self.dtype!r}")


def resolve_device(spec: str) -> torch.device:
    """The torch device for ``compute.device``; a CUDA device PyTorch cannot see is a ConfigError."""
    if not isinstance(spec, str) or not _DEVICE.fullmatch(spec):
        raise ConfigError(f"compute.device: must be {DEVICE_FORMS}, got {spec!r}")
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"compute.device: {spec!r} requested but no CUDA GPU is visible to PyTorch "
                          "(torch.cuda.is_available() is False); use compute.device: auto or cpu")
    if spec in ("auto", "cuda"):
        return torch.device("cuda", torch.cuda.current_device())
    index, count = int(spec.partition(":")[2]), torch.cuda.device_count()
    if index >= count:
        gpus = "1 CUDA GPU (cuda:0)" if count == 1 else f"{count} CUDA GPUs (cuda:0 to cuda:{count - 1})"
        raise ConfigError(f"compute.device: {spec!r} requested but PyTorch sees only {gpus}; "
                          "use compute.device: auto, cuda or one of those")
    return torch.device("cuda", index)


def resolve_dtype(name: str) -> torch.dtype:
    """The torch dtype for ``compute.dtype``."""
    if name not in DTYPES:
        raise ConfigError(f"compute.dtype: must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return next((k for k, v in DTYPES.items() if v == dtype), str(dtype).removeprefix("torch."))


def check_dtype(device: torch.device, dtype: torch.dtype) -> None:
    """Refuse a dtype the device cannot compute in (bf16 on a GPU without bfloat16 support)."""
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"compute.dtype: bf16 requested but {device} ({torch.cuda.get_device_name(device)}) "
                          "does not support bfloat16; use compute.dtype: fp32")


def to_wire(t: torch.Tensor) -> torch.Tensor:
    """A tensor as it is handed to the transport: detached, on the CPU, floats in float32."""
    return t.detach().to("cpu", torch.float32 if t.is_floating_point() else t.dtype)


def fp32_trainables(*modules: nn.Module) -> None:
    """Keep trainable parameters (adapters) in float32 over a lower-precision base, in place (the
    Parameter objects stay the same), as peft's ``autocast_adapter_dtype`` does for a PeftModel."""
    for module in modules:
        for p in module.parameters():
            if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
                p.data = p.data.float()


@dataclass(frozen=True)
class Compute:
    """A resolved device and compute dtype, with the moves every party makes at its boundaries."""

    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32

    @classmethod
    def resolve(cls, settings: ComputeSettings) -> Compute:
        device, dtype = resolve_device(settings.device), resolve_dtype(settings.dtype)
        check_dtype(device, dtype)
        return cls(device, dtype)

    @classmethod
    def default(cls) -> Compute:
        return cls(torch.device("cpu"), torch.float32)

    @classmethod
    def of(cls, module: nn.Module) -> Compute:
        """Where ``module`` already is: the device and dtype of its frozen floating (base) weights."""
        base = [p for p in module.parameters() if p.is_floating_point() and not p.requires_grad]
        p = base[0] if base else next(module.parameters(), None)
        return cls.default() if p is None else cls(p.device, p.dtype)

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` on this device, its dtype unchanged."""
        return t.to(self.device)

    def inputs(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` on this device, floats cast to the compute dtype (integer tensors only move)."""
        return t.to(self.device, self.dtype) if t.is_floating_point() else t.to(self.device)

    to_wire = staticmethod(to_wire)

    def describe(self) -> str:
        """E.g. ``cpu fp32`` or ``cuda:0 (NVIDIA H100 80GB HBM3) bf16``, for logs and reports."""
        where = str(self.device)
        if self.device.type == "cuda":
            where = f"{where} ({torch.cuda.get_device_name(self.device)})"
        return f"{where} {dtype_name(self.dtype)}"
