"""Shared fixtures: tiny random models of each architecture and the real SmolLM2 export."""

import logging
import os
import socket

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # keep gRPC's C-core notices out of the test log

import pytest
import transformers
import yaml

from silotune.deploy import make_keys
from silotune.models.loading import resolve_model
from silotune.models.tiny import save_tiny_model

transformers.logging.set_verbosity_error()
logging.getLogger("transformers").setLevel(logging.ERROR)

ARCHS = ["llama", "mistral", "qwen2", "gpt2"]
# the other families (tests/test_families.py), name: (model_type, config overrides, tied embedding); windows of 4
# tokens so that test sequences run past them
FAMILIES = {
    "qwen3": ("qwen3", {}, False),
    "qwen3-sliding": ("qwen3", dict(use_sliding_window=True, sliding_window=4, max_window_layers=2), False),
    "phi3": ("phi3", {}, False),
    "gemma2": ("gemma2", {}, True),
    "gemma3_text": ("gemma3_text", {}, True),
    "olmo2": ("olmo2", {}, False),
}


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """{model_type: dir} of tiny random models (untied for llama-family, tied for gpt2 and qwen2)."""
    root = tmp_path_factory.mktemp("tiny")
    return {arch: save_tiny_model(root / arch, arch, seed=1, tie=arch in ("gpt2", "qwen2")) for arch in ARCHS}


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    """{name: dir} of tiny random models of the FAMILIES."""
    from silotune.models.arch import PHI3, register

    register("phi3", PHI3)  # a test may have registered phi3 with other targets
    root = tmp_path_factory.mktemp("families")
    return {name: save_tiny_model(root / name, model_type, seed=1, tie=tie, **overrides)
            for name, (model_type, overrides, tie) in FAMILIES.items()}


@pytest.fixture(scope="session")
def smollm2_dir():
    return resolve_model("smollm2")


@pytest.fixture(scope="session")
def tiny_chat_dir(tmp_path_factory, smollm2_dir):
    """A tiny llama with the real SmolLM2 tokenizer: fast end-to-end runs on real text."""
    return save_tiny_model(tmp_path_factory.mktemp("tinychat") / "m", "llama", seed=2,
                           tokenizer_from=smollm2_dir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def deployment(tmp_path, tiny_chat_dir):
    keys = make_keys(tmp_path / "keys", 3, ["localhost", "127.0.0.1"])
    port = free_port()
    cfg = {"model": str(tiny_chat_dir), "split": {"head_blocks": 1, "tail_blocks": 1},
           "adapters": {"lora": {"r": 4}}, "optim": {"lr": 5.0e-3},
           "data": {"max_train": 48, "max_test": 8, "max_length": 48},
           "federation": {"clients": 3, "local_steps": 2, "wire_dtype": "fp32"},
           "train": {"steps": 12, "batch_size": 4},
           "deploy": {"keys": str(keys), "address": f"127.0.0.1:{port}", "client_timeout": 60.0,
                      "mutual_tls": True},
           "output": str(tmp_path / "net")}
    path = tmp_path / "deploy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, port
