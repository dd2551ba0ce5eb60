"""Prompts of an exact token count under the served model's tokenizer.

The contract: `PromptBuilder(tokenizer).build(n, rng)` returns text such that
`len(tokenizer(text).input_ids) == n`, counting the special tokens (BOS) the tokenizer
adds by default. The server tokenizes a `/v1/completions` prompt the same way, so the
engine prefills exactly n tokens.

How: draw random common words (a different sequence per request, so prefix caching
cannot share blocks between requests), encode them without special tokens, cut the ids
to the target body length, decode, re-count with special tokens, and move the cut by the
difference until the count is exact. Decoding then re-encoding a cut sequence can merge
or split tokens at the cut, hence the loop; a fresh word sequence is drawn when the loop
does not settle.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bench.errors import BenchError

# Common English words: single tokens in most BPE vocabularies, so n tokens need about
# n words and encoding stays cheap.
WORDS = (
    "the of and to in is was for on that with as by at from his her it an were are which "
    "this be or has had not but also first one their its new after who they have two been "
    "she he more all other can into time when than during there may some would only over "
    "most such where between these about three through people year day night water city "
    "music history science light color number world small large fast slow good long house "
    "work school state family group country problem hand part place case week company "
    "system program question government point home water room mother area money story fact "
    "month lot right study book eye job word business issue side kind head service friend "
    "father power hour game line end member law car name president team minute idea body "
    "information back parent face others level office door health person art war party "
    "result change morning reason research girl guy moment air teacher force education"
).split()

_MAX_ADJUST_STEPS = 12
_MAX_DRAWS = 8


class PromptBuilder:
    """Builds prompts of exact token counts; `tokenizer` is a Hugging Face tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        # Tokens the tokenizer adds around any text (BOS for Llama/OPT-style models).
        self.num_special_tokens = len(tokenizer("").input_ids)
        # The shortest prompt: the special tokens plus one real token (an empty prompt is
        # rejected by OpenAI-compatible servers).
        self.min_tokens = self.num_special_tokens + 1

    def count(self, text: str) -> int:
        """Tokens the server will prefill for `text`, special tokens included."""
        return len(self._tokenizer(text).input_ids)

    def build(self, num_tokens: int, rng: np.random.Generator) -> str:
        """Text that tokenizes to exactly `num_tokens` tokens (special tokens included)."""
        if num_tokens < self.min_tokens:
            raise BenchError(
                f"a prompt needs at least {self.min_tokens} tokens with this tokenizer, "
                f"{num_tokens} were asked for"
            )
        body_len = num_tokens - self.num_special_tokens
        for _ in range(_MAX_DRAWS):
            text = self._try_build(num_tokens, body_len, rng)
            if text is not None:
                return text
        raise BenchError(f"could not build a prompt of exactly {num_tokens} tokens")

    def _try_build(self, num_tokens: int, body_len: int, rng: np.random.Generator) -> str | None:
        num_words = body_len + 8
        while True:
            words = rng.choice(WORDS, size=num_words)
            body_ids = self._tokenizer(" ".join(words), add_special_tokens=False).input_ids
            if len(body_ids) >= body_len + 8:
                break
            num_words *= 2
        cut = body_len
        for _ in range(_MAX_ADJUST_STEPS):
            text = self._tokenizer.decode(
                body_ids[:cut], skip_special_tokens=True, clean_up_tokenization_spaces=False
            )
            error = self.count(text) - num_tokens
            if error == 0:
                return text
            cut = min(max(cut - error, 1), len(body_ids))
        return None
