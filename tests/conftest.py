"""Shared fixtures: tiny random models of each architecture and the real SmolLM2 export."""

import logging
import os

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # keep gRPC's C-core notices out of the test log

import pytest
import transformers

from silotune.models.loading import resolve_model
from silotune.models.tiny import save_tiny_model

transformers.logging.set_verbosity_error()
logging.getLogger("transformers").setLevel(logging.ERROR)

ARCHS = ["llama", "mistral", "qwen2", "gpt2"]


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """{model_type: dir} of tiny random models (untied for llama-family, tied for gpt2 and qwen2)."""
    root = tmp_path_factory.mktemp("tiny")
    return {arch: save_tiny_model(root / arch, arch, seed=1, tie=arch in ("gpt2", "qwen2")) for arch in ARCHS}


@pytest.fixture(scope="session")
def smollm2_dir():
    return resolve_model("smollm2")


@pytest.fixture(scope="session")
def tiny_chat_dir(tmp_path_factory, smollm2_dir):
    """A tiny llama with the real SmolLM2 tokenizer: fast end-to-end runs on real text."""
    return save_tiny_model(tmp_path_factory.mktemp("tinychat") / "m", "llama", seed=2,
                           tokenizer_from=smollm2_dir)
