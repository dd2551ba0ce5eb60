"""The embedded default model: a tiny Llama-architecture model built locally, no download.

`ensure_tiny_model(preset)` returns a Hugging Face-format directory (config.json,
model.safetensors, tokenizer.json with a chat template, generation_config.json) that vLLM
loads like any other local model. Weights are random but deterministic by seed; the
tokenizer is a byte-level BPE trained on the spot on a deterministic generated corpus, so
any text tokenizes. The directory is built once into a cache folder and reused; building
goes to a temporary sibling first and is renamed into place, so a crash never leaves a
half-written model behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

_WORDS = (
    "the of and to in is was for on that with as by at from his her it an were are which "
    "this be or has had not but also first one their its new after who they have two been "
    "she he more all other can into time when than during there may some would only over "
    "most such where between these about three through model token cache prefill decode "
    "request server cluster memory latency throughput batch layer attention transfer block "
    "router queue worker engine sample prompt output input length rate goodput serving "
    "python code function return value list dict import class def print if else while "
    "network bandwidth node instance pool scale user system assistant question answer "
    "data file path config error result test water river city mountain music history "
    "science light color number world people year day night small large fast slow good"
).split()


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of an embedded model. `small` makes prefill interference visible on a CPU."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int = 2048
    max_position_embeddings: int = 4096
    initializer_range: float = 0.08  # peaked logits: greedy argmax is robust to fp noise
    seed: int = 0


PRESETS: dict[str, TinyModelSpec] = {
    # ~0.8 M parameters: engine tests, CI, the default `pdserve serve`.
    "tiny": TinyModelSpec(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2),
    # ~78 M parameters: a 1k-token prefill takes ~0.5 s on one core here.
    "small": TinyModelSpec(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                           num_attention_heads=12, num_key_value_heads=4),
}


def default_cache_dir() -> Path:
    env = os.environ.get("PDSERVE_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pdserve"


def _spec_digest(spec: TinyModelSpec) -> str:
    payload = json.dumps(asdict(spec), sort_keys=True) + CHAT_TEMPLATE
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def _corpus(seed: int, num_lines: int = 4000) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(num_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 18))]
        sentence = " ".join(words).capitalize() + rng.choice([".", "?", "!", ",", ":"])
        if rng.random() < 0.2:
            sentence += f" {rng.randint(0, 9999)}"
        lines.append(sentence)
    return lines


def _build_tokenizer(spec: TinyModelSpec, out_dir: Path) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(spec.seed), trainer=trainer)
    bos_id = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="</s>",
        additional_special_tokens=SPECIAL_TOKENS[2:],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return len(fast)


def _build_weights(spec: TinyModelSpec, vocab_size: int, out_dir: Path) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        initializer_range=spec.initializer_range,
        tie_word_embeddings=False,
        bos_token_id=SPECIAL_TOKENS.index("<s>"),
        eos_token_id=SPECIAL_TOKENS.index("</s>"),
        torch_dtype="float32",
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(out_dir, safe_serialization=True)
    GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=[SPECIAL_TOKENS.index("</s>"), SPECIAL_TOKENS.index("<|end|>")],
    ).save_pretrained(out_dir)


def build_tiny_model(spec: TinyModelSpec, out_dir: Path) -> Path:
    """Write the model described by `spec` into `out_dir` (created)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_size = _build_tokenizer(spec, out_dir)
    _build_weights(spec, vocab_size, out_dir)
    (out_dir / "pdserve-tiny-model.json").write_text(json.dumps(asdict(spec), indent=2))
    return out_dir


def ensure_tiny_model(preset: str = "tiny", cache_dir: Path | None = None) -> Path:
    """Return the cached directory of an embedded model, building it on first use."""
    if preset not in PRESETS:
        raise ValueError(f"unknown embedded model {preset!r}; choose one of {sorted(PRESETS)}")
    spec = PRESETS[preset]
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / "models" / f"pdserve-{preset}-{_spec_digest(spec)}"
    if (target / "pdserve-tiny-model.json").exists():
        return target
    root.joinpath("models").mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build_tiny_model(spec, staging)
        try:
            staging.rename(target)
        except OSError:
            # Another process finished the same build first; theirs is identical.
            if not (target / "pdserve-tiny-model.json").exists():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target
