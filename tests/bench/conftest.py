"""Shared fixtures of the benchmark tests."""

import pytest


@pytest.fixture(scope="session")
def tiny_model_path():
    from cluster.tiny_model import ensure_tiny_model

    return ensure_tiny_model("tiny")  # built once (~5 s), then cached


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path)
