"""One-time-pad masked offload of frozen Linear layers, forward and backward.

The TEE design of Huang et al. (ICASSP 2024) keeps the fine-tuned structure (LoRA) and every
non-linear op inside an enclave and sends the bulk products of the frozen base weights to an
untrusted fast device, the *worker* (``silotune.tee.worker``), under additive one-time masks:

* forward ``y = x W^T + b``: the enclave sends ``x + r``, the worker returns ``(x + r) W^T``, the
  enclave subtracts ``r W^T`` and adds the bias;
* backward ``dL/dx = g W`` (``g = dL/dy``): the enclave sends ``g + s``, the worker returns
  ``(g + s) W``, the enclave subtracts ``s W``. The weights are frozen: no weight gradient.

The pitfalls known from Slalom (Tramer & Boneh, ICLR 2019) and the attacks on its variants are
avoided as follows:

* the unmasking products ``r W^T`` and ``s W`` are computed by the enclave, never by the worker
  (the worker is asked for exactly one product per offloaded call, on a masked tensor);
* masks are fresh for every call and never reused: a ``MaskPool`` hands out every row of mask
  exactly once (row ids only grow; a ``MaskPair`` masks one tensor and unmasks one result, and a
  second use raises ``MaskReuseError``; masking overwrites the mask's buffer with the masked
  tensor); masks never leave the enclave;
* masks come from a cryptographically secure generator: an AES-256-CTR keystream under a fresh
  256-bit key from ``os.urandom`` for every chunk of masks (a worker that sees masked values must
  not be able to recover a generator's state and predict other masks, as it could with torch's
  Mersenne Twister or Philox), turned into float64 Gaussians by Box-Muller on 52-bit uniforms;
* float masking hides only *statistically*. Slalom's exact hiding quantises activations and
  weights and works in integers modulo a prime p < 2^24 (so float32 arithmetic stays exact), where
  ``x + r mod p`` with uniform ``r`` is independent of ``x``. We do NOT do that: our masks are
  Gaussian, with a scale far above the activations', so the worker's input is close to pure noise
  (as a Gaussian channel its SNR is about ``1 / mask_scale^2`` per element, and the correlation
  between what the worker receives and the true input is about ``1 / mask_scale``), but not
  exactly independent of it. Known residual leaks: the shapes (number of tokens); in the default
  ``scale_mode='rms'`` the binade of each call's input RMS (the mask scale is
  ``2^ceil(log2(mask_scale * rms(input)))``, which the worker can read off the RMS of what it
  receives; ``scale_mode='fixed'`` removes that leak at the price of a fixed reference scale);
  and an input sent more than once under independent masks (averaging the received tensors would
  raise the SNR). Layers that share an input (q, k and v; gate and up) are therefore offloaded as
  one call against their stacked weights (``FusedForward``: the input is masked once); a hook that
  hands members different inputs, or a recomputation, falls back to one call per copy. The
  *integrity* of the worker's answers is checked (see Integrity below).

Precision. ``(x + r) W^T - r W^T`` loses about ``eps(dtype) * |r| / |x|`` relative accuracy, so the
mask scale trades hiding against precision. The worker's arithmetic dtype is
``MaskSettings.offload_dtype``. Measured on SmolLM2-135M's real activations and gradients
(``benchmarks/mask_precision.py``, 80 tokens, n = 46k-123k elements per tensor, chance level
1/sqrt(n) ~ 3-5e-3): with 'fp64' (the default) and masks 1e2 to 1e6 times the input RMS, the
masked product's error against an exact float64 product is 2.5e-8 relative (the final float32
rounding; plain float32 matmul gives 2.4e-7), rising to 1-3e-7 at 1e8; the correlation between the
worker's input and the true input is ~1e-2 at scale 1e2 and at chance level from 1e3 on. With
'fp32' the error grows linearly with the scale, about 5e-7 x scale (4e-6 at 1e1, 6e-5 at 1e2, 5e-4
at 1e3, 0.4 at 1e6), so float32 cannot have both: at 1e1 the correlation is 0.08, and at 1e2 a
whole-model LoRA gradient is off by up to 4.5e-3 relative. Default: fp64, scale 1e6 (correlation
~1e-6 expected, at chance for up to ~1e12 elements; exact to float32). Scaling a mask pair by a
power of two is exact, so the per-call scale never perturbs the precomputed products. On GPUs,
float64 matmuls are slower than float32 (H100: about 7x below TF32, far more on consumer parts):
that is the price of exactness here, as integers mod p are Slalom's.

Cost: Slalom-style precomputation. A ``MaskPool`` generates ``(r, r W^T)`` and ``(s, s W)`` pairs
ahead of time (``precompute(rows)`` between steps), so the enclave's *online* work per offloaded
call is elementwise: choosing the scale, ``x + c r`` and ``out - c (r W^T)``, O(tokens x (d_in +
d_out)), while the worker does the O(tokens x d_in x d_out) product. The precomputation itself
is the SAME number of FLOPs as the offloaded product (one matmul per mask): offloading moves the
bulk work off the critical path and onto idle enclave time, it does not remove it. ``OffloadStats``
counts all of it (online, precompute, on-demand and worker FLOPs) so a benchmark can report the
share honestly. If the pool runs dry the missing pairs are computed on demand inside the enclave
during the call (counted in ``on_demand_flops``, logged once). Drawing the masks is not free either
(random draws are not counted as FLOPs): for SmolLM2-135M's trunk at 256 tokens (72M mask elements
per step) on 2 CPU cores, about 0.6 s against about 1.2 s for their float64 products; it was 2.6 s
with ``os.urandom`` for every byte and an integer-to-float conversion (``_csprng_normal``).

Integrity. The worker is untrusted for correctness too: with ``verify`` (the default) every product
it returns is checked before the enclave uses it, by Freivalds' method: ``product @ v`` must equal
``masked @ u`` with ``u = W^T v`` (backward: ``W v``) for a secret Gaussian ``v`` per layer and
direction, drawn from the CSPRNG and renewed at every refill of the pool. A changed entry moves its
row's check by ``error * v_j``; the tolerance is the offload dtype's rounding (64 eps sqrt(d) times
the rows' norms), so the fp64 worker's products are checked to about 1e-11 of the masked rows'
norms and the fp32 worker's only to about 1e-3 (its rounding at mask scale 1e2 hides smaller
changes). Cost: two matrix-vector products per call (``verify_flops``).

Weights. The worker receives each frozen weight once (cast to the offload dtype). The enclave
keeps its own copy too: the unmasking products need ``W``, and peft's LoRA layers read the base
layer's weight (shape, dtype, device). In an SGX deployment this is enclave memory (Slalom
streams weights through the enclave for the same reason).

Attention. Only the Linear layers are offloaded: the attention projections (q, k, v, o) and the
MLP (gate, up, down; GPT-2's c_attn, c_proj, c_fc). Attention's ``Q K^T`` and ``softmax(.) V``
products stay in the enclave: they are 4 T^2 d FLOPs per layer and sequence, against about
2 T (4 d^2 + 3 d d_ff) for a Llama block's projections, i.e. a share of roughly 2T / (4d + 3 d_ff)
(about 4% for SmolLM2-135M at T = 128; it grows with the sequence length). The token embedding (a
lookup) is never offloaded; the LM head only with ``include_lm_head=True``.

peft compatibility. ``offload_linears`` turns each frozen ``nn.Linear`` (or GPT-2 ``Conv1D``) into
a ``MaskedLinear`` (``MaskedConv1D``) in place (same object, parameters and hooks; only the class
changes), a subclass whose forward routes through a custom autograd function to the worker. peft's ``inject_adapter_in_model``
recognises the subclass and wraps it (LoRA then calls ``base_layer(x)``, which is masked), and
offloading a model that already has LoRA converts the base layers inside the LoRA wrappers (the
trainable ``lora_A``/``lora_B`` stay in the enclave). Either order works.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import ConfigError, SiloTuneError
from .worker import Worker, WorkerError

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp64": torch.float64}
DIRECTIONS = ("fwd", "bwd")
SCALE_MODES = ("rms", "fixed")


class MaskReuseError(SiloTuneError):
    """A one-time mask was about to be used a second time."""


@dataclass
class MaskSettings:
    """How the enclave masks what it sends to the worker.

    ``mask_scale``: the masks' standard deviation relative to the reference scale. In
    ``scale_mode='rms'`` the reference is the RMS of the tensor being masked (each call; the scale
    is rounded up to a power of two, so the worker learns at most that RMS's binade); in
    ``'fixed'`` it is ``reference`` for activations and ``grad_reference`` for gradients (nothing
    about the scale leaks, but hiding and precision then depend on how the real magnitudes compare
    to the references). ``offload_dtype``: the dtype of masks, of the worker's weights and of its
    arithmetic ('fp64' for exactness, 'fp32' for speed). ``seed``: None draws masks from a CSPRNG
    (an AES-256-CTR keystream under a fresh ``os.urandom`` key for every chunk of masks, turned
    Gaussian by Box-Muller); an integer uses torch's (non-cryptographic) generator, for
    reproducible tests only. ``verify``: check each product the worker returns before it is used
    (Freivalds: ``product @ v`` against ``masked @ (W^T v)`` for a secret random ``v``).
    """

    mask_scale: float = 1e6
    offload_dtype: str = "fp64"
    scale_mode: str = "rms"
    reference: float = 1.0
    grad_reference: float = 1e-4
    seed: int | None = None
    verify: bool = True

    def __post_init__(self):
        if self.offload_dtype not in DTYPES:
            raise ConfigError(f"tee.offload_dtype: {self.offload_dtype!r} (expected one of {', '.join(DTYPES)})")
        if self.scale_mode not in SCALE_MODES:
            raise ConfigError(f"tee.scale_mode: {self.scale_mode!r} (expected one of {', '.join(SCALE_MODES)})")
        for key in ("mask_scale", "reference", "grad_reference"):
            value = getattr(self, key)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"tee.{key}: must be a positive number (got {value!r})")

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.offload_dtype]


@dataclass
class OffloadStats:
    """FLOP and mask counters of one enclave (2 FLOPs per multiply-add; random draws not counted)."""

    forward_calls: int = 0
    backward_calls: int = 0
    worker_flops: int = 0
    """The offloaded products: 2 n d_in d_out per call (what the worker computes)."""
    online_flops: int = 0
    """Enclave work during calls: choosing the scale, masking, unmasking, adding the bias."""
    precompute_flops: int = 0
    """Mask products computed ahead of time (``precompute``), used or not yet."""
    on_demand_flops: int = 0
    worker_seconds: float = 0.0
    """Wall time the enclave spent waiting for the worker's products (sending, computing, receiving)."""
    precompute_seconds: float = 0.0
    verified_calls: int = 0
    """Worker products checked (Freivalds) before use."""
    verify_flops: int = 0
    """The checks' enclave work: two matrix-vector products and two row norms per call, and the check
    vectors' weight products at each refill."""
    integrity_failures: int = 0
    """Worker products refused: they were not the product of the masked input and the frozen weight."""
    """Wall time spent in ``precompute``."""
    """Mask products computed during calls because the pool had run dry."""
    precomputed_rows: int = 0
    on_demand_rows: int = 0
    masks_used: int = 0
    """Mask pairs handed out: one per offloaded call."""
    rows_used: int = 0

    def summary(self) -> dict:
        """The counters plus the enclave's shares: online only (with the integrity checks), and counting the
        mask products."""
        out = asdict(self)
        online = self.online_flops + self.verify_flops
        enclave = online + self.precompute_flops + self.on_demand_flops
        out["online_share"] = online / max(1, online + self.on_demand_flops + self.worker_flops)
        out["enclave_share_with_precompute"] = enclave / max(1, enclave + self.worker_flops)
        return out


_ZEROS = bytes(1 << 20)  # the plaintext: AES-CTR encrypts zeros, piece by piece, into the keystream
_MANTISSA, _ONE = (1 << 52) - 1, 0x3FF0000000000000  # float64 bits: 52-bit mantissa, exponent of 1.0


def _keystream(nbytes: int) -> torch.Tensor:
    """``nbytes`` bytes of AES-256-CTR keystream under a fresh key from ``os.urandom``, as a uint8 tensor
    of ``nbytes + 16`` bytes (the last 16 are spare).

    A cryptographically secure generator (CTR mode of a block cipher, as NIST's CTR_DRBG): without
    the key its output cannot be told from uniform bytes, and a worker that sees masked values cannot
    recover the key or predict other masks (torch's Mersenne Twister / Philox would give their state
    away). Every call draws a new 256-bit key, so no key ever encrypts more than one chunk of masks
    (far below AES's 2^64-block bound) and the zero counter never repeats under a key. With AES-NI
    this runs at several GB/s, against ~0.35 GB/s for ``os.urandom`` (getrandom) itself."""
    encryptor = Cipher(algorithms.AES(os.urandom(32)), modes.CTR(bytes(16))).encryptor()
    out = torch.empty(nbytes + 16, dtype=torch.uint8)
    view = memoryview(out.numpy())
    for start in range(0, nbytes, len(_ZEROS)):
        k = min(len(_ZEROS), nbytes - start)
        # update_into wants room for one more block than it writes; the next piece overwrites it
        if encryptor.update_into(memoryview(_ZEROS)[:k], view[start:start + k + 15]) != k:
            raise RuntimeError("AES-CTR returned a short keystream")
    return out


def _csprng_normal(rows: int, cols: int) -> torch.Tensor:
    """Standard normal float64 of shape (rows, cols) from a CSPRNG keystream (``_keystream``).

    Box-Muller, computed in place in the keystream's own buffer: each 64-bit word's low 52 bits
    become the mantissa of a float64 ``f`` uniform on the grid of [1, 2) (exponent bits set; no
    integer-to-float conversion, which cost more than everything else together), and each pair
    gives two normals ``sqrt(-2 ln(2 - f_1)) (cos, sin)(2 pi f_2)``: ``2 - f_1`` lies in (0, 1] and
    is exact, the angle covers a full turn. 52-bit uniforms cap |z| at sqrt(2 ln 2^52) = 8.49 (a
    Gaussian's mass beyond: 2e-17), otherwise the output is Gaussian to float64 rounding."""
    n = rows * cols
    if n == 0:
        return torch.empty(rows, cols, dtype=torch.float64)
    half = (n + 1) // 2
    bits = _keystream(16 * half).view(torch.int64)[:2 * half]
    bits.bitwise_and_(_MANTISSA).bitwise_or_(_ONE)
    f = bits.view(torch.float64)  # uniform on [1, 2), 2^52 values
    radius, theta = f[:half], f[half:]
    radius.neg_().add_(2.0).log_().mul_(-2.0).sqrt_()
    theta.mul_(2 * math.pi)
    cos = torch.cos(theta)
    theta.sin_().mul_(radius)  # the second half: radius sin(angle)
    radius.mul_(cos)  # the first half: radius cos(angle)
    return f[:n].view(rows, cols)


class MaskPair:
    """Rows of one-time masks and their products with one layer's weight, for exactly one call.

    ``apply`` masks one tensor (``t + c * mask``), ``unmask`` removes ``c * product`` from the
    worker's one answer; each may happen once, in that order, or ``MaskReuseError`` is raised.
    The tensors are dropped once used.
    """

    def __init__(self, name: str, direction: str, first_row: int, mask: torch.Tensor, product: torch.Tensor):
        self.name, self.direction, self.first_row = name, direction, first_row
        self.rows = mask.shape[0]
        self._mask, self._product = mask, product
        self._state = "fresh"

    def _refuse(self, what: str):
        raise MaskReuseError(f"mask rows {self.first_row}..{self.first_row + self.rows - 1} of {self.name!r} "
                             f"({self.direction}) are one-time: cannot {what} (state: {self._state})")

    def apply(self, t: torch.Tensor, scale: float) -> torch.Tensor:
        if self._state != "fresh":
            self._refuse("mask a second tensor")
        if t.shape != self._mask.shape:
            raise ValueError(f"mask of shape {tuple(self._mask.shape)} for a tensor of shape {tuple(t.shape)}")
        self._state = "applied"
        # in place: the mask's buffer becomes the masked tensor, so the mask itself is gone once used
        # (for t no wider than the mask, bit-identical to t + scale * mask: scaling by a power of two is
        # exact, the sum rounds once)
        masked = self._mask.mul_(scale).add_(t)
        self._mask = None
        return masked

    def unmask(self, out: torch.Tensor, scale: float, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``out - scale * product``, rounded once to ``dtype`` (default: the offload dtype)."""
        if self._state != "applied":
            self._refuse("unmask" if self._state == "fresh" else "unmask a second result")
        if out.shape != self._product.shape or out.dtype != self._product.dtype:
            raise WorkerError(f"worker answered {tuple(out.shape)} {out.dtype} for {self.name!r} ({self.direction}); "
                              f"expected {tuple(self._product.shape)} {self._product.dtype}")
        self._state = "spent"
        # one pass: computed in the offload dtype, then rounded to ``dtype`` (as (out - c p).to(dtype))
        result = torch.sub(out, self._product, alpha=scale,
                           out=torch.empty(out.shape, dtype=dtype or out.dtype, device=out.device))
        self._product = None
        return result


class _Layer:
    def __init__(self, weight: torch.Tensor, transposed: bool):
        self.weight, self.transposed = weight, transposed
        d_out, d_in = self.shape = tuple(weight.t().shape if transposed else weight.shape)
        self.d_in, self.d_out = d_in, d_out

    def linear_weight(self, dtype) -> torch.Tensor:
        w = self.weight.detach()
        return (w.t() if self.transposed else w).to(dtype)


class MaskPool:
    """The enclave's store of precomputed one-time mask pairs, per layer and direction.

    ``register(name, weight)`` names a layer (the enclave's copy of its weight); ``precompute(rows)``
    tops every layer and direction up to ``rows`` fresh rows (masks of d_in for 'fwd', d_out for
    'bwd', with their products); ``take(name, direction, rows)`` hands the next ``rows`` rows out
    once, computing on demand (counted, logged once) whatever the pool lacks.
    """

    def __init__(self, settings: MaskSettings | None = None):
        self.settings = settings or MaskSettings()
        self.dtype = self.settings.dtype
        self._gen = None if self.settings.seed is None else torch.Generator().manual_seed(self.settings.seed)
        self._layers: dict[str, _Layer] = {}
        self._queues: dict[tuple[str, str], deque] = {}
        self._generated: dict[tuple[str, str], int] = {}
        self._handed: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()
        self._warned_dry = False
        self._checks: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self._groups: set[str] = set()
        self.stats = OffloadStats()

    # ---- layers ----
    def register(self, name: str, weight: torch.Tensor, transposed: bool = False, directions=DIRECTIONS,
                 group: bool = False) -> None:
        """Name a layer; ``weight`` is (d_out, d_in), or (d_in, d_out) with ``transposed`` (Conv1D); masks are
        kept for ``directions``. ``group``: the fused forward of layers that share an input (not a layer)."""
        if name in self._layers:
            raise ConfigError(f"mask pool: layer {name!r} registered twice")
        self._layers[name] = _Layer(weight, transposed)
        if group:
            self._groups.add(name)
        for d in directions:
            self._queues[(name, d)] = deque()
            self._generated[(name, d)] = self._handed[(name, d)] = 0

    def forget(self, name: str, direction: str) -> None:
        """Keep no more masks for ``name`` in ``direction`` (a fused group masks its forward input)."""
        with self._lock:
            for table in (self._queues, self._generated, self._handed, self._checks):
                table.pop((name, direction), None)

    def names(self) -> list[str]:
        """The offloaded layers (fused groups are not layers)."""
        return [n for n in self._layers if n not in self._groups]

    # ---- generation ----
    def _normal(self, rows: int, cols: int, device) -> torch.Tensor:
        if self._gen is None:
            z = _csprng_normal(rows, cols)
        else:
            z = torch.randn(rows, cols, generator=self._gen, dtype=torch.float64)
        return z.to(device=device, dtype=self.dtype)

    def _generate(self, key, rows: int, w: torch.Tensor | None = None):
        name, direction = key
        layer = self._layers[name]
        w = layer.linear_weight(self.dtype) if w is None else w
        mask = self._normal(rows, layer.d_in if direction == "fwd" else layer.d_out, w.device)
        product = mask @ w.t() if direction == "fwd" else mask @ w
        first = self._generated[key]
        self._generated[key] += rows
        return (first, mask, product), 2 * rows * layer.d_in * layer.d_out

    # ---- integrity: Freivalds' check of the worker's products ----
    def check_vector(self, name: str, direction: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(v, u): a secret random vector over the product's columns and the weight applied to it (``u = W^T v``
        forward, ``W v`` backward), so ``product @ v`` must equal ``masked @ u``. Drawn from the CSPRNG when
        first needed and again at every ``precompute`` of the layer, so a worker cannot learn it."""
        key = (name, direction)
        with self._lock:
            if key not in self._checks:
                self._checks[key] = self._new_check(name, direction)
            return self._checks[key]

    def _new_check(self, name: str, direction: str, w: torch.Tensor | None = None):
        layer = self._layers[name]
        w = layer.linear_weight(self.dtype) if w is None else w
        v = self._normal(1, layer.d_out if direction == "fwd" else layer.d_in, w.device)[0]
        return v, (v @ w if direction == "fwd" else w @ v)

    def available(self, name: str, direction: str) -> int:
        return sum(m.shape[0] for _, m, _ in self._queues[(name, direction)])

    def precompute(self, rows: int, names=None, directions=DIRECTIONS) -> int:
        """Top each layer (``names``; None: all) and direction up to ``rows`` fresh rows of masks.
        Returns the FLOPs spent (also added to ``stats.precompute_flops``)."""
        spent, start = 0, time.perf_counter()
        with self._lock:
            for name in names if names is not None else list(self._layers):
                w = None
                for direction in directions:
                    key = (name, direction)
                    if key not in self._queues:
                        continue
                    need = rows - self.available(name, direction)
                    if need <= 0:
                        continue
                    w = self._layers[name].linear_weight(self.dtype) if w is None else w
                    chunk, flops = self._generate(key, need, w)
                    if self.settings.verify:  # a fresh secret check vector with every refill
                        self._checks[key] = self._new_check(name, direction, w)
                        self.stats.verify_flops += 2 * self._layers[name].d_in * self._layers[name].d_out
                    self._queues[key].append(chunk)
                    spent += flops
                    self.stats.precomputed_rows += need
        self.stats.precompute_flops += spent
        self.stats.precompute_seconds += time.perf_counter() - start
        return spent

    def take(self, name: str, direction: str, rows: int) -> MaskPair:
        """The next ``rows`` never-used rows of masks for ``name`` in ``direction``, as one pair."""
        key = (name, direction)
        if key not in self._queues:
            raise ConfigError(f"mask pool: no layer {name!r} (direction {direction!r})")
        with self._lock:
            queue, parts, need = self._queues[key], [], rows
            while need and queue:
                first, mask, product = queue[0]
                if mask.shape[0] <= need:
                    queue.popleft()
                    parts.append((first, mask, product))
                    need -= mask.shape[0]
                else:
                    parts.append((first, mask[:need], product[:need]))
                    queue[0] = (first + need, mask[need:], product[need:])
                    need = 0
            if need or not parts:
                if need and not self._warned_dry:
                    self._warned_dry = True
                    log.warning("mask pool ran dry (first at %s, %s): computing mask products on demand inside "
                                "the enclave; call precompute() between steps (counted in on_demand_flops)",
                                name, direction)
                chunk, flops = self._generate(key, need)
                parts.append(chunk)
                self.stats.on_demand_flops += flops
                self.stats.on_demand_rows += need
            first = parts[0][0]
            # one-time: rows are handed out in id order, each exactly once
            assert first == self._handed[key], f"mask rows of {name!r} ({direction}) out of order: reuse"
            for (a, m, _), (b, _, _) in zip(parts, parts[1:]):
                assert a + m.shape[0] == b, "mask rows not contiguous"
            self._handed[key] += rows
            self.stats.masks_used += 1
            self.stats.rows_used += rows
        mask = parts[0][1] if len(parts) == 1 else torch.cat([p[1] for p in parts])
        product = parts[0][2] if len(parts) == 1 else torch.cat([p[2] for p in parts])
        return MaskPair(name, direction, first, mask, product)

    # ---- scale ----
    def scale_for(self, t: torch.Tensor, direction: str) -> tuple[float, int]:
        """(power-of-two mask scale for tensor ``t``, FLOPs spent choosing it)."""
        s, flops = self.settings, 0
        if s.scale_mode == "fixed":
            base = s.reference if direction == "fwd" else s.grad_reference
        else:
            base = 0.0
            if t.numel():
                base = float(torch.linalg.vector_norm(t, dtype=torch.float64)) / math.sqrt(t.numel())
            flops = 2 * t.numel()
            if not math.isfinite(base) or base == 0.0:
                base = 1.0
        return 2.0 ** math.ceil(math.log2(s.mask_scale * base)), flops


class OffloadedLinear:
    """The enclave's side of one offloaded layer: mask, ask the worker, unmask, count."""

    def __init__(self, name: str, d_in: int, d_out: int, worker: Worker, pool: MaskPool, has_bias: bool = False):
        self.name, self.d_in, self.d_out = name, d_in, d_out
        self.worker, self.pool, self.has_bias = worker, pool, has_bias
        self.fused: FusedForward | None = None  # set when this layer shares its input with others

    def __deepcopy__(self, memo):  # a copied module shares the worker and pool (same frozen weights)
        return self

    def _run(self, t: torch.Tensor, direction: str, d_from: int, d_to: int) -> torch.Tensor:
        lead = t.shape[:-1]
        rows = t.reshape(-1, d_from)
        n = rows.shape[0]
        pair = self.pool.take(self.name, direction, n)
        scale, flops = self.pool.scale_for(rows, direction)
        masked = pair.apply(rows, scale)
        send = self.worker.forward if direction == "fwd" else self.worker.backward
        start = time.perf_counter()
        product = send(self.name, masked)
        self.pool.stats.worker_seconds += time.perf_counter() - start
        st = self.pool.stats
        if self.pool.settings.verify:
            self._verify(masked, product, direction)
            st.verify_flops += 4 * n * (d_from + d_to)  # two matrix-vector products and two row norms
        out = pair.unmask(product, scale, t.dtype)
        st.worker_flops += 2 * n * d_from * d_to
        st.online_flops += flops + 2 * n * d_from + 2 * n * d_to  # choose scale; c*r, +; c*(rW), -
        if direction == "fwd":
            st.forward_calls += 1
            st.online_flops += n * d_to if self.has_bias else 0
        else:
            st.backward_calls += 1
        return out.reshape(*lead, d_to)

    def _verify(self, masked: torch.Tensor, product: torch.Tensor, direction: str) -> None:
        """Freivalds: refuse a product whose rows do not satisfy ``product @ v == masked @ u`` to within the
        rounding of the offload dtype (``WorkerError``; counted). Any error of an entry ``e`` moves its row's
        left side by ``e * v_j``, with ``v`` secret and Gaussian: an error above the tolerance (about
        1e-11 of the row's norm in fp64, 1e-3 in fp32) is caught with probability close to 1."""
        st = self.pool.stats
        if product.shape[0] != masked.shape[0] or product.dtype != masked.dtype:
            return  # unmask refuses it with the shapes and dtypes
        v, u = self.pool.check_vector(self.name, direction)
        lhs, rhs = product @ v, masked @ u
        eps = torch.finfo(product.dtype).eps
        tol = 64 * eps * math.sqrt(masked.shape[1]) * (torch.linalg.vector_norm(product, dim=1) * float(v.norm())
                                                       + torch.linalg.vector_norm(masked, dim=1) * float(u.norm()))
        st.verified_calls += 1
        bad = ~((lhs - rhs).abs() <= tol)  # NaN fails too
        if bool(bad.any()):
            st.integrity_failures += 1
            raise WorkerError(f"worker's product for {self.name!r} ({direction}) fails the integrity check "
                              f"(Freivalds) in {int(bad.sum())} of {bad.numel()} rows: refused before use")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x W^T`` (no bias) for x of shape (..., d_in), computed masked by the worker."""
        if self.fused is not None:
            return self.fused.forward_for(self, x)
        return self._run(x, "fwd", self.d_in, self.d_out)

    def backward(self, g: torch.Tensor) -> torch.Tensor:
        """``g W`` for g of shape (..., d_out), computed masked by the worker."""
        return self._run(g, "bwd", self.d_out, self.d_in)


class FusedForward:
    """Layers that read the same input (a block's q, k and v projections; gate and up): their forward
    products in one masked call, against their weights stacked, so the worker sees that input masked
    once, not once per layer under independent masks (averaging those would raise its signal-to-noise
    ratio). The first member called with an input runs the call and keeps the other members' outputs
    for that very input (the same memory, shape and strides, unchanged since: an alias such as a hook's
    counts), holding the input until every member has had its output; each output is handed out once.
    Backward stays per layer: the gradients differ."""

    def __init__(self, name: str, members: list[OffloadedLinear], worker: Worker, pool: MaskPool):
        self.name, self.members = name, members
        self.core = OffloadedLinear(name, members[0].d_in, sum(m.d_out for m in members), worker, pool)
        self._input: tuple | None = None  # (the input, held while outputs wait; what identifies it)
        self._outputs: dict[str, torch.Tensor] = {}

    @staticmethod
    def _key(x: torch.Tensor) -> tuple:
        return (x.untyped_storage().data_ptr(), x.storage_offset(), tuple(x.shape), x.stride(), x.dtype, x._version)

    def forward_for(self, member: OffloadedLinear, x: torch.Tensor) -> torch.Tensor:
        if self._input is None or self._input[1] != self._key(x) or member.name not in self._outputs:
            out = self.core._run(x, "fwd", self.core.d_in, self.core.d_out)
            parts = out.split([m.d_out for m in self.members], dim=-1)
            self._outputs = {m.name: p for m, p in zip(self.members, parts)}
            self._input = (x, self._key(x))  # held: its memory cannot be reused while outputs wait
        out = self._outputs.pop(member.name)
        if not self._outputs:
            self._input = None
        return out


FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # layers of one parent that share an input


def fuse_shared_inputs(modules: dict[str, nn.Module], worker: Worker, pool: MaskPool) -> list[str]:
    """Group offloaded layers that share an input (``FUSED``, under one parent; a peft ``base_layer`` counts
    as its wrapper) into ``FusedForward``s: their stacked weight goes to the worker and the pool once more,
    forward only. Returns the groups' names."""
    by_parent: dict[tuple[str, str], nn.Module] = {}
    for key, module in modules.items():
        logical = key.removesuffix(".base_layer")
        parent, _, leaf = logical.rpartition(".")
        by_parent[(parent, leaf)] = module
    groups = []
    for parent in sorted({p for p, _ in by_parent}):
        for leaves in FUSED:
            members = [by_parent.get((parent, leaf)) for leaf in leaves]
            if any(m is None for m in members) or len({m.offload.d_in for m in members}) != 1:
                continue
            name = ".".join(p for p in (parent, "+".join(leaves)) if p)
            handles = [m.offload for m in members]
            stacked = torch.cat([_linear_weight(m) for m in members])
            worker.load(name, stacked.to(pool.dtype).contiguous())
            pool.register(name, stacked, directions=("fwd",), group=True)
            fused = FusedForward(name, handles, worker, pool)
            for h in handles:
                h.fused = fused
                pool.forget(h.name, "fwd")
            groups.append(name)
    return groups


def _linear_weight(module) -> torch.Tensor:
    w = module.weight.detach()
    return w.t() if isinstance(module, Conv1D) else w


class _OffloadFn(torch.autograd.Function):
    """y = x W^T through the worker; dL/dx = (dL/dy) W through the worker; no weight gradient."""

    @staticmethod
    def forward(ctx, x, handle):
        ctx.handle = handle
        return handle.forward(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.handle.backward(grad), None


class _Masked:
    """The forward both masked layer kinds share: the product on the worker, the bias in the enclave."""

    offload: OffloadedLinear | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.offload is None:
            return super().forward(x)
        y = _OffloadFn.apply(x, self.offload)
        return y if self.bias is None else y + self.bias.to(y.dtype)


class MaskedLinear(_Masked, nn.Linear):
    """An ``nn.Linear`` whose product runs masked on the worker; the bias is added in the enclave.

    ``offload_linear`` turns a frozen ``nn.Linear`` into one in place (its class is swapped), so
    the module keeps its identity, parameters, buffers and hooks (e.g. SPF's sparse-delta hook,
    which then runs in the enclave on top of the offloaded product), and stays an ``nn.Linear``
    for peft. With ``offload`` None it is a plain Linear.
    """

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", offloaded={self.offload.name!r}" if self.offload else "")


class MaskedConv1D(_Masked, Conv1D):
    """GPT-2's ``Conv1D`` (weight stored (d_in, d_out)) with its product masked on the worker."""

    def __repr__(self) -> str:
        return super().__repr__() + (f" offloaded={self.offload.name!r}" if self.offload else "")


_MASKED = {nn.Linear: MaskedLinear, Conv1D: MaskedConv1D}


def _frozen(module: nn.Module) -> bool:
    return not any(p is not None and p.requires_grad for p in (module.weight, module.bias))


def offload_linear(module: nn.Linear | Conv1D, name: str, worker: Worker, pool: MaskPool) -> MaskedLinear | MaskedConv1D:
    """Offload one frozen ``nn.Linear`` / ``Conv1D`` in place: its weight goes to the worker under
    ``name`` (cast to the offload dtype), the pool registers the enclave's copy, and the module
    becomes a ``MaskedLinear`` / ``MaskedConv1D`` (returned; the same object).

    The weight and bias must stay frozen and unchanged from then on (the worker and the pool's
    products use them as they are now): merge anything into the base weights first."""
    if type(module) not in _MASKED:
        raise ConfigError(f"offload: {name!r} is a {type(module).__name__}, not an nn.Linear or Conv1D")
    if not _frozen(module):
        raise ConfigError(f"offload: {name!r} has a trainable weight or bias; only frozen layers can be offloaded")
    w_lin = _linear_weight(module)
    d_out, d_in = w_lin.shape
    worker.load(name, w_lin.to(pool.dtype).contiguous())
    pool.register(name, module.weight, isinstance(module, Conv1D))
    module.__class__ = _MASKED[type(module)]
    module.offload = OffloadedLinear(name, d_in, d_out, worker, pool, module.bias is not None)
    return module


def _scopes(model: nn.Module, include_lm_head: bool) -> list[str]:
    from ..models.arch import arch_for
    from ..models.partition import Stage

    if isinstance(model, Stage):
        scopes = ["blocks"]
        if include_lm_head and model.lm_head is not None:
            scopes.append("lm_head")
        return scopes
    if hasattr(model, "config"):
        spec = arch_for(model.config)
        return [spec.blocks] + ([spec.lm_head] if include_lm_head else [])
    return [""]


def offload_linears(model: nn.Module, worker: Worker, pool: MaskPool, include_lm_head: bool = False,
                    fuse: bool = True) -> list[str]:
    """Offload, in place, every Linear / Conv1D with a frozen weight and bias in the transformer
    blocks of ``model`` (a ``Stage``, a Hugging Face causal LM, or any module: all its frozen
    Linears) to ``worker``, masked with masks from ``pool``; with ``include_lm_head`` the LM head
    too. The embedding is never offloaded. LoRA layers (``lora_*``) and trainable Linears stay in
    the enclave; hooks and extra parameters on an offloaded layer (SPF's delta) stay too, and run
    in the enclave. With ``fuse`` layers that share an input are masked once together
    (``fuse_shared_inputs``). Returns the layers' names (a stage's names are those of the full model, so
    one worker can serve several stages)."""
    from ..models.partition import Stage

    names, modules = [], {}
    for scope_path in _scopes(model, include_lm_head):
        scope = model.get_submodule(scope_path) if scope_path else model
        if scope is None:
            continue
        for local, module in list(scope.named_modules()):
            if type(module) not in (nn.Linear, Conv1D):
                continue
            path = ".".join(p for p in (scope_path, local) if p)
            if "lora_" in path or not _frozen(module):
                continue
            key = model.full_name(path) if isinstance(model, Stage) else path
            offload_linear(module, key, worker, pool)
            names.append(key)
            modules[key] = module
    if fuse:
        fuse_shared_inputs(modules, worker, pool)
    return names


__all__ = ["MaskSettings", "MaskPool", "MaskPair", "MaskReuseError", "OffloadStats", "OffloadedLinear",
           "MaskedLinear", "MaskedConv1D", "offload_linear", "offload_linears", "fuse_shared_inputs",
           "FusedForward", "DTYPES"]
