"""Model shape facts the planner needs: KV bytes per token, weight bytes, memory fit.

A shape comes from a local Hugging Face `config.json` or from a named reference model
(OPT-13B/66B/175B, the models of the reference profiles). Capacity of one instance
(tp GPUs x pp stages) in KV tokens:

    per GPU:  usable = gpu_memory_bytes * memory_utilization - weights_bytes / (tp*pp)
              token_bytes = 2 (K and V) * (layers/pp) * ceil(kv_heads/tp) * head_dim * dtype_bytes
    capacity = floor(usable / (token_bytes * block_size)) * block_size      (0: does not fit)

This is DistServe's `max_num_tokens.csv` formula with the utilisation vLLM is given; a
table in that CSV format can override it (`load_capacity_table`).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "half": 2, "float32": 4, "float": 4, "float8": 1}


class ModelShapeError(ValueError):
    """A model that cannot be resolved to a shape."""


class ModelShape(BaseModel):
    """The architecture numbers memory and KV size depend on."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Model name (profile key) or local directory.")
    num_layers: int = Field(gt=0, description="Transformer layers.")
    num_attention_heads: int = Field(gt=0, description="Query heads.")
    num_key_value_heads: int = Field(gt=0, description="KV heads (< query heads with GQA/MQA).")
    hidden_size: int = Field(gt=0, description="Model width.")
    head_dim: int = Field(gt=0, description="Per-head width; hidden/heads unless the config says.")
    intermediate_size: int = Field(gt=0, description="MLP width.")
    vocab_size: int = Field(gt=0, description="Vocabulary size.")
    is_gated_mlp: bool = Field(False, description="SwiGLU-style MLP (three matrices, not two).")
    tie_word_embeddings: bool = Field(True, description="LM head shares the embedding matrix.")
    dtype_bytes: int = Field(2, gt=0, description="Bytes per weight and KV element.")
    weights_bytes_override: int | None = Field(
        None, gt=0, description="Measured weight bytes (e.g. sum of safetensors files)."
    )

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token across all layers."""
        return 2 * self.num_layers * self.num_key_value_heads * self.head_dim * self.dtype_bytes

    @property
    def weights_bytes(self) -> int:
        if self.weights_bytes_override is not None:
            return self.weights_bytes_override
        h = self.hidden_size
        q_and_o = 2 * h * self.num_attention_heads * self.head_dim
        k_and_v = 2 * h * self.num_key_value_heads * self.head_dim
        mlp = (3 if self.is_gated_mlp else 2) * h * self.intermediate_size
        embeddings = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return (self.num_layers * (q_and_o + k_and_v + mlp) + embeddings) * self.dtype_bytes


def _opt(name: str, layers: int, heads: int, hidden: int) -> ModelShape:
    return ModelShape(
        name=name, num_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        hidden_size=hidden, head_dim=hidden // heads, intermediate_size=4 * hidden,
        vocab_size=50272,
    )


# Shapes of the models in the reference profiles (shared/data/README.md), fp16.
REFERENCE_MODELS: dict[str, ModelShape] = {
    "facebook/opt-13b": _opt("facebook/opt-13b", 40, 40, 5120),
    "facebook/opt-66b": _opt("facebook/opt-66b", 64, 72, 9216),
    "facebook/opt-175b": _opt("facebook/opt-175b", 96, 96, 12288),
}

_GATED_TYPES = {"llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"}


def _first(config: dict, *keys: str) -> object | None:
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    return None


def shape_from_hf_config(config: dict, name: str, weights_bytes: int | None = None) -> ModelShape:
    """Shape from a decoded `config.json` (Llama, OPT, GPT-2 style key names)."""
    layers = _first(config, "num_hidden_layers", "n_layer", "num_layers")
    heads = _first(config, "num_attention_heads", "n_head")
    hidden = _first(config, "hidden_size", "n_embd", "d_model")
    missing = [k for k, v in (("num_hidden_layers", layers), ("num_attention_heads", heads),
                              ("hidden_size", hidden)) if v is None]
    if missing:
        raise ModelShapeError(f"config.json of {name} lacks {', '.join(missing)}")
    try:
        layers, heads, hidden = int(layers), int(heads), int(hidden)
        kv_heads = int(_first(config, "num_key_value_heads", "num_kv_heads") or heads)
        head_dim = int(config.get("head_dim") or hidden // heads)
        ffn = int(_first(config, "intermediate_size", "ffn_dim", "n_inner") or 4 * hidden)
        vocab = int(config.get("vocab_size") or 32000)
    except (TypeError, ValueError) as e:
        raise ModelShapeError(f"config.json of {name} has a non-integer shape field: {e}") from None
    dtype = str(_first(config, "torch_dtype", "dtype") or "float16").replace("torch.", "")
    if dtype not in DTYPE_BYTES:
        raise ModelShapeError(f"config.json of {name}: unsupported dtype {dtype!r}")
    model_type = str(config.get("model_type", ""))
    try:
        return ModelShape(
            name=name, num_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
            hidden_size=hidden, head_dim=head_dim, intermediate_size=ffn, vocab_size=vocab,
            is_gated_mlp=model_type in _GATED_TYPES or config.get("hidden_act") == "silu",
            tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),
            dtype_bytes=DTYPE_BYTES[dtype], weights_bytes_override=weights_bytes,
        )
    except ValueError as e:
        raise ModelShapeError(f"config.json of {name}: {e}") from None


def load_model_shape(name_or_path: str) -> ModelShape:
    """A named reference model, or a local directory holding `config.json`.

    Weight bytes of a local model are the size of its `*.safetensors` files when present
    (exact), otherwise estimated from the shape.
    """
    path = Path(name_or_path)
    if path.is_dir():
        config_path = path / "config.json"
        try:
            config = json.loads(config_path.read_text())
        except FileNotFoundError:
            raise ModelShapeError(f"model directory {path} has no config.json") from None
        except (OSError, json.JSONDecodeError) as e:
            raise ModelShapeError(f"cannot read {config_path}: {e}") from None
        if not isinstance(config, dict):
            raise ModelShapeError(f"{config_path} must hold a JSON object")
        weight_files = list(path.glob("*.safetensors"))
        weights = sum(f.stat().st_size for f in weight_files) if weight_files else None
        return shape_from_hf_config(config, str(path), weights or None)
    if name_or_path in REFERENCE_MODELS:
        return REFERENCE_MODELS[name_or_path]
    raise ModelShapeError(
        f"model {name_or_path!r} is neither a directory with config.json nor a reference "
        f"model ({', '.join(sorted(REFERENCE_MODELS))})"
    )


def kv_capacity_tokens(
    shape: ModelShape,
    tp: int,
    pp: int,
    gpu_memory_bytes: float,
    memory_utilization: float = 0.9,
    block_size: int = 16,
) -> int:
    """KV-cache tokens one instance holds; 0 when the weights alone do not fit."""
    usable = gpu_memory_bytes * memory_utilization - shape.weights_bytes / (tp * pp)
    layers_per_stage = math.ceil(shape.num_layers / pp)
    heads_per_gpu = math.ceil(shape.num_key_value_heads / tp)  # KV heads replicate when tp > kv heads
    token_bytes = 2 * layers_per_stage * heads_per_gpu * shape.head_dim * shape.dtype_bytes
    if usable <= 0:
        return 0
    return int(usable // (token_bytes * block_size)) * block_size


def load_capacity_table(path: Path | str, model: str) -> dict[tuple[int, int], int]:
    """`{(tp, pp): max_num_tokens}` of one model from a `model,tp,pp,max_num_tokens` CSV.

    A (tp, pp) pair absent from the table means the model does not fit there.
    """
    path = Path(path)
    table: dict[tuple[int, int], int] = {}
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            needed = {"model", "tp", "pp", "max_num_tokens"}
            if reader.fieldnames is None or not needed <= set(reader.fieldnames):
                raise ModelShapeError(f"capacity table {path} needs columns {sorted(needed)}")
            for line, row in enumerate(reader, start=2):
                if row["model"] != model:
                    continue
                try:
                    table[(int(row["tp"]), int(row["pp"]))] = int(row["max_num_tokens"])
                except ValueError:
                    raise ModelShapeError(f"capacity table {path} line {line}: not an integer") from None
    except FileNotFoundError:
        raise ModelShapeError(f"capacity table not found: {path}") from None
    except OSError as e:
        raise ModelShapeError(f"cannot read capacity table {path}: {e}") from None
    if not table:
        raise ModelShapeError(f"capacity table {path} has no rows for model {model!r}")
    return table
