"""Tool calls: the constraint that forces them, and the parser that finds them in text.

pdserve's own code, not vLLM's (the router imports no vLLM), written for the formats vLLM
uses so answers look the same:

- ``tool_choice="required"`` and a named function are *guaranteed* by structured output
  (a JSON schema, exactly the one vLLM builds): ``required`` makes the model write a JSON
  array of ``{"name", "parameters"}`` objects, a named function makes it write that
  function's arguments. Prefill samples the first token under the schema and decode
  continues its grammar, so even a random-weight model produces valid calls.
- ``tool_choice="auto"`` leaves the model free, and the Hermes parser family (Hermes 2/3,
  Qwen 2.5/3 and many fine-tunes) reads calls out of the text:
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, any number of them, with
  ordinary content before the first.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
_HERMES_CALL = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)", re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}

    def to_delta(self, index: int) -> dict[str, Any]:
        return {"index": index, **self.to_dict()}


def new_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


def _params_or_empty_object(params: dict[str, Any] | None) -> dict[str, Any]:
    return params if params else {"type": "object", "properties": {}}


def required_schema(tools: list[dict[str, Any]], parallel_tool_calls: bool | None) -> dict:
    """The JSON schema vLLM uses for ``tool_choice="required"``: a non-empty array of
    calls, each naming one of the tools and giving its parameters."""
    defs: dict[str, Any] = {}
    options = []
    for tool in tools:
        fn = tool["function"]
        params = dict(_params_or_empty_object(fn.get("parameters")))
        for name, schema in (params.pop("$defs", None) or {}).items():
            if name in defs and defs[name] != schema:
                raise ValueError(f"tool definition {name!r} has several schemas")
            defs[name] = schema
        options.append({"properties": {"name": {"type": "string", "enum": [fn["name"]]},
                                       "parameters": params},
                        "required": ["name", "parameters"]})
    schema: dict[str, Any] = {"type": "array", "minItems": 1,
                              "items": {"type": "object", "anyOf": options}}
    if parallel_tool_calls is False:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema


def named_schema(tools: list[dict[str, Any]], name: str) -> dict:
    for tool in tools:
        if tool["function"]["name"] == name:
            return _params_or_empty_object(tool["function"].get("parameters"))
    raise ValueError(f"Tool '{name}' has not been passed in `tools`.")


def parse_required(text: str) -> list[ToolCall]:
    """Calls from the JSON array that ``tool_choice="required"`` constrains the model to."""
    try:
        items = json.loads(text)
    except json.JSONDecodeError:
        return []
    if not isinstance(items, list):
        return []
    return [ToolCall(new_call_id(), item["name"], json.dumps(item.get("parameters", {}),
                                                             ensure_ascii=False))
            for item in items if isinstance(item, dict) and isinstance(item.get("name"), str)]


def _hermes_call(body: str) -> ToolCall | None:
    try:
        call = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    args = call.get("arguments", {})
    return ToolCall(new_call_id(), call["name"],
                    args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))


def parse_hermes(text: str) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a whole answer. Without a parseable call, all of it is content."""
    if TOOL_CALL_START not in text:
        return text, []
    calls = []
    for closed, open_ended in _HERMES_CALL.findall(text):
        call = _hermes_call((closed or open_ended).strip())
        if call is None:
            return text, []
        calls.append(call)
    content = text[: text.index(TOOL_CALL_START)]
    return (content or None), calls


class HermesStream:
    """The Hermes parser over a stream of text deltas.

    `feed` returns what can be sent now: content deltas (text that cannot be the start of
    ``<tool_call>`` any more) and each call once its ``</tool_call>`` arrived. Calls are
    sent whole, one delta each (vLLM streams a call's arguments piece by piece; a client
    that accumulates deltas ends with the same call). Text after the first call is dropped
    from content, as vLLM's parser drops it.
    """

    def __init__(self) -> None:
        self._buffer = ""
        self._in_calls = False
        self._held = ""  # all text from the first <tool_call> on (content if no call parses)
        self.calls: list[ToolCall] = []

    def feed(self, delta: str) -> tuple[str, list[ToolCall]]:
        self._buffer += delta
        if self._in_calls:
            self._held += delta
        content = ""
        if not self._in_calls:
            idx = self._buffer.find(TOOL_CALL_START)
            if idx == -1:
                keep = _partial_suffix(self._buffer, TOOL_CALL_START)
                content, self._buffer = self._buffer[: len(self._buffer) - keep], self._buffer[len(self._buffer) - keep:]
                return content, []
            content, self._buffer = self._buffer[:idx], self._buffer[idx:]
            self._held = self._buffer
            self._in_calls = True
        new_calls = []
        while True:
            start = self._buffer.find(TOOL_CALL_START)
            end = self._buffer.find(TOOL_CALL_END, start + 1) if start != -1 else -1
            if start == -1 or end == -1:
                break
            call = _hermes_call(self._buffer[start + len(TOOL_CALL_START): end].strip())
            self._buffer = self._buffer[end + len(TOOL_CALL_END):]
            if call is not None:
                new_calls.append(call)
        self.calls.extend(new_calls)
        return content, new_calls

    def finish(self) -> tuple[str, list[ToolCall]]:
        """At the end: an unclosed last call still counts if its JSON is whole; text held
        back for a possible ``<tool_call>`` that never came is content."""
        rest, self._buffer = self._buffer, ""
        if not self._in_calls:
            return rest, []
        start = rest.find(TOOL_CALL_START)
        if start != -1:
            call = _hermes_call(rest[start + len(TOOL_CALL_START):].strip())
            if call is not None:
                self.calls.append(call)
                return "", [call]
        if not self.calls:  # nothing parsed: it was all content after all
            return self._held, []
        return "", []


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
