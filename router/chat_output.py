"""How a chat answer's text becomes the assistant message, whole or as stream deltas,
for each tool choice (`router.tool_calls` finds and forces the calls)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from router import tool_calls
from router.tool_calls import HermesStream, ToolCall


@dataclass(frozen=True)
class ToolChoice:
    mode: Literal["none", "auto", "required", "named"]
    name: str | None = None  # the function, for "named"
    is_parallel: bool = True


NO_TOOLS = ToolChoice("none")


def finish_reason(choice: ToolChoice, base: str, calls: list[ToolCall]) -> str:
    """OpenAI's (and vLLM's) rule: "tool_calls" when auto or required calls were made and
    the model stopped by itself; a named call keeps "stop"."""
    if calls and choice.mode in ("auto", "required") and base == "stop":
        return "tool_calls"
    return base


def whole_message(choice: ToolChoice, text: str) -> tuple[dict[str, Any], list[ToolCall]]:
    """The assistant message of a finished answer, and the calls in it."""
    content: str | None = text
    calls: list[ToolCall] = []
    if choice.mode == "named":
        content, calls = None, [ToolCall(tool_calls.new_call_id(), choice.name or "", text)]
    elif choice.mode == "required":
        content, calls = None, tool_calls.parse_required(text)
    elif choice.mode == "auto":
        content, calls = tool_calls.parse_hermes(text)
        if not choice.is_parallel:
            calls = calls[:1]
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = [c.to_dict() for c in calls]
    return message, calls


@dataclass
class StreamDeltas:
    """Chat stream deltas (`choices[0].delta`) for each step of text, then at the end."""

    choice: ToolChoice
    calls: list[ToolCall] = field(default_factory=list)
    _named_id: str | None = None
    _required_text: str = ""
    _hermes: HermesStream = field(default_factory=HermesStream)

    def step(self, text: str) -> list[dict[str, Any]]:
        mode = self.choice.mode
        if mode == "none":
            return [{"content": text}] if text else []
        if mode == "named":
            if not text:
                return []
            if self._named_id is None:  # the first piece names the call
                self._named_id = tool_calls.new_call_id()
                call = ToolCall(self._named_id, self.choice.name or "", text)
                self.calls.append(call)
                return [{"tool_calls": [call.to_delta(0)]}]
            return [{"tool_calls": [{"index": 0, "function": {"arguments": text}}]}]
        if mode == "required":  # a JSON array: its calls are known once it is complete
            self._required_text += text
            return []
        content, new_calls = self._hermes.feed(text)
        return self._hermes_deltas(content, new_calls)

    def end(self) -> list[dict[str, Any]]:
        mode = self.choice.mode
        if mode == "required":
            new_calls = tool_calls.parse_required(self._required_text)
            self.calls.extend(new_calls)
            return [{"tool_calls": [c.to_delta(i)]} for i, c in enumerate(new_calls)]
        if mode == "auto":
            return self._hermes_deltas(*self._hermes.finish())
        return []

    def _hermes_deltas(self, content: str, new_calls: list[ToolCall]) -> list[dict[str, Any]]:
        deltas: list[dict[str, Any]] = [{"content": content}] if content else []
        for call in new_calls:
            if not self.choice.is_parallel and self.calls:
                break
            deltas.append({"tool_calls": [call.to_delta(len(self.calls))]})
            self.calls.append(call)
        return deltas
