"""Turn a run's trained adapters into standard artefacts: a PEFT adapter folder or a merged model.

Sources. A ``silotune simulate`` run folder (``adapters/federated.safetensors``, or
``centralized.safetensors`` for the baseline), or a deployment's output folder assembled for one
client: ``client-ID/adapters.safetensors`` (its head and tail) plus ``server/trunk.safetensors``
(the trunk's adapters), which the server must have marked releasable (``deploy.release_trunk_adapters``).
The adapters' settings come from the files' own metadata record (``report.adapter_record``), else
from the run's ``config.yaml`` (or ``--config``) for files written before the record existed.

Formats.

- ``peft``: LoRA as a standard ``LoraConfig`` + weights (``layers_to_transform`` = the adapted
  blocks), P-tuning v2 prefixes as a ``PrefixTuningConfig`` with ``num_virtual_tokens`` = the prefix
  length; both written by peft's own ``save_pretrained``, so ``PeftModel.from_pretrained`` loads them.
  SPF's sparse row deltas have no PEFT counterpart: refused, ``merged`` holds them.
- ``merged``: the base model with SPF deltas (``merge_spf``) and LoRA (peft's ``merge_and_unload``)
  folded into its weights, plus its tokenizer: a plain Hugging Face model folder. Prefixes are extra
  attention key/value slots, not weights, so no merged model can hold them: refused.

Prefix positions. SiloTune's tokens take positions 0..T-1 after the prefix slots; PEFT's prefix
tuning numbers them P..P+T-1. Rotary attention is relative: a query at position P + i scores a
prefix key k rotated by position P exactly as a query at i scores k, so the exported keys are
pre-rotated by P (values unchanged) and PEFT computes SiloTune's logits. A learned absolute position
embedding (GPT-2) has no such identity: its prefixes are refused, saying why.

Every export is checked to be complete: each adapter tensor of the adapted blocks gets its trained
value from the files (no randomly initialised leftovers) and every tensor in the files finds its place.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ConfigError, ModelError
from .report import ADAPTERS_FORMAT, RECORD_KEY, RECORD_VERSION, RELEASABLE_KEY, adapter_record

FORMATS = ("peft", "merged")
WHICH = ("federated", "centralized")
PROVENANCE = "silotune-export.json"
CONSENT_KEY = "deploy.release_trunk_adapters"
# what must agree between a deployment's client file and its trunk file (the model path may differ per machine)
_SAME_RUN = ("method", "parts", "layers", "split", "model_type", "num_layers", "lora", "spf", "prefix")
# rotary scalings whose frequencies depend on the sequence length: a shift of the positions changes them
_LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


@dataclass
class Adapters:
    """Trained tensors (names of the full model), the record of how they were trained, and their files."""

    tensors: dict[str, torch.Tensor]
    record: dict
    files: list[Path]

    def where(self) -> str:
        return " + ".join(map(str, self.files))


# ---- reading the source ----
def read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a SiloTune adapters file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise ModelError(f"{path}: cannot read adapters ({str(exc).splitlines()[0]})") from None
    if metadata.get("format") != ADAPTERS_FORMAT:
        raise ModelError(f"{path}: not a SiloTune adapters file (metadata format {metadata.get('format')!r})")
    return tensors, metadata


def record_of(path: Path, metadata: dict[str, str], config: Path | None) -> dict:
    """The file's adapter record, or one rebuilt from the run config for files written without it."""
    if RECORD_KEY in metadata:
        try:
            record = json.loads(metadata[RECORD_KEY])
        except json.JSONDecodeError:
            raise ModelError(f"{path}: malformed '{RECORD_KEY}' metadata (not JSON)") from None
        if record.get("version", 1) > RECORD_VERSION:
            raise ModelError(f"{path}: adapters record version {record['version']} is newer than this SiloTune "
                             f"reads ({RECORD_VERSION}): update SiloTune")
        return record
    if config is None or not Path(config).is_file():
        raise ConfigError(f"{path} does not record its adapters' settings (written by an older SiloTune): "
                          "give the run's config with --config FILE")
    from .config import load_config
    from .models.loading import resolve_model
    from .models.partition import load_config as model_config

    cfg = load_config(config)
    record = adapter_record(cfg, model_config(resolve_model(cfg.model)))
    if record["method"] != metadata.get("method"):
        raise ConfigError(f"{config}: adapters.method is {record['method']!r}, but {path} holds "
                          f"{metadata.get('method')!r} adapters")
    return record


def read_run(run_dir: Path, which: str, config: Path | None) -> Adapters:
    """A simulation run folder's federated (or centralized) adapters."""
    if which not in WHICH:
        raise ConfigError(f"--which: expected one of {', '.join(WHICH)}, got {which!r}")
    path = run_dir / "adapters" / f"{which}.safetensors"
    if not path.is_file():
        if (run_dir / "server").is_dir() or any(run_dir.glob("client-*")):
            raise ConfigError(f"{run_dir}: a deployment's output folder: name the client whose model to "
                              "assemble with --client ID")
        hint = " (the run skipped the centralized baseline)" if which == "centralized" and \
            (run_dir / "adapters").is_dir() else ""
        raise ConfigError(f"{path} not found: {run_dir} is not a 'silotune simulate' run folder{hint}")
    tensors, metadata = read_file(path)
    return Adapters(tensors, record_of(path, metadata, config or run_dir / "config.yaml"), [path])


def trunk_file(output: Path, client: int) -> Path:
    """The server's trunk adapters file of a deployment (a hierarchical one: the client's replica's)."""
    server = folder = output / "server"
    replicas = sorted(server.glob("replica-*"))
    if replicas and not any((server / name).exists() for name in ("trunk.safetensors", "trunk.sealed")):
        folder = server / f"replica-{client % len(replicas)}"  # the replica that served this client
    if (folder / "trunk.sealed").is_file() and not (folder / "trunk.safetensors").is_file():
        raise ConfigError(f"{folder / 'trunk.sealed'}: the trunk adapters are sealed to the server's enclave "
                          "(tee.release_trunk: false): nothing outside that enclave can read them, so no model "
                          "can be assembled; the server must train with tee.release_trunk: true and "
                          f"{CONSENT_KEY}: true")
    path = folder / "trunk.safetensors"
    if not path.is_file():
        raise ConfigError(f"{path} not found: {output} holds no trunk adapters from a finished server "
                          "(the client's model needs them: its trunk blocks were trained)")
    return path


def read_deployment(output: Path, client: int, config: Path | None) -> Adapters:
    """One client's head and tail adapters plus the server's released trunk adapters."""
    path = output / f"client-{client}" / "adapters.safetensors"
    if not path.is_file():
        raise ConfigError(f"{path} not found: no adapters of client {client} in {output}")
    tensors, metadata = read_file(path)
    adapters = Adapters(tensors, record_of(path, metadata, config), [path])
    if "trunk" not in adapters.record["parts"]:
        return adapters  # a frozen trunk: the client's file is the whole of what was trained
    trunk_path = trunk_file(output, client)
    trunk, trunk_meta = read_file(trunk_path)
    if trunk_meta.get(RELEASABLE_KEY) != "true":
        raise ConfigError(f"{trunk_path}: the server has not released its trunk adapters for export (its config "
                          f"must set {CONSENT_KEY}: true before it writes them)")
    trunk_record = record_of(trunk_path, trunk_meta, config)
    differ = [k for k in _SAME_RUN if trunk_record.get(k) != adapters.record.get(k)]
    if differ:
        raise ConfigError(f"{trunk_path} and {path} come from different runs ({differ[0]} differs)")
    adapters.tensors.update(trunk)
    adapters.files.append(trunk_path)
    return adapters


def read_source(source: Path, which: str = "federated", client: int | None = None,
                config: Path | None = None) -> Adapters:
    """The adapters to export: a simulation run's, or a deployment's assembled for ``client``."""
    if not source.is_dir():
        raise ConfigError(f"{source}: not a run folder (expected a 'silotune simulate' output folder, or a "
                          "deployment's output folder with --client ID)")
    if client is not None:
        if which != "federated":
            raise ConfigError("--which picks a simulation run's adapters: a deployment (--client) has no "
                              "centralized baseline")
        return read_deployment(source, client, config)
    return read_run(source, which, config)


# ---- the base model ----
def base_model_dir(record: dict, base: str | None) -> Path:
    """The base model the adapters were trained on (``base`` overrides the recorded one), checked."""
    from .models.arch import num_layers
    from .models.loading import resolve_model
    from .models.partition import load_config

    recorded = record.get("model_path")
    if base is not None:
        model_dir = resolve_model(base)
    elif recorded and (Path(recorded) / "config.json").is_file():
        model_dir = Path(recorded)
    else:
        try:
            model_dir = resolve_model(record["model"])
        except ModelError as exc:
            raise ModelError(f"{exc} (the adapters' base model: give it with --base DIR)") from None
    config = load_config(model_dir)
    if (config.model_type, num_layers(config)) != (record["model_type"], record["num_layers"]):
        raise ModelError(f"{model_dir}: a {config.model_type} model with {num_layers(config)} blocks, but the adapters "
                         f"were trained on a {record['model_type']} model with {record['num_layers']} blocks")
    return model_dir.resolve()


def load_base(model_dir: Path):
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{model_dir}: cannot load the base model ({str(exc).splitlines()[0]})") from None
    return model.eval()


# ---- LoRA and SPF ----
def lora_config(record: dict, spec):
    from peft import LoraConfig

    lora = record["lora"]
    return LoraConfig(task_type="CAUSAL_LM", r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                      target_modules=list(lora["targets"]), fan_in_fan_out=lora["fan_in_fan_out"], bias="none",
                      layers_to_transform=list(record["layers"]), layers_pattern=spec.blocks.rsplit(".", 1)[-1])


def _is_adapter(name: str) -> bool:
    from .adapters.spf import DELTA

    return "lora_" in name or name.endswith(DELTA)


def load_trained(stages, adapters: Adapters) -> None:
    """Copy the trained tensors into the adapted stage (or the split's stages, a list: each takes its own), refusing
    any tensor that has no place in them and any adapter tensor of theirs that the files leave without a value."""
    from .adapters import load_trainable_state
    from .adapters.spf import ROWS

    stages = stages if isinstance(stages, (list, tuple)) else [stages]
    local, expected = {}, set()
    for k, stage in enumerate(stages):
        local.update({stage.full_name(n): (k, n, t) for n, t in [*stage.named_parameters(), *stage.named_buffers()]})
        expected |= {stage.full_name(n) for n, _ in stage.named_parameters() if _is_adapter(n)}
    for name, value in adapters.tensors.items():
        if name not in local or not (name.endswith(ROWS) or name in expected):
            raise ModelError(f"{adapters.where()}: {name} has no place in the adapted base model "
                             f"({adapters.record['method']} on blocks {_blocks(adapters.record.get('layers', []))})")
        if tuple(value.shape) != tuple(local[name][2].shape):
            raise ModelError(f"{adapters.where()}: {name} has shape {tuple(value.shape)}, the model's is "
                             f"{tuple(local[name][2].shape)}")
    missing = sorted(expected - set(adapters.tensors))
    if missing:
        raise ModelError(_missing_message(adapters, missing, stages[0].spec.blocks))
    for k, stage in enumerate(stages):
        load_trainable_state(stage, {local[name][1]: v for name, v in adapters.tensors.items() if local[name][0] == k})

def _blocks(layers) -> str:
    layers = sorted(layers)
    return f"{layers[0]}..{layers[-1]}" if layers and layers == list(range(layers[0], layers[-1] + 1)) \
        else ", ".join(map(str, layers))


def _missing_message(adapters: Adapters, missing: list[str], blocks_path: str) -> str:
    blocks = sorted({int(n[len(blocks_path) + 1:].split(".", 1)[0]) for n in missing
                     if n.startswith(blocks_path + ".")})
    split = adapters.record["split"]
    trunk = range(split["head_blocks"], adapters.record["num_layers"] - split["tail_blocks"])
    hint = " (the trunk's adapters are not there: a run whose enclave keeps them, tee.release_trunk: false, " \
        "leaves them out)" if blocks and all(i in trunk for i in blocks) else ""
    return (f"{adapters.where()}: no trained values for {len(missing)} adapter tensor(s) of blocks "
            f"{_blocks(blocks)}, e.g. {missing[0]}{hint}")


def adapted_model(adapters: Adapters, model_dir: Path):
    """The base model with the run's LoRA (a PeftModel) and SPF layers, holding the trained values."""
    from peft import PeftModel, get_peft_model

    from .adapters import SpfSettings, apply_spf
    from .models.arch import arch_for
    from .models.partition import stage_from_model

    record = adapters.record
    model = load_base(model_dir)
    spec = arch_for(model.config)
    if "lora" in record:
        model = get_peft_model(model, lora_config(record, spec))
    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    stage = stage_from_model(inner, "full")  # the whole model as one stage: SiloTune's names and SPF machinery
    if "spf" in record:  # on a LoRA layer SPF goes on its base layer, as in training: same names
        spf = record["spf"]
        apply_spf(stage, SpfSettings(ratio=spf["ratio"], targets=list(spf["targets"])), set(record["layers"]))
    load_trained(stage, adapters)
    return model


# ---- prefixes ----
def _rope_types(config) -> set[str]:
    found: set[str] = set()

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("rope_type"), str):
                found.add(node["rope_type"])
            for value in node.values():
                walk(value)

    walk(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    return found


def shift_keys(model, keys: torch.Tensor, length: int) -> torch.Tensor:
    """Prefix keys (L, heads, P, head_dim) as PEFT must hold them for its tokens, numbered from ``length``,
    to score as SiloTune's tokens, numbered from 0: rotated by position ``length`` (rotary models)."""
    from .models.arch import arch_for

    config, spec = model.config, arch_for(model.config)
    if spec.pos_embed:
        raise ConfigError(
            f"--format peft: {config.model_type} adds learned absolute position embeddings, and PEFT's prefix "
            f"tuning numbers the tokens from num_virtual_tokens ({length}) where SiloTune's P-tuning numbers them "
            "from 0: no PEFT prefix reproduces these prefixes (and prefixes are not weights: merged cannot hold "
            "them either)")
    if not spec.rotary:
        return keys
    bad = _rope_types(config) & set(_LENGTH_DEPENDENT_ROPE)
    apply = getattr(importlib.import_module(type(model).__module__), "apply_rotary_pos_emb", None)
    if bad or apply is None:
        why = f"its rope scaling {sorted(bad)[0]!r} depends on the sequence length" if bad \
            else "its modelling code has no apply_rotary_pos_emb"
        raise ConfigError(f"--format peft: {config.model_type}: PEFT's prefix tuning shifts the token positions by "
                          f"num_virtual_tokens and {why}, so the shift cannot be compensated exactly")
    rotary = model.get_submodule(spec.rotary)
    position = torch.full((1, length), length)
    by_type = getattr(spec, "rotary_by_layer_type", False)  # one rope per attention type (Gemma 3)
    kinds = getattr(config, "layer_types", None) or [None] * keys.shape[0]
    rotated = []
    for i in range(keys.shape[0]):
        cos, sin = rotary(keys, position, kinds[i]) if by_type else rotary(keys, position)
        scale = torch.sqrt(cos * cos + sin * sin)  # attention scaling (YaRN's mscale, ...): keep the rotation only
        rotated.append(apply(keys[i: i + 1], keys[i: i + 1], cos / scale, sin / scale)[1][0])
    return torch.stack(rotated)


def prefix_table(adapters: Adapters, model) -> torch.Tensor:
    """The (P, layers * 2 * kv_heads * head_dim) table PEFT's prefix tuning holds: per virtual token,
    every layer's key then value, as ``PeftModel.get_prompt`` reads it back."""
    from .models.arch import attention_geometry

    record = adapters.record
    n, length = record["num_layers"], record["prefix"]["length"]
    names = [f"prefix.layers.{i}" for i in range(n)]
    unknown = sorted(set(adapters.tensors) - set(names))
    if unknown:
        raise ModelError(f"{adapters.where()}: {unknown[0]} is not a prefix of this {n}-block model")
    absent = [i for i in range(n) if names[i] not in adapters.tensors]
    if absent:
        trained = [i for i in range(n) if i not in absent]
        raise ConfigError(
            f"--format peft: PEFT's prefix tuning puts the same {length} virtual tokens on every layer, but this run "
            f"trained prefixes on blocks {_blocks(trained) if trained else 'none'} only (adapters.parts: "
            f"{', '.join(record['parts'])}; missing blocks {_blocks(absent)}), so it cannot be represented "
            "(and prefixes are not weights: merged cannot hold them either)")
    kv_heads, head_dim = attention_geometry(model.config)
    kv = torch.stack([adapters.tensors[k].float() for k in names])
    if tuple(kv.shape) != (n, 2, kv_heads, length, head_dim):
        raise ModelError(f"{adapters.where()}: prefixes of shape {tuple(kv.shape[1:])}, the model's are "
                         f"{(2, kv_heads, length, head_dim)}")
    kv = torch.stack([shift_keys(model, kv[:, 0], length), kv[:, 1]], dim=1)
    return kv.permute(3, 0, 1, 2, 4).reshape(length, -1)


def prefix_model(adapters: Adapters, model_dir: Path):
    """A PeftModel with PEFT prefix tuning holding the run's prefixes."""
    from peft import PrefixTuningConfig, get_peft_model

    model = load_base(model_dir)
    table = prefix_table(adapters, model)
    peft_model = get_peft_model(model, PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=adapters.record["prefix"]["length"]))
    embedding = peft_model.prompt_encoder[peft_model.active_adapter].embedding
    if embedding.weight.shape != table.shape:
        raise ModelError(f"--format peft: PEFT lays out this model's prefixes as {tuple(embedding.weight.shape)}, "
                         f"SiloTune's are {tuple(table.shape)}")
    with torch.no_grad():
        embedding.weight.copy_(table)
    return peft_model


# ---- writing ----
def check_format(method: str, fmt: str) -> None:
    """Refuse a method the format cannot hold, saying what can."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "peft" and "spf" in method:
        raise ConfigError(f"--format peft: {method} adapters include SPF's sparse row deltas of the base weights, "
                          "which PEFT cannot represent; export them with --format merged (base weights with every "
                          "adapter folded in)")
    if fmt == "merged" and method == "prefix":
        raise ConfigError("--format merged: prefixes are extra attention key/value slots, not weights, so no merged "
                          "model can hold them; export them with --format peft (PEFT prefix tuning)")


def write_peft(adapters: Adapters, model_dir: Path, out: Path) -> None:
    method = adapters.record["method"]
    model = prefix_model(adapters, model_dir) if method == "prefix" else adapted_model(adapters, model_dir)
    model.save_pretrained(str(out))


def write_merged(adapters: Adapters, model_dir: Path, out: Path) -> None:
    from peft import PeftModel

    from .adapters import merge_spf

    model = adapted_model(adapters, model_dir)
    merge_spf(model.get_base_model() if isinstance(model, PeftModel) else model)
    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    model.save_pretrained(str(out))
    copy_tokenizer(model_dir, out)


def copy_tokenizer(model_dir: Path, out: Path) -> bool:
    """The base model's tokenizer into ``out`` (False when the base has none, e.g. a tiny test model)."""
    from transformers import AutoTokenizer

    if not any((model_dir / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return False
    try:
        AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True).save_pretrained(str(out))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{model_dir}: cannot copy the tokenizer ({str(exc).splitlines()[0]})") from None
    return True


@contextmanager
def staged(out: Path, force: bool) -> Iterator[Path]:
    """A temporary folder next to ``out`` that replaces it when the export succeeded (removed if not)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise ConfigError(f"{out} exists: choose a new folder, or pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # an ordinary folder, not mkdtemp's private 0700
        if out.is_dir():
            shutil.rmtree(out)
        elif out.exists():
            out.unlink()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export(source: str | Path, out: str | Path, fmt: str = "peft", *, which: str = "federated",
           client: int | None = None, base: str | None = None, config: str | Path | None = None,
           force: bool = False) -> Path:
    """Export a run's adapters (or a deployment's, assembled for ``client``) to ``out`` in ``fmt``; returns ``out``.

    ``base`` replaces the recorded base model (another copy of the same weights); ``config`` is read only for
    adapters files that do not record their settings; ``force`` replaces an existing ``out``."""
    check_format("", fmt)
    source, out = Path(source), Path(out)
    if source.exists() and out.resolve() in (source.resolve(), *source.resolve().parents):
        raise ConfigError(f"--out {out}: would replace the run folder {source} itself")
    adapters = read_source(source, which, client, Path(config) if config else None)
    check_format(adapters.record["method"], fmt)
    model_dir = base_model_dir(adapters.record, base)
    with staged(out, force) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecation notices to peft, not to users
        (write_peft if fmt == "peft" else write_merged)(adapters, model_dir, tmp)
        provenance = {"format": fmt, "sources": [str(p.resolve()) for p in adapters.files],
                      "base_model": str(model_dir), "adapters": adapters.record}
        (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")
    return out


__all__ = ["FORMATS", "WHICH", "PROVENANCE", "CONSENT_KEY", "Adapters", "export", "check_format", "read_source",
           "read_file", "base_model_dir", "adapted_model", "prefix_model", "prefix_table", "shift_keys"]
