"""Turns a request's output token ids into text deltas, applying stop strings.

Stop strings are the front end's job (as in vLLM v1): a stop string may span the prefill's
first token and decode's tokens, which neither engine sees whole. Text that could be the
start of a stop string is held back until it is known not to be one, so a client never
receives part of a stop string.
"""

from __future__ import annotations

from dataclasses import dataclass

from router.tokenizer import IncrementalDetokenizer


@dataclass
class TextDelta:
    text: str
    is_stopped: bool  # a stop string matched; the request must end here


class OutputText:
    def __init__(self, detokenizer: IncrementalDetokenizer, stop_strings: list[str],
                 include_stop_str: bool = False):
        self._detok = detokenizer
        self._stops = stop_strings
        self._include_stop_str = include_stop_str  # keep the matched stop string (vLLM option)
        self._hold = max((len(s) for s in stop_strings), default=1) - 1
        self._text = ""  # all text so far (up to a stop)
        self._emitted = 0  # chars of _text already returned
        self.token_ids: list[int] = []  # output ids up to and including a stop match
        self.is_stopped = False
        self.matched_stop: str | None = None  # the stop string that ended the text

    def add(self, token_ids: tuple[int, ...] | list[int]) -> TextDelta:
        if self.is_stopped:
            return TextDelta("", True)
        for token_id in token_ids:
            self.token_ids.append(token_id)
            start = max(0, len(self._text) - self._hold)
            self._text += self._detok.step(token_id)
            for stop in self._stops:
                idx = self._text.find(stop, start)
                if idx != -1:
                    self._text = self._text[: idx + len(stop) if self._include_stop_str else idx]
                    self.is_stopped = True
                    self.matched_stop = stop
                    break
            if self.is_stopped:
                break
        safe_end = len(self._text) if self.is_stopped else max(self._emitted, len(self._text) - self._hold)
        delta = self._text[self._emitted : safe_end]
        self._emitted = safe_end
        return TextDelta(delta, self.is_stopped)

    def flush(self) -> str:
        """Text held back for a stop string that never completed (call at the end)."""
        delta = self._text[self._emitted :]
        self._emitted = len(self._text)
        return delta

    @property
    def text(self) -> str:
        return self._text

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)
