"""TEE mode settings (the config's ``tee:`` section), checked before anything is loaded.

``mode: server`` runs the trunk in a server-side enclave, as in the seed system's split form:
clients run their head and tail with no TEE; the trunk's adapters, optimizer state and every
non-linear operation live in the enclave process, and the frozen trunk's linear algebra goes to an
untrusted worker under one-time-pad masks (``masking.py``). ``backend: simulated`` is a separate OS
process and gives **no hardware protection**: it exercises the protocol, the masking and the
attestation checks, nothing more.
"""

from __future__ import annotations

from dataclasses import dataclass

from .masking import DTYPES, SCALE_MODES, MaskSettings

MODES = ("none", "server")
BACKENDS = ("simulated",)
WORKERS = ("process", "inprocess")


@dataclass
class TeeSettings:
    mode: str = "none"
    """``none``, or ``server``: the trunk runs in a server-side enclave (sequential or client-batch schedule), in
    ``simulate`` and in deployments."""
    backend: str = "simulated"
    """The enclave backend; only ``simulated``: a separate OS process whose quotes a local platform key signs, with no
    hardware protection."""
    offload: bool = True
    """Send the frozen trunk's linear products to the untrusted worker, masked; false keeps everything in the enclave."""
    worker: str = "process"
    """``process``: the worker is its own OS process; ``inprocess``: inside the enclave process (tests only)."""
    precompute: bool = True
    """After each step the enclave refills its pool of mask products for the next steps, while the clients compute."""
    mask_scale: float = 1e6
    """The masks' standard deviation relative to the masked tensor's RMS (``scale_mode: rms``) or to the fixed
    reference."""
    offload_dtype: str = "fp64"
    """The worker's arithmetic: ``fp64`` keeps masked results exact to float32 at any mask scale up to 1e6; ``fp32``
    loses about 5e-7 x the scale, relative."""
    scale_mode: str = "rms"
    """``rms``: masks scale with each tensor's RMS (rounded up to a power of two: the worker learns its binade);
    ``fixed``: a fixed reference scale."""
    verify: bool = True
    """Check every product the worker returns before it is used (Freivalds' check with a secret random vector); a
    product that fails is refused, counted and never applied."""
    release_trunk: bool = True
    """The enclave hands its trained trunk adapters out at the end (checkpoints, the run's adapters file); false keeps
    them inside: checkpoints hold them sealed, a deployment's server writes ``trunk.sealed``."""
    timeout: float = 600.0
    """Seconds one request to the enclave may take before the enclave counts as dead."""

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    def masks(self) -> MaskSettings:
        return MaskSettings(mask_scale=self.mask_scale, offload_dtype=self.offload_dtype, scale_mode=self.scale_mode,
                            verify=self.verify)

    def validate(self, bad) -> None:
        """Report the first invalid key through ``bad(key, why)`` (config.validate's reporter)."""
        for key, value, allowed in (("mode", self.mode, MODES), ("backend", self.backend, BACKENDS),
                                    ("worker", self.worker, WORKERS), ("offload_dtype", self.offload_dtype, DTYPES),
                                    ("scale_mode", self.scale_mode, SCALE_MODES)):
            if value not in allowed:
                bad(f"tee.{key}", f"unknown value {value!r} (expected one of {', '.join(allowed)})")
        if not (isinstance(self.mask_scale, (int, float)) and 0 < self.mask_scale < float("inf")):
            bad("tee.mask_scale", f"must be a positive number (got {self.mask_scale!r})")
        if not (isinstance(self.timeout, (int, float)) and self.timeout > 0):
            bad("tee.timeout", f"must be a positive number of seconds (got {self.timeout!r})")


__all__ = ["TeeSettings", "MODES", "BACKENDS", "WORKERS"]
