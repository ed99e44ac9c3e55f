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
    mode: str = "none"  # none | server (the trunk in a server-side enclave)
    backend: str = "simulated"  # simulated: a separate OS process, no hardware protection
    offload: bool = True  # the frozen trunk's linear layers go to the untrusted worker, masked
    worker: str = "process"  # process (its own OS process) | inprocess (inside the enclave process: tests only)
    precompute: bool = True  # refill the mask pool after each step, while the clients compute
    mask_scale: float = 1e6  # mask standard deviation relative to the masked tensor's RMS (or the reference)
    offload_dtype: str = "fp64"  # the worker's arithmetic: fp64 keeps masked results exact to float32
    scale_mode: str = "rms"  # rms | fixed
    verify: bool = True  # check every product the worker returns (Freivalds) before it is used
    release_trunk: bool = True  # the enclave hands its trained trunk adapters out at the end (the report's file)
    timeout: float = 600.0  # seconds one request to the enclave may take before it counts as dead

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
