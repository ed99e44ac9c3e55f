"""The run folder: metrics JSON, a markdown report, a loss plot and the trained adapters.

Every file is written atomically (temporary file, then rename), so an interrupted run
never leaves a half-written artefact. The plot needs matplotlib (``pip install 'silotune[plot]'``);
without it one log line says so and the rest of the folder is written as usual.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
from pathlib import Path

import torch
import yaml
from safetensors.torch import save as st_save

from .adapters import spf_indices, trainable_state
from .atomic import atomic_path, atomic_write
from .config import RunConfig, to_dict

log = logging.getLogger(__name__)

ADAPTERS_FORMAT = "silotune-adapters"
RECORD_KEY = "silotune"
"""Metadata key of an adapters file's record (JSON): what ``silotune export`` needs to rebuild the adapters."""
RECORD_VERSION = 1
RELEASABLE_KEY = "releasable"
"""Metadata key of a deployment's trunk file: "true" only when its server consented
(``deploy.release_trunk_adapters``)."""


def adapter_record(cfg: RunConfig, model_config) -> dict:
    """Everything needed to rebuild a run's adapters on its base model, as JSON-able values: the method and
    its settings with the architecture's defaults resolved, the split, the adapted parts and blocks, the
    base model (as the config names it, its directory and its ``model_type``) and the seed."""
    from .adapters import trained_layers
    from .models.arch import arch_for, num_layers

    spec, adapters = arch_for(model_config), cfg.adapters
    a, c = cfg.split.head_blocks, cfg.split.tail_blocks
    record = {"version": RECORD_VERSION, "method": adapters.method, "parts": list(adapters.parts),
              "layers": sorted(trained_layers(model_config, adapters, a, c)),
              "split": {"head_blocks": a, "tail_blocks": c},
              "model": str(cfg.model), "model_type": model_config.model_type,
              "num_layers": num_layers(model_config), "seed": cfg.train.seed}
    where = Path(getattr(model_config, "_name_or_path", "") or ".")
    if where.is_dir() and (where / "config.json").is_file():
        record["model_path"] = str(where.resolve())
    if adapters.method in ("lora", "lora+spf"):
        lora = adapters.lora
        record["lora"] = {"r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout,
                          "targets": list(lora.targets or spec.lora_targets), "fan_in_fan_out": spec.fan_in_fan_out}
    if adapters.method in ("spf", "lora+spf"):
        record["spf"] = {"ratio": adapters.spf.ratio, "targets": list(adapters.spf.targets or spec.spf_targets)}
    if adapters.method == "prefix":
        record["prefix"] = {"length": adapters.prefix.length}
    return record


def adapters_blob(stages, method: str, cfg: RunConfig | None = None, *, releasable: bool | None = None) -> bytes:
    """Trainable tensors of the given stages under their names in the full model. SPF's sparse deltas
    go with their row indices (``...spf_rows``, int64, next to each ``...spf_delta``), so the file
    alone says which rows of the base weight each delta row adds to.

    With the run's ``cfg`` the metadata also holds ``adapter_record`` as JSON (key ``silotune``);
    ``releasable`` (a deployment's trunk file) is written as "true" / "false" when given."""
    state, model_config = {}, None
    for stage in stages:
        if stage is None:  # an enclave that keeps its trunk adapters (tee.release_trunk: false)
            continue
        model_config = stage.config
        state.update({stage.full_name(k): v.contiguous() for k, v in trainable_state(stage).items()})
        state.update({stage.full_name(k): v.contiguous() for k, v in spf_indices(stage).items()})
    metadata = {"format": ADAPTERS_FORMAT, "method": method}
    if cfg is not None and model_config is not None:
        metadata[RECORD_KEY] = json.dumps(adapter_record(cfg, model_config))
    if releasable is not None:
        metadata[RELEASABLE_KEY] = "true" if releasable else "false"
    return st_save(state, metadata=metadata)


def public(result: dict) -> dict:
    """The JSON-able part of a result (drops live objects, keys starting with '_')."""
    if isinstance(result, dict):
        return {k: public(v) for k, v in result.items() if not str(k).startswith("_")}
    if isinstance(result, list):
        return [public(v) for v in result]
    return result


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, {platform.system()}"


def score_line(metrics: dict) -> str:
    if "accuracy" in metrics:
        return f"accuracy {metrics['accuracy']:.4f}"
    return " / ".join(f"{k} {metrics[k]:.4f}" for k in ("rouge1", "rouge2", "rougeL"))


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


def markdown(cfg: RunConfig, r: dict, loss_plot: bool = True) -> str:
    fed, cen = r["federated"], r.get("centralized")
    lines = [f"# SiloTune run: {r['task']} on {r['model']}", "",
             f"- machine: {machine()}",
             f"- split: {cfg.split.head_blocks} head block(s) + trunk + {cfg.split.tail_blocks} tail block(s); "
             f"method {cfg.adapters.method} on {', '.join(cfg.adapters.parts)}",
             f"- data: {r['train_examples']} train / {r['test_examples']} test examples, "
             f"{cfg.federation.clients} clients, {cfg.data.partition} partition"
             + (f" (alpha {cfg.data.alpha})" if cfg.data.partition == "dirichlet" else ""),
             f"- privacy defences on what leaves each client: {cfg.privacy.describe()} "
             "(what the trunk server can still rebuild: `silotune audit`)",
             f"- budget: batch {cfg.train.batch_size}, {fed['rounds']} rounds of {cfg.federation.local_steps} "
             f"local steps per client; seed {cfg.train.seed}", "",
             "## Federated split vs centralized", "",
             "| run | score | train examples | optimizer steps | train time |", "|---|---|---|---|---|",
             f"| federated split ({cfg.federation.schedule}) | {score_line(fed['metrics'])} | {fed['examples']} | "
             f"{fed['steps']} client steps | {fed['train_seconds']:.1f} s |"]
    if cen:
        lines.append(f"| centralized | {score_line(cen['metrics'])} | {cen['examples']} | {cen['steps']} | "
                     f"{cen['train_seconds']:.1f} s |")
        if "accuracy" in fed["metrics"]:
            gap = 100 * (fed["metrics"]["accuracy"] - cen["metrics"]["accuracy"])
            lines += ["", f"Federated minus centralized accuracy: {gap:+.2f} points."]
    lines += ["", "## Per client", "",
              "| client | examples | label counts | steps | final loss | bytes up | bytes down |",
              "|---|---|---|---|---|---|---|"]
    for c in fed["clients"]:
        labels = ", ".join(f"{k}: {v}" for k, v in c["label_counts"].items()) or "-"
        lines.append(f"| {c['client']} | {c['examples']} | {labels} | {c['steps']} | {c['final_loss']:.4f} | "
                     f"{_mb(c['bytes_up'])} | {_mb(c['bytes_down'])} |")
    lines += ["", "## Wire", "",
              f"Bytes that crossed the wire per client training step (up + down, {cfg.federation.wire_dtype}): "
              f"{_mb(fed['bytes_per_step'])} (activations, gradients and the FedAvg traffic, which is spread "
              "over the steps; evaluation traffic is not counted).", ""]
    if loss_plot:
        lines += ["![loss curves](loss.png)", ""]
    return "\n".join(lines)


@functools.cache
def pyplot():
    """matplotlib's pyplot on its file-only Agg backend, or None when matplotlib is not installed
    (logged once: plots are an extra, ``pip install 'silotune[plot]'``)."""
    try:
        import matplotlib
    except ImportError:
        log.warning("matplotlib is not installed: plots are skipped (pip install 'silotune[plot]' to draw them)")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(r: dict, path: Path) -> bool:
    """Draw the loss curves into ``path``; False (nothing written) without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False

    def smooth(xs, k=20):
        return [sum(xs[max(0, i - k + 1): i + 1]) / len(xs[max(0, i - k + 1): i + 1]) for i in range(len(xs))]

    fig, ax = plt.subplots(figsize=(7, 4))
    fed = r["federated"]["curve"]
    ax.plot([(i + 1) * r["plan"]["centralized_steps"] / len(fed) for i in range(len(fed))], smooth(fed),
            label="federated split (all clients)")
    if "centralized" in r:
        cen = r["centralized"]["curve"]
        ax.plot(range(1, len(cen) + 1), smooth(cen), label="centralized")
    ax.set_xlabel("training steps (same examples seen)")
    ax.set_ylabel("train loss (moving average)")
    ax.set_title(f"{r['task']}: training loss")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return True


def write_run(cfg: RunConfig, r: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    atomic_write(out / "metrics.json", json.dumps({**public(r), "machine": machine()}, indent=2))
    plotted = plot(r, out / "loss.png")
    atomic_write(out / "report.md", markdown(cfg, r, loss_plot=plotted))
    server, clients = r["federated"]["_parties"]
    atomic_write(out / "adapters" / "federated.safetensors",
                 adapters_blob([clients[0].head, server.trunk, clients[0].tail], cfg.adapters.method, cfg))
    if "centralized" in r:
        atomic_write(out / "adapters" / "centralized.safetensors",
                     adapters_blob([r["centralized"]["_model"]], cfg.adapters.method, cfg))
