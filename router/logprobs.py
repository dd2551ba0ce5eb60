"""Logprobs in the two formats vLLM's OpenAI server writes (chat and completions)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cluster.wire import TokenLogprob

_MIN_LOGPROB = -9999.0  # what OpenAI (and vLLM) send instead of -inf


def _position(entry: TokenLogprob) -> list[tuple[int, float]]:
    """One position as vLLM's logprob dict orders it: the sampled token first, then the
    top alternatives by rank, each token once."""
    items = {entry.token_id: entry.logprob}
    for token_id, logprob in entry.top:
        items.setdefault(token_id, logprob)
    return list(items.items())


class LogprobFormatter:
    """Turns engine logprobs into the response's ``logprobs`` objects."""

    def __init__(self, decode: Callable[[list[int]], str], num_top: int, tokens_as_ids: bool):
        self._decode = decode  # ids -> text, special tokens kept
        self.num_top = num_top
        self._as_ids = tokens_as_ids
        self._context: list[int] = []  # the sampled ids so far (one request, in order)

    def _text(self, token_id: int) -> str:
        if self._as_ids:
            return f"token_id:{token_id}"
        text = self._decode([token_id])
        return self._completed(token_id) if text.endswith("\ufffd") else text

    def _completed(self, token_id: int) -> str:
        """A token that ends inside a multi-byte character, written as vLLM writes it: the
        text it completes together with up to 4 previous sampled tokens (those showed as
        ""), or "" while the character is still incomplete."""
        context = self._context[-4:]
        for n in range(1, len(context) + 1):
            tail = context[-n:]
            full = self._decode(tail + [token_id])
            if full.endswith("\ufffd"):
                continue
            clean_end = len(tail)
            for j in range(len(tail) - 1, -1, -1):
                if self._decode([tail[j]]).endswith("\ufffd"):
                    clean_end = j
                else:
                    break
            prefix = self._decode(tail[:clean_end]) if clean_end > 0 else ""
            if full.startswith(prefix):
                return full[len(prefix):]
            common = 0
            for a, b in zip(prefix, full):
                if a != b:
                    break
                common += 1
            return full[common:]
        return ""

    def _advance(self, entry: TokenLogprob) -> None:
        self._context.append(entry.token_id)
        del self._context[:-4]

    def chat(self, entries: list[TokenLogprob]) -> dict[str, Any]:
        content = []
        for entry in entries:
            token = self._text(entry.token_id)
            top = []
            for i, (token_id, logprob) in enumerate(_position(entry)):
                if self.num_top != -1 and i >= self.num_top:
                    break
                alt = self._text(token_id)
                top.append({"token": alt, "logprob": max(logprob, _MIN_LOGPROB),
                            "bytes": list(alt.encode("utf-8", errors="replace"))})
            content.append({"token": token, "logprob": max(entry.logprob, _MIN_LOGPROB),
                            "bytes": list(token.encode("utf-8", errors="replace")),
                            "top_logprobs": top})
            self._advance(entry)
        return {"content": content}

    def completion(self, entries: list[TokenLogprob], initial_text_offset: int = 0) -> dict[str, Any]:
        tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
        offset = initial_text_offset
        for entry in entries:
            token = self._text(entry.token_id)
            tokens.append(token)
            token_logprobs.append(max(entry.logprob, _MIN_LOGPROB))
            # The sampled token plus `num_top` alternatives (OpenAI's "top k + 1").
            top_logprobs.append({
                self._text(token_id): max(logprob, _MIN_LOGPROB)
                for i, (token_id, logprob) in enumerate(_position(entry))
                if self.num_top == -1 or i <= self.num_top})
            offsets.append(offset)
            offset += len(token)
            self._advance(entry)
        return {"text_offset": offsets, "token_logprobs": token_logprobs, "tokens": tokens,
                "top_logprobs": top_logprobs}
