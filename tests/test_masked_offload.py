"""Masked offload of frozen Linear layers to an untrusted worker (``silotune.tee``).

Float32 models on the CPU; the offload in float64 with masks 1e6 times the inputs' RMS unless a
test says otherwise. Tolerances: 1e-5 absolute on logits, loss, LoRA gradients and parameters
after a step (as in test_exactness); 1e-5 relative for one layer in float64, 1e-3 relative with a
float32 offload at mask scale 1e2. "Chance level" for a correlation over n elements: 5/sqrt(n).
"""

import copy
import logging
import math
import os
import signal
import time

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from silotune.adapters import AdapterSettings, LoraSettings, apply_method
from silotune.models.partition import load_stage
from silotune.tee.masking import (
    MaskedConv1D,
    MaskedLinear,
    MaskPool,
    MaskReuseError,
    MaskSettings,
    _csprng_normal,
    _keystream,
    offload_linear,
    offload_linears,
)
from silotune.tee.worker import InProcessWorker, ProcessWorker, WorkerError, shared_memory_available
from silotune.train.loss import lm_loss

from .test_exactness import batch

TOL = 1e-5
LINEARS_PER_BLOCK = 7  # q, k, v, o, gate, up, down


def corr(a, b) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


def rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def frozen_layer(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Linear(48, 40) if kind == "linear" else Conv1D(40, 48)
    with torch.no_grad():
        m.bias.normal_()
    return m.requires_grad_(False)


# ---- one layer ----

@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("dtype,scale,tol", [("fp64", 1e6, 1e-5), ("fp32", 1e2, 1e-3)])
def test_masked_layer_equals_plain_forward_and_backward(kind, dtype, scale, tol):
    plain = frozen_layer(kind)
    worker = InProcessWorker(record=True)
    masked = offload_linear(frozen_layer(kind), "l", worker, MaskPool(MaskSettings(scale, dtype, seed=1)))
    assert isinstance(masked, MaskedLinear if kind == "linear" else MaskedConv1D)
    assert isinstance(masked, nn.Linear if kind == "linear" else Conv1D)
    x, gy = torch.randn(3, 7, 48), torch.randn(3, 7, 40)
    xp, xm = x.clone().requires_grad_(), x.clone().requires_grad_()
    yp, ym = plain(xp), masked(xm)
    yp.backward(gy)
    ym.backward(gy)
    assert ym.shape == yp.shape and ym.dtype == torch.float32
    assert rel(ym, yp) < tol
    assert rel(xm.grad, xp.grad) < tol
    assert masked.weight.grad is None and masked.bias.grad is None  # frozen: no weight gradient
    view = worker.received(("forward", "backward"))
    assert [r.op for r in view] == ["forward", "backward"]
    assert view[0].tensor.shape == (21, 48) and view[1].tensor.shape == (21, 40)
    assert abs(corr(view[0].tensor, x)) < 5 / math.sqrt(x.numel())
    assert abs(corr(view[1].tensor, gy)) < 5 / math.sqrt(gy.numel())


class TamperingWorker(InProcessWorker):
    """An untrusted accelerator that adds ``delta`` to one entry of the products it returns."""

    def __init__(self, delta: float, op: str = "forward"):
        super().__init__()
        self.delta, self.op = delta, op

    def _tamper(self, out):
        out = out.clone()
        out[1, 3] += self.delta
        return out

    def forward(self, name, masked):
        out = super().forward(name, masked)
        return self._tamper(out) if self.op == "forward" else out

    def backward(self, name, masked_grad):
        out = super().backward(name, masked_grad)
        return self._tamper(out) if self.op == "backward" else out


@pytest.mark.parametrize("op", ["forward", "backward"])
@pytest.mark.parametrize("dtype,scale,delta", [("fp64", 1e6, 1e-3), ("fp32", 1e2, 100.0)])
def test_a_worker_that_alters_a_product_is_refused_before_it_is_used(op, dtype, scale, delta):
    """Freivalds' check: a product with one entry off (by 1e-3 with the exact fp64 offload, by a gross amount
    in fp32, whose rounding hides smaller changes) is refused with a WorkerError and counted; without the check
    the altered value flows into the result; honest products pass."""
    x, gy = torch.randn(3, 7, 48), torch.randn(3, 7, 40)
    plain = frozen_layer("linear")
    expected = plain(x)
    pool = MaskPool(MaskSettings(scale, dtype))
    layer = offload_linear(frozen_layer("linear"), "l", TamperingWorker(delta, op), pool)
    xm = x.clone().requires_grad_()
    with pytest.raises(WorkerError, match="integrity check"):
        layer(xm).backward(gy)
    assert pool.stats.integrity_failures == 1
    honest = offload_linear(frozen_layer("linear"), "h", InProcessWorker(), hpool := MaskPool(MaskSettings(scale, dtype)))
    xh = x.clone().requires_grad_()
    honest(xh).backward(gy)
    assert hpool.stats.verified_calls == 2 and hpool.stats.integrity_failures == 0
    unchecked_pool = MaskPool(MaskSettings(scale, dtype, verify=False))
    unchecked = offload_linear(frozen_layer("linear"), "u", TamperingWorker(delta, op), unchecked_pool)
    xu = x.clone().requires_grad_()
    out = unchecked(xu)
    out.backward(gy)
    changed = (out - expected) if op == "forward" else (xu.grad - xh.grad)
    assert changed.abs().max() > 0.5 * delta / (1 if dtype == "fp64" else 10), "the tampering reaches the result"


def test_offload_keeps_the_module_its_hooks_and_extra_parameters():
    """Converted in place: the same object, with a hook and a trainable parameter of its own (as
    SPF's sparse delta) still applied, in the enclave, on top of the offloaded product."""
    def with_delta():
        lin = frozen_layer("linear")
        lin.register_parameter("delta", nn.Parameter(torch.randn(40, 48) * 0.1))
        lin.register_forward_hook(lambda m, args, out: out + args[0] @ m.delta.t())
        return lin

    plain, lin = with_delta(), with_delta()
    masked = offload_linear(lin, "l", InProcessWorker(), MaskPool(MaskSettings(seed=7)))
    assert masked is lin and type(lin) is MaskedLinear and lin.delta.requires_grad
    with pytest.raises(Exception, match="not an nn.Linear"):
        offload_linear(lin, "again", InProcessWorker(), MaskPool())
    x = torch.randn(5, 48)
    xp, xm = x.clone().requires_grad_(), x.clone().requires_grad_()
    plain(xp).pow(2).sum().backward()
    lin(xm).pow(2).sum().backward()
    assert rel(xm.grad, xp.grad) < TOL and rel(lin.delta.grad, plain.delta.grad) < TOL
    trainable = nn.Linear(4, 4)
    with pytest.raises(Exception, match="trainable weight"):
        offload_linear(trainable, "t", InProcessWorker(), MaskPool())


def test_worker_inputs_are_uncorrelated_with_the_true_inputs():
    torch.manual_seed(0)
    lin = nn.Linear(64, 48).requires_grad_(False)
    # structured inputs: an offset, per-feature scales and a shared low-rank component
    x = 3.0 + torch.randn(256, 64) * torch.linspace(0.1, 4.0, 64) + torch.randn(256, 1) * torch.randn(1, 64)
    g = torch.randn(256, 48) * 1e-4 + 1e-4
    for scale, uncorrelated in [(1e6, True), (1e-2, False)]:  # the second: masks too small to hide anything
        worker = InProcessWorker(record=True)
        masked = offload_linear(copy.deepcopy(lin), "l", worker, MaskPool(MaskSettings(mask_scale=scale, seed=2)))
        xi = x.clone().requires_grad_()
        masked(xi).backward(g)
        fwd, bwd = worker.received(("forward", "backward"))
        c_fwd, c_bwd = abs(corr(fwd.tensor, x)), abs(corr(bwd.tensor, g))
        if uncorrelated:
            assert c_fwd < 5 / math.sqrt(x.numel()) and c_bwd < 5 / math.sqrt(g.numel())
        else:
            assert c_fwd > 0.9 and c_bwd > 0.9


def test_masks_are_fresh_every_call():
    lin = frozen_layer("linear")
    worker = InProcessWorker(record=True)
    pool = MaskPool(MaskSettings(seed=3))
    masked = offload_linear(lin, "l", worker, pool)
    pool.precompute(14)
    x, gy = torch.randn(2, 7, 48), torch.randn(2, 7, 40)
    outs = []
    for _ in range(3):  # the same input three times
        xi = x.clone().requires_grad_()
        y = masked(xi)
        y.backward(gy)
        outs.append((y.detach(), xi.grad))
    for y, gx in outs[1:]:
        assert torch.allclose(y, outs[0][0], atol=TOL) and torch.allclose(gx, outs[0][1], atol=TOL)
    view = worker.received(("forward", "backward"))
    masks = {op: [r.tensor - (x if op == "forward" else gy).reshape(14, -1).double() for r in view if r.op == op]
             for op in ("forward", "backward")}
    for op, ms in masks.items():
        assert len(ms) == 3
        n = ms[0].numel()
        for i in range(3):
            for j in range(i):
                assert abs(corr(ms[i], ms[j])) < 5 / math.sqrt(n), (op, i, j)
    st = pool.stats
    assert st.masks_used == 6 and st.rows_used == 6 * 14
    assert st.precomputed_rows == 2 * 14 and st.on_demand_rows == 4 * 14  # pool held one call per direction
    assert st.forward_calls == 3 and st.backward_calls == 3


def test_pool_hands_each_mask_out_once_and_counts(caplog):
    torch.manual_seed(0)
    w = torch.randn(5, 4, dtype=torch.float64)
    pool = MaskPool(MaskSettings(seed=0))
    pool.register("w", w)
    assert pool.precompute(6) == 2 * (2 * 6 * 4 * 5) and pool.available("w", "fwd") == 6
    assert pool.precompute(6) == 0  # already full
    a = pool.take("w", "fwd", 4)
    with caplog.at_level(logging.WARNING, logger="silotune.tee.masking"):
        b = pool.take("w", "fwd", 4)  # 2 precomputed rows + 2 on demand
        pool.take("w", "bwd", 9)
    assert sum("ran dry" in r.message for r in caplog.records) == 1  # logged once
    assert (a.first_row, b.first_row) == (0, 4)
    zero = torch.zeros(4, 4, dtype=torch.float64)
    m = b.apply(zero, 2.0)  # = 2 r: the worker's product of it is removed exactly by the pair's own product
    assert torch.allclose(b.unmask(m @ w.t(), 2.0), torch.zeros(4, 5, dtype=torch.float64), atol=1e-12)
    a.apply(zero, 1.0)
    with pytest.raises(MaskReuseError):
        a.apply(zero, 1.0)
    a.unmask(torch.zeros(4, 5, dtype=torch.float64), 1.0)
    with pytest.raises(MaskReuseError):
        a.unmask(torch.zeros(4, 5, dtype=torch.float64), 1.0)
    with pytest.raises(MaskReuseError):
        b.apply(zero, 1.0)
    st = pool.stats
    assert (st.precomputed_rows, st.on_demand_rows, st.rows_used, st.masks_used) == (12, 2 + 3, 17, 3)
    assert st.precompute_flops == 2 * 2 * 6 * 4 * 5 and st.on_demand_flops == 2 * 5 * 4 * 5


def test_default_masks_come_from_the_os_csprng_with_unit_variance():
    lin = nn.Linear(64, 64).requires_grad_(False)
    x = torch.randn(128, 64)
    seen = []
    for _ in range(2):
        worker, pool = InProcessWorker(record=True), MaskPool()  # seed None: os.urandom
        offload_linear(copy.deepcopy(lin), "l", worker, pool)(x)
        scale, _ = pool.scale_for(x, "fwd")
        r = (worker.received(("forward",))[0].tensor - x.double()) / scale
        assert abs(float(r.mean())) < 0.05 and abs(float(r.std()) - 1) < 0.05
        assert 1e6 <= scale / float(x.pow(2).mean().sqrt()) < 2e6  # rounded up to a power of two
        seen.append(r)
    assert abs(corr(*seen)) < 5 / math.sqrt(seen[0].numel())


def test_csprng_normal_is_a_standard_gaussian():
    """The default sampler's output, over n ~ 2e5 draws (an odd count: Box-Muller's pairs are cut):
    mean 0, variance 1, kurtosis 3 (a uniform of the same variance has 1.8) and the Gaussian's mass
    within one and two standard deviations, each within 5 standard errors."""
    z = _csprng_normal(333, 601)
    assert z.shape == (333, 601) and z.dtype == torch.float64 and z.is_contiguous()
    z = z.flatten()
    n = z.numel()
    assert torch.isfinite(z).all()
    assert abs(float(z.mean())) < 5 / math.sqrt(n)
    assert abs(float(z.var()) - 1) < 5 * math.sqrt(2 / n)
    assert abs(float(z.pow(4).mean()) - 3) < 5 * math.sqrt(96 / n)
    for k, p in [(1, 0.682689), (2, 0.954500)]:
        assert abs(float((z.abs() < k).double().mean()) - p) < 5 * math.sqrt(p * (1 - p) / n), k
    assert _csprng_normal(0, 5).shape == (0, 5) and _csprng_normal(1, 1).shape == (1, 1)


def test_masks_come_from_an_aes_ctr_keystream_under_a_fresh_os_urandom_key(monkeypatch):
    """The keystream is AES-256-CTR under a key from os.urandom, a new key for every chunk, and torch's
    (predictable) generator plays no part: with os.urandom pinned the masks repeat whatever torch's seed."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    n = 3 * (1 << 20) + 40  # more than one piece of the zero plaintext
    a, b = _keystream(n)[:n], _keystream(n)[:n]
    assert a.shape == (n,) and not torch.equal(a, b)  # a fresh key per call
    key = bytes(range(32))
    aes = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(n))
    monkeypatch.setattr("silotune.tee.masking.os.urandom", lambda k: key[:k])
    assert _keystream(n)[:n].numpy().tobytes() == aes
    torch.manual_seed(0)
    z1 = _csprng_normal(8, 8)
    torch.manual_seed(1)
    assert torch.equal(_csprng_normal(8, 8), z1)  # pinned key: same masks, whatever torch's seed


def test_two_pools_never_draw_equal_masks():
    """Two default pools (and two refills of one pool) draw independent masks: no element in common,
    correlations at chance, even with torch's generator reseeded identically before each."""
    w = torch.randn(40, 48)
    masks = []
    for _ in range(2):
        torch.manual_seed(0)
        pool = MaskPool()
        pool.register("w", w)
        pool.precompute(64)
        for _ in range(2):  # two refills of the same pool
            pair = pool.take("w", "fwd", 64)
            masks.append(pair.apply(torch.zeros(64, 48), 1.0))  # = the mask itself
            pool.precompute(64)
    n = masks[0].numel()
    for i in range(len(masks)):
        for j in range(i):
            assert not (masks[i] == masks[j]).any(), (i, j)
            assert abs(corr(masks[i], masks[j])) < 5 / math.sqrt(n), (i, j)


def test_masking_and_unmasking_are_bit_exact_and_spend_the_mask():
    """In-place masking and the one-pass unmasking round exactly as ``t + c r`` and
    ``(out - c rW).to(float32)``; the mask's buffer is overwritten (nothing of r is left behind) and
    the rows that follow in the same precomputed chunk are untouched."""
    torch.manual_seed(0)
    w = torch.randn(40, 48)
    pool = MaskPool(MaskSettings(seed=9))
    pool.register("w", w)
    pool.precompute(10)
    chunk = pool._queues[("w", "fwd")][0][1]
    chunk_mask, chunk_product = (t.clone() for t in pool._queues[("w", "fwd")][0][1:])
    pair = pool.take("w", "fwd", 6)
    x = torch.randn(6, 48)
    scale = 2.0 ** 21
    masked = pair.apply(x, scale)
    assert torch.equal(masked, x.double() + scale * chunk_mask[:6])
    assert torch.equal(chunk[:6], masked) and pair._mask is None  # the mask's rows now hold x + c r
    out = masked @ w.double().t()
    got = pair.unmask(out, scale, torch.float32)
    assert got.dtype == torch.float32 and torch.equal(got, (out - scale * chunk_product[:6]).float())
    assert torch.allclose(got, x @ w.t(), atol=1e-5)
    rest = pool.take("w", "fwd", 4)  # the chunk's other rows: still the original masks
    assert torch.equal(rest.apply(torch.zeros(4, 48), 1.0), chunk_mask[6:])


# ---- a whole tiny model with LoRA ----

tiny_batch = batch  # the exactness tests' batch: three sequences of different lengths


def lora_stage(model_dir, worker=None, pool=None, order="offload-then-lora"):
    stage = load_stage(model_dir, "full")
    names = None
    if worker is not None and order == "offload-then-lora":
        names = offload_linears(stage, worker, pool)
    apply_method(stage, AdapterSettings(method="lora", lora=LoraSettings(r=4, alpha=8)), seed=3)
    with torch.no_grad():  # random B so LoRA is not a no-op
        for name, p in stage.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(sum(map(ord, name)))) * 0.1)
    if worker is not None and order == "lora-then-offload":
        names = offload_linears(stage, worker, pool)
    return stage, names


def loss_of(stage, b):
    logits = stage(b["input_ids"], b["lengths"])
    return logits, lm_loss(logits, b["labels"])


def lora_params(stage):
    return {n: p for n, p in stage.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("order", ["offload-then-lora", "lora-then-offload"])
def test_tiny_llama_with_lora_equals_plain_model_and_step(tiny_dirs, order):
    model_dir = tiny_dirs["llama"]
    worker, pool = InProcessWorker(record=True), MaskPool(MaskSettings(seed=4))
    plain, _ = lora_stage(model_dir)
    masked, names = lora_stage(model_dir, worker, pool, order)
    n_blocks = len(masked.blocks)
    assert len(names) == n_blocks * LINEARS_PER_BLOCK
    assert type(masked.lm_head) is nn.Linear and type(masked.embed) is nn.Embedding  # not offloaded
    q = masked.blocks[0].self_attn.q_proj
    assert isinstance(q.base_layer, MaskedLinear) and "default" in q.lora_A  # peft wrapped the masked layer
    assert all(type(m) is nn.Linear for n, m in masked.named_modules() if "lora_" in n and isinstance(m, nn.Linear))
    assert set(lora_params(masked)) == set(lora_params(plain)) and lora_params(plain)
    b = tiny_batch(masked.config.vocab_size)
    tokens = b["input_ids"].numel()
    pool.precompute(tokens)

    logits_p, loss_p = loss_of(plain, b)
    logits_m, loss_m = loss_of(masked, b)
    loss_p.backward()
    loss_m.backward()
    assert abs(loss_m.item() - loss_p.item()) < TOL
    for i, n in enumerate(b["lengths"]):
        assert torch.allclose(logits_m[i, :n], logits_p[i, :n], atol=TOL, rtol=0)
    params_p, params_m = lora_params(plain), lora_params(masked)
    for name, p in params_p.items():
        assert p.grad.abs().max() > 0, name
        assert torch.allclose(params_m[name].grad, p.grad, atol=TOL, rtol=0), name
    st = pool.stats
    # q, k, v (and gate, up) read one input: one masked forward call for each group, none per member
    forwards = [r.name for r in worker.received(("forward",))]
    assert st.on_demand_rows == 0 and st.forward_calls == len(forwards) == n_blocks * 4  # qkv, o, gate+up, down
    assert sum(n.endswith("self_attn.q_proj+k_proj+v_proj") for n in forwards) == n_blocks
    assert sum(n.endswith("mlp.gate_proj+up_proj") for n in forwards) == n_blocks
    assert not any(n.endswith(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")) for n in forwards if "+" not in n)
    assert st.backward_calls == len(worker.received(("backward",))) > 0
    # the counters: the worker's products, and the enclave's elementwise online work per call
    d_out = {r.name: r.tensor.shape[0] for r in worker.received(("load",))}
    d_in = {r.name: r.tensor.shape[1] for r in worker.received(("load",))}
    calls = [(r.tensor.shape[0], d_in[r.name], d_out[r.name]) if r.op == "forward" else
             (r.tensor.shape[0], d_out[r.name], d_in[r.name]) for r in worker.received(("forward", "backward"))]
    assert st.worker_flops == sum(2 * n * a * c for n, a, c in calls) == worker.worker_flops()
    assert st.online_flops == sum(4 * n * a + 2 * n * c for n, a, c in calls)  # llama: no bias
    assert st.precompute_flops == 2 * sum(2 * tokens * d_in[k] * d_out[k] for k in names)

    # one optimizer step on each, then a second forward: the same parameters and loss
    for stage in (plain, masked):
        opt = torch.optim.AdamW(lora_params(stage).values(), lr=1e-2)
        opt.step()
        opt.zero_grad()
    for name, p in params_p.items():
        assert torch.allclose(params_m[name], p, atol=TOL, rtol=0), name
    pool.precompute(tokens)
    with torch.no_grad():
        _, loss_p2 = loss_of(plain, b)
        _, loss_m2 = loss_of(masked, b)
    assert abs(loss_p2.item() - loss_p.item()) > 1e-4  # the step changed something
    assert abs(loss_m2.item() - loss_p2.item()) < TOL


def test_worker_view_of_a_training_step(tiny_dirs):
    """What the worker received in a whole step: one product per offloaded call (the unmasking
    is never asked of it), every input at chance correlation with the true one, and every mask
    (received - true) fresh; q, k and v (and gate, up) share their input, which the worker gets once,
    masked once."""
    worker, pool = InProcessWorker(record=True), MaskPool(MaskSettings(seed=5))
    stage, names = lora_stage(tiny_dirs["llama"], worker, pool)
    true_in = []

    def seen_forward(mod, args):
        fused = mod.offload.fused
        if fused is not None and any(e[1] == fused.name and e[2] is args[0] for e in true_in):
            return  # the group's call already carried this input
        true_in.append(("forward", fused.name if fused is not None else mod.offload.name, args[0]))

    for m in stage.modules():
        if isinstance(m, MaskedLinear):
            m.register_forward_pre_hook(seen_forward)
            m.register_full_backward_hook(
                lambda mod, gin, gout: true_in.append(("backward", mod.offload.name, gout[0])))
    b = tiny_batch(stage.config.vocab_size, seed=1)
    _, loss = loss_of(stage, b)
    loss.backward()
    view = worker.received(("forward", "backward"))
    assert len(view) == len(true_in) == pool.stats.masks_used  # one worker product per call, nothing else
    assert sum(r.op == "forward" for r in view) == len(names) // LINEARS_PER_BLOCK * 4  # qkv, o, gate+up, down
    by_call = {}
    for (op, name, t), r in zip(sorted(true_in, key=lambda e: (e[0], e[1])), sorted(view, key=lambda r: (r.op, r.name))):
        assert (op, name) == (r.op, r.name)
        t = t.detach().reshape(r.tensor.shape)
        assert abs(corr(r.tensor, t)) < 5 / math.sqrt(t.numel()), (op, name)
        by_call.setdefault((op, tuple(t.shape)), []).append(r.tensor - t.double())
    pairs = 0
    for (op, shape), masks in by_call.items():
        bound = 5 / math.sqrt(masks[0].numel())
        for i in range(len(masks)):
            for j in range(i):
                assert abs(corr(masks[i], masks[j])) < bound, (op, shape, i, j)
                pairs += 1
    assert pairs > 100


# ---- the separate-process worker ----

def test_process_worker_equals_in_process_worker(tiny_dirs):
    b = tiny_batch(128)
    results = []
    worker = ProcessWorker(record=True, threads=1)
    try:
        for w in (InProcessWorker(record=True), worker):
            pool = MaskPool(MaskSettings(seed=6))
            stage, _ = lora_stage(tiny_dirs["llama"], w, pool)
            pool.precompute(b["input_ids"].numel())
            logits, loss = loss_of(stage, b)
            loss.backward()
            results.append((logits.detach(), loss.item(), {n: p.grad for n, p in lora_params(stage).items()},
                            w.received(("forward", "backward")), w.worker_flops(), pool.stats.worker_flops))
        (l1, s1, g1, v1, f1, e1), (l2, s2, g2, v2, f2, e2) = results
        assert abs(s1 - s2) < 1e-6 and torch.allclose(l1, l2, atol=1e-6)
        assert all(torch.allclose(g1[n], g2[n], atol=1e-6) for n in g1)
        assert [(r.op, r.name) for r in v1] == [(r.op, r.name) for r in v2] and v1
        assert all(rel(a.tensor, b.tensor) < 1e-9 for a, b in zip(v1, v2))
        assert f1 == f2 == e1 == e2 > 0  # the enclave's count of offloaded FLOPs is the worker's
    finally:
        worker.close()
    assert worker.process.exitcode == 0  # a clean shutdown
    with pytest.raises(WorkerError, match="closed"):
        worker.forward("x", torch.zeros(1, 1, dtype=torch.float64))


def test_dead_process_worker_gives_a_clear_error_not_a_hang():
    w64 = torch.randn(3, 4, dtype=torch.float64)
    x = torch.randn(2, 4, dtype=torch.float64)
    worker = ProcessWorker(threads=1)
    try:
        worker.load("w", w64)
        assert torch.allclose(worker.forward("w", x), x @ w64.t())
        with pytest.raises(WorkerError, match="no weight named 'nope'"):  # refused, and still serving
            worker.forward("nope", x)
        assert torch.allclose(worker.backward("w", torch.ones(2, 3, dtype=torch.float64)), torch.ones(2, 3).double() @ w64)
        t0 = time.monotonic()
        with pytest.raises(WorkerError, match=r"died \(exit code 3\)"):
            worker._call("exit")  # dies in the middle of a request
        assert time.monotonic() - t0 < 10
        with pytest.raises(WorkerError, match="unusable"):
            worker.forward("w", x)
    finally:
        worker.close()
    worker = ProcessWorker(threads=1)
    try:
        worker.load("w", w64)
        worker.process.kill()
        worker.process.join(5)
        t0 = time.monotonic()
        with pytest.raises(WorkerError, match=r"died \(exit code -9\) during forward 'w'"):
            worker.forward("w", x)  # dead before the request
        assert time.monotonic() - t0 < 10
    finally:
        worker.close()
    worker = ProcessWorker(threads=1, timeout=1.0)
    try:
        worker.load("w", w64)
        os.kill(worker.pid, signal.SIGSTOP)  # alive but unresponsive
        t0 = time.monotonic()
        with pytest.raises(WorkerError, match="gave no answer within 1 s"):
            worker.forward("w", x)
        assert time.monotonic() - t0 < 10
        assert not worker.process.is_alive()  # a stuck worker is killed, not left behind
    finally:
        worker.close()


@pytest.mark.parametrize("shared", [False, pytest.param(True, marks=pytest.mark.skipif(
    not shared_memory_available(), reason="no memfd"))], ids=["socket", "shared-region"])
def test_process_worker_moves_large_and_empty_tensors_exactly_and_times_out_mid_transfer(shared):
    """Over the socket (raw bytes) and through the shared region (which then has to grow): a tensor
    far larger than the socket's buffers or the first region, and one with no rows, arrive exactly;
    a worker stopped while a large request is under way is reported within the timeout, not waited
    on forever."""
    torch.manual_seed(0)
    w64 = torch.randn(1536, 576, dtype=torch.float64)
    big = torch.randn(4096, 576, dtype=torch.float64)  # 19 MB in, 50 MB back
    worker = ProcessWorker(threads=1, timeout=30.0, record=True, shared_memory=shared)
    try:
        assert worker.shared_memory is shared
        worker.load("w", w64)
        assert torch.allclose(worker.forward("w", big), big @ w64.t(), rtol=1e-12, atol=1e-10)
        g = torch.randn(4096, 1536, dtype=torch.float64)
        assert torch.allclose(worker.backward("w", g), g @ w64, rtol=1e-12, atol=1e-10)
        load, fwd, bwd = worker.received()
        assert torch.equal(load.tensor, w64) and torch.equal(fwd.tensor, big) and torch.equal(bwd.tensor, g)
        worker.clear_received()
        empty = worker.forward("w", torch.empty(0, 576, dtype=torch.float64))
        assert empty.shape == (0, 1536) and empty.dtype == torch.float64
        with pytest.raises(WorkerError, match="expects"):  # a wrong shape is refused, and it keeps serving
            worker.forward("w", torch.zeros(3, 5, dtype=torch.float64))
        assert torch.allclose(worker.forward("w", big[:7]), big[:7] @ w64.t(), rtol=1e-12, atol=1e-10)
        worker.timeout = 1.0
        os.kill(worker.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(WorkerError, match="gave no answer within 1 s"):
            worker.forward("w", torch.cat([big, big]))  # socket: blocks on the full buffer; region: on its growth
        assert time.monotonic() - t0 < 10
        assert not worker.process.is_alive()
    finally:
        worker.close()


@pytest.mark.skipif(not shared_memory_available(), reason="no memfd")
def test_shared_region_holds_only_masked_inputs_and_products():
    """Everything the worker can read in the shared region (all of it, not just what it records) is
    at chance correlation with the true inputs: masking happens in enclave memory before the copy."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 48).requires_grad_(False)
    x = 3.0 + torch.randn(512, 64)
    worker = ProcessWorker(threads=1)
    try:
        masked = offload_linear(copy.deepcopy(lin), "l", worker, MaskPool())
        xi = x.clone().requires_grad_()
        y = masked(xi)
        assert torch.allclose(y, lin(x), atol=TOL)
        region = worker._region[:x.numel() * 8].view(torch.float64)  # the input slot of the last call
        assert abs(corr(region, x)) < 5 / math.sqrt(x.numel())
        assert not torch.isclose(region, x.double().flatten()).any()
    finally:
        worker.close()


def test_layers_that_share_an_input_are_masked_once_and_fall_back_when_they_do_not():
    """q, k and v of one parent read one input: one masked worker call for the three, each output exact;
    given different inputs (or the input changed in place in between) each gets a call of its own, still exact."""
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(3)
            self.q_proj, self.k_proj, self.v_proj = nn.Linear(48, 40), nn.Linear(48, 16), nn.Linear(48, 16)
            self.requires_grad_(False)

    plain, attn = Attn(), Attn()
    worker, pool = InProcessWorker(record=True), MaskPool(MaskSettings(seed=2))
    assert offload_linears(attn, worker, pool) == ["q_proj", "k_proj", "v_proj"]
    assert pool.names() == ["q_proj", "k_proj", "v_proj"]  # the fused group is not a layer
    x = torch.randn(2, 5, 48)
    for name in ("q_proj", "k_proj", "v_proj"):
        assert rel(getattr(attn, name)(x), getattr(plain, name)(x)) < TOL
    assert [r.name for r in worker.received(("forward",))] == ["q_proj+k_proj+v_proj"]
    worker.clear_received()
    y = torch.randn(2, 5, 48)
    assert rel(attn.q_proj(x), plain.q_proj(x)) < TOL and rel(attn.k_proj(y), plain.k_proj(y)) < TOL
    x.mul_(2)  # changed in place: the waiting output of v is stale
    assert rel(attn.v_proj(x), plain.v_proj(x)) < TOL
    assert len(worker.received(("forward",))) == 3
