"""Masked offload (``silotune.tee.masking``): precision and hiding for several mask scales and dtypes.

The mask scale trades hiding against precision: ``(x + r) W^T - r W^T`` loses about
``eps(offload dtype) * |r| / |x|`` relative accuracy, and the correlation between what the worker
receives and the true input is about ``|x| / |r|``. This measures both on SmolLM2-135M-Instruct
(real activations and gradients of one middle block, and the whole model with LoRA):

* per layer (block 15's q_proj, o_proj and down_proj; forward on the real inputs, backward on the
  real output gradients of a next-token loss on a paragraph of text): the relative error
  ``||masked - exact|| / ||exact||`` against a float64 product, next to plain float32's error, and
  ``|corr(worker's input, true input)|`` with its chance level ``1/sqrt(n)``;
* whole model (LoRA r=8 on q,k,v,o of every block, random B, all 210 block Linears offloaded):
  the loss and every LoRA gradient against a float64 copy of the model, for plain float32 and for
  the masked runs.

Run: ``.venv/bin/python benchmarks/mask_precision.py [--scales 1e2 1e4 1e6] [--no-model]``; writes
benchmarks/results/mask_precision.{json,md}. 20 s to 2 minutes on 2 CPU cores (with other jobs
sharing them); the seconds in the table are CPU timings with the worker in process, not a GPU speed-up.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from silotune.adapters import AdapterSettings, LoraSettings, apply_method
from silotune.models.loading import load_tokenizer, resolve_model
from silotune.models.partition import load_stage
from silotune.tee.masking import MaskPool, MaskSettings, offload_linear, offload_linears
from silotune.tee.worker import InProcessWorker
from silotune.train.loss import lm_loss

TEXT = ("The patient was admitted with chest pain radiating to the left arm. An electrocardiogram showed "
        "ST elevation in the anterior leads, and troponin was raised. She was taken for angiography, which "
        "found a proximal occlusion of the left anterior descending artery; a stent was placed and she made "
        "an uneventful recovery. She was discharged on aspirin, a statin and a beta blocker.")
LAYER = 15
PROJ = ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj")
OUT = Path(__file__).parent / "results"


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref.double()).norm() / ref.double().norm())


def capture(model_dir, ids):
    """Inputs and output gradients of block LAYER's projections, from a real forward/backward."""
    stage = load_stage(model_dir, "full")
    got = {}
    for name in PROJ:
        mod = stage.blocks[LAYER].get_submodule(name)
        mod.register_forward_pre_hook(lambda m, a, n=name: got.__setitem__((n, "x"), a[0].detach().clone()))
        mod.register_full_backward_hook(lambda m, gi, go, n=name: got.__setitem__((n, "g"), go[0].detach().clone()))
    emb = stage.embed(ids).detach().requires_grad_()
    logits = stage(emb, torch.tensor([ids.shape[1]]))
    lm_loss(logits, ids).backward()
    return stage, got


def per_layer(stage, got, scales, dtypes):
    rows = []
    for name in PROJ:
        lin = stage.blocks[LAYER].get_submodule(name)
        x, g = got[(name, "x")], got[(name, "g")]
        w64 = lin.weight.double()
        ref_y, ref_gx = x.double() @ w64.t(), g.double() @ w64
        plain_y, plain_gx = x @ lin.weight.t(), g @ lin.weight
        for dtype in dtypes:
            for scale in scales:
                worker = InProcessWorker(record=True)
                pool = MaskPool(MaskSettings(mask_scale=scale, offload_dtype=dtype))
                fresh = torch.nn.Linear(lin.in_features, lin.out_features, bias=False).requires_grad_(False)
                fresh.weight.copy_(lin.weight)
                masked = offload_linear(fresh, name, worker, pool)
                pool.precompute(x.reshape(-1, x.shape[-1]).shape[0])
                xi = x.clone().requires_grad_()
                y = masked(xi)
                y.backward(g)
                view = worker.received(("forward", "backward"))
                rows.append({
                    "layer": f"blocks.{LAYER}.{name}", "dtype": dtype, "mask_scale": scale,
                    "fwd_rel_err": rel(y.detach(), ref_y), "bwd_rel_err": rel(xi.grad, ref_gx),
                    "plain_fp32_fwd_rel_err": rel(plain_y, ref_y), "plain_fp32_bwd_rel_err": rel(plain_gx, ref_gx),
                    "fwd_corr": abs(corr(view[0].tensor, x)), "bwd_corr": abs(corr(view[1].tensor, g)),
                    "fwd_n": x.numel(), "bwd_n": g.numel(), "chance_fwd": 1 / math.sqrt(x.numel()),
                    "chance_bwd": 1 / math.sqrt(g.numel()),
                })
                print(json.dumps(rows[-1]), flush=True)
    return rows


def lora_model(model_dir, dtype=torch.float32):
    stage = load_stage(model_dir, "full", dtype=dtype)
    apply_method(stage, AdapterSettings(method="lora", lora=LoraSettings(r=8, alpha=16)), seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in sorted(stage.named_parameters()):
            if "lora_B" in name:
                p.copy_((torch.randn(p.shape, generator=g) * 0.05).to(p.dtype))
    return stage


def run_model(stage, ids):
    logits = stage(ids, torch.tensor([ids.shape[1]]))
    loss = lm_loss(logits, ids)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in stage.named_parameters() if p.requires_grad}


def whole_model(model_dir, ids, configs):
    ref_loss, ref_grads = run_model(lora_model(model_dir, torch.float64), ids)
    rows = []
    for label, settings in [("plain fp32", None)] + configs:
        stage = lora_model(model_dir)
        pool = None
        if settings is not None:
            pool = MaskPool(settings)
            names = offload_linears(stage, InProcessWorker(), pool)
            pool.precompute(ids.numel())
        t0 = time.perf_counter()
        loss, grads = run_model(stage, ids)
        errs = [rel(grads[n], ref_grads[n]) for n in ref_grads]
        row = {"run": label, "seconds": round(time.perf_counter() - t0, 2), "loss": loss,
               "loss_rel_err": abs(loss - ref_loss) / abs(ref_loss), "lora_grad_rel_err_max": max(errs),
               "lora_grad_rel_err_median": sorted(errs)[len(errs) // 2]}
        if pool is not None:
            row.update(offloaded_layers=len(names), **{k: v for k, v in pool.stats.summary().items()
                                                       if "flops" in k or "share" in k})
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def markdown(layer_rows, model_rows, tokens) -> str:
    out = ["# Masked offload: precision and hiding (SmolLM2-135M-Instruct)", "",
           f"Per layer: block {LAYER}, real activations/gradients of {tokens} "
           "tokens; errors relative to a float64 product; corr = |Pearson corr(worker's input, true input)|.", "",
           "| layer | dtype | mask_scale | fwd err | bwd err | plain fp32 fwd / bwd err | fwd corr | bwd corr "
           "| 1/sqrt(n) fwd / bwd |", "|---|---|---|---|---|---|---|---|---|"]
    for r in layer_rows:
        out.append(f"| {r['layer'].split('.', 2)[2]} | {r['dtype']} | {r['mask_scale']:.0e} | {r['fwd_rel_err']:.1e} "
                   f"| {r['bwd_rel_err']:.1e} | {r['plain_fp32_fwd_rel_err']:.1e} / {r['plain_fp32_bwd_rel_err']:.1e} "
                   f"| {r['fwd_corr']:.1e} | {r['bwd_corr']:.1e} | {r['chance_fwd']:.1e} / {r['chance_bwd']:.1e} |")
    if model_rows:
        out += ["", "Whole model, LoRA r=8 (q,k,v,o), errors against a float64 copy of the model:", "",
                "| run | loss rel err | LoRA grad rel err (max / median) | seconds | online share | "
                "enclave share incl. precompute |", "|---|---|---|---|---|---|"]
        for r in model_rows:
            share = (f"{r['online_share']:.4f} | {r['enclave_share_with_precompute']:.3f}"
                     if "online_share" in r else "- | -")
            out.append(f"| {r['run']} | {r['loss_rel_err']:.1e} | {r['lora_grad_rel_err_max']:.1e} / "
                       f"{r['lora_grad_rel_err_median']:.1e} | {r['seconds']} | {share} |")
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--scales", type=float, nargs="+", default=[1e1, 1e2, 1e3, 1e4, 1e6, 1e8])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "fp64"])
    ap.add_argument("--no-model", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    model_dir = resolve_model("smollm2")
    ids = torch.tensor([load_tokenizer(model_dir)(TEXT)["input_ids"]])
    stage, got = capture(model_dir, ids)
    layer_rows = per_layer(stage, got, args.scales, args.dtypes)
    model_rows = []
    if not args.no_model:
        model_rows = whole_model(model_dir, ids, [
            ("masked fp64, scale 1e6", MaskSettings(mask_scale=1e6, offload_dtype="fp64", seed=0)),
            ("masked fp32, scale 1e2", MaskSettings(mask_scale=1e2, offload_dtype="fp32", seed=0)),
            ("masked fp32, scale 1e3", MaskSettings(mask_scale=1e3, offload_dtype="fp32", seed=0)),
        ])
    OUT.mkdir(exist_ok=True)
    (OUT / "mask_precision.json").write_text(json.dumps({"layers": layer_rows, "model": model_rows}, indent=1))
    (OUT / "mask_precision.md").write_text(markdown(layer_rows, model_rows, ids.shape[1]))
    print(markdown(layer_rows, model_rows, ids.shape[1]))


if __name__ == "__main__":
    main()
