"""Fixtures shared by the Hugging Face test modules: a tokenizer and tiny saved models."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def tokenizer():
    from tiny_hf import make_tokenizer

    return make_tokenizer()


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model_dir(request, tmp_path_factory, tokenizer):
    from tiny_hf import save_tiny

    return save_tiny(request.param, tokenizer, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, tokenizer):
    from tiny_hf import save_tiny

    return save_tiny("gpt2", tokenizer, tmp_path_factory.mktemp("gpt2_only"))
