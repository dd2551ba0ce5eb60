"""Fixtures of the planner tests: the shared reference data (skipped when absent) and a
small synthetic profile + model that need no external file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"

# Round numbers so closed forms are easy to write down (all ms).
SYNTHETIC_PROFILE = {
    "test/tiny": {
        "1": {"prefill": [10.0, 0.1, 1e-5], "decoding_smallbs": [8.0, 0.001, 0.2],
              "decoding_largebs": [6.0, 0.001, 0.3], "decoding_large_small_bs_threshold": 95,
              "hardware": "test-gpu"},
        "2": {"prefill": [8.0, 0.05, 5e-6], "decoding_smallbs": [6.0, 0.0005, 0.15],
              "decoding_largebs": [5.0, 0.0005, 0.2], "decoding_large_small_bs_threshold": 95},
    }
}

# A small Llama-style model: 8 layers, GQA (8 query / 4 KV heads), fp16.
TINY_CONFIG = {
    "model_type": "llama", "num_hidden_layers": 8, "num_attention_heads": 8,
    "num_key_value_heads": 4, "hidden_size": 1024, "intermediate_size": 2816,
    "vocab_size": 32000, "torch_dtype": "float16", "hidden_act": "silu",
    "tie_word_embeddings": False,
}


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "profiler-a100-80g.distserve.json").is_file():
        pytest.skip(f"reference data not found at {SHARED_DATA} (../shared/data of the repo)")
    return SHARED_DATA


@pytest.fixture
def synthetic_profile_path(tmp_path: Path) -> Path:
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(SYNTHETIC_PROFILE))
    return path


@pytest.fixture
def tiny_model_dir(tmp_path: Path) -> Path:
    model = tmp_path / "tiny-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(TINY_CONFIG))
    return model
