"""OpenAI-compatible request models, response builders and the OpenAI error format.

Requests are validated with pydantic at the edge. Every field of vLLM's own request models
is either honoured or refused with a 400 naming it (the rules are in `router.api_fields`);
fields vLLM does not know either are ignored, as vLLM ignores them. (Over 350 lines because
it mirrors two of vLLM's ~70-field request models; response shaping lives in app.py,
chat_output.py and logprobs.py.)
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cluster.wire import StructuredSpec
from router import api_fields, tool_calls


class OpenAIError(Exception):
    """An error returned to the client as ``{"error": {...}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


MAX_LOGPROBS = 20  # vLLM's default `max_logprobs`
# n per request. vLLM allows up to VLLM_MAX_N_SEQUENCES (16384); each pdserve choice is
# a decode request with its own admission, so a bound well under one decode's batch.
MAX_CHOICES = 128
MAX_STOP_STRINGS = 1024  # stop strings per request
MAX_STOP_STRING_CHARS = 4096
_CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


class JsonSchemaFormat(BaseModel):
    name: str = "schema"
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs` extension: one constraint plus options."""

    model_config = ConfigDict(extra="forbid")

    json_: str | dict[str, Any] | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None

    def model_dump(self, **kw) -> dict[str, Any]:  # the wire names, `json` included
        return super().model_dump(by_alias=True, **kw)


class StreamOptions(BaseModel):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class _SamplingFields(BaseModel):
    """Fields both endpoints honour. Every other field vLLM accepts is listed in
    `router.api_fields` and refused (400 naming it) when set to anything but a no-op."""

    # NaN and infinities (JSON's NaN/Infinity, 1e999) pass range checks like `ge=0`: refuse them.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    _endpoint: ClassVar[api_fields.Endpoint]

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, le=2**31 - 1,  # the engines keep it in int32
                              description="vLLM extension; -1 or 0 disables")
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    logit_bias: dict[str, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] = Field(default_factory=list)
    n: int | None = Field(1, ge=1, le=MAX_CHOICES,
                          description="choices; n > 1: one prefill, n decodes (router/fanout.py)")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    ignore_eos: bool = Field(False, description="vLLM extension: keep going past EOS")
    min_tokens: int = Field(0, ge=0, description="vLLM extension")
    skip_special_tokens: bool = True
    truncate_prompt_tokens: int | None = Field(None, ge=-1)
    truncation_side: Literal["left", "right"] | None = None
    add_special_tokens: bool | None = None
    return_token_ids: bool | None = Field(None, description="vLLM extension: include token ids")
    return_tokens_as_token_ids: bool | None = None
    request_id: str | None = Field(None, min_length=1, max_length=256)
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    stream_interval: int | None = Field(None, ge=1, le=2**31 - 1)

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        """A field vLLM accepts and pdserve cannot honour is refused, never dropped."""
        found = api_fields.first_rejected(data, cls._endpoint)
        if found is not None:
            name, rule = found
            raise OpenAIError(400, f"`{name}` is not supported by pdserve: {rule.note}.",
                              param=name)
        if isinstance(data, dict) and data.get("stream_options") and not data.get("stream"):
            raise OpenAIError(400, "Stream options can only be defined when `stream=True`.",
                              param="stream_options")
        return data

    @model_validator(mode="after")
    def _check_values(self):
        for name in ("allowed_token_ids", "stop_token_ids"):
            ids = getattr(self, name)
            if ids is not None and any(i < 0 for i in ids):
                raise OpenAIError(400, f"`{name}` must be non-negative token ids", param=name)
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            raise OpenAIError(400, "`allowed_token_ids` must not be empty", param="allowed_token_ids")
        if self.logit_bias:
            for key in self.logit_bias:
                if not key.lstrip("-").isdigit():
                    raise OpenAIError(400, f"`logit_bias` keys must be token ids, got {key!r}",
                                      param="logit_bias")
        if (self.n or 1) > 1 and self.temperature is not None and self.temperature < 1e-5:
            # vLLM's SamplingParams._verify_greedy_sampling: n greedy answers are one answer.
            raise OpenAIError(400, f"n must be 1 when using greedy sampling, got {self.n}.",
                              param="n")
        return self

    def structured_spec(self) -> StructuredSpec | None:
        """The request's one structured-output constraint, as vLLM merges `response_format`
        into `structured_outputs` (response_format wins)."""
        fields = self.structured_outputs.model_dump(exclude_none=True) if self.structured_outputs else {}
        rf = self.response_format
        if rf is not None and rf.type != "text":
            for key in _CONSTRAINTS:
                fields.pop(key, None)
            if rf.type == "json_object":
                fields["json_object"] = True
            else:
                if rf.json_schema is None or rf.json_schema.json_schema is None:
                    raise OpenAIError(400, "When response_format type is 'json_schema', the "
                                      "'json_schema' field (with its 'schema') must be provided.",
                                      param="response_format")
                fields["json"] = rf.json_schema.json_schema
        if not fields:
            return None
        constraints = [k for k in _CONSTRAINTS if k in fields]
        if len(constraints) != 1:
            raise OpenAIError(400, "structured outputs need exactly one constraint of "
                              f"{', '.join(_CONSTRAINTS)}; got {constraints or 'none'}",
                              param="structured_outputs")
        if "json" in fields and not isinstance(fields["json"], str):
            fields["json"] = json.dumps(fields["json"])
        if "choice" in fields:
            if not fields["choice"]:
                raise OpenAIError(400, "`choice` must not be empty", param="structured_outputs")
            fields["choice"] = tuple(fields["choice"])
        return StructuredSpec(**fields)

    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        if any(not s for s in stops):
            raise OpenAIError(400, "stop strings must not be empty", param="stop")
        # The front end matches every stop string after every token, on the event loop.
        if len(stops) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_STRING_CHARS for s in stops):
            raise OpenAIError(400, f"at most {MAX_STOP_STRINGS} stop strings of at most "
                              f"{MAX_STOP_STRING_CHARS} characters each", param="stop")
        return stops

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)

    @property
    def logit_bias_ids(self) -> tuple[tuple[int, float], ...]:
        return tuple((int(k), float(v)) for k, v in (self.logit_bias or {}).items())

    def truncate(self, ids: list[int]) -> list[int]:
        """`truncate_prompt_tokens`: keep the last N ids (or the first N with `right`)."""
        n = self.truncate_prompt_tokens
        if n is None or n == -1 or len(ids) <= n:
            return ids
        return ids[:n] if self.truncation_side == "right" else ids[len(ids) - n:]


class CompletionRequest(_SamplingFields):
    _endpoint: ClassVar[api_fields.Endpoint] = "completions"

    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs

    def single_prompt(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, str):
            return p
        if not p:
            raise OpenAIError(400, "the prompt is empty", param="prompt")
        if p and all(isinstance(x, int) for x in p):
            return p  # type: ignore[return-value]
        if isinstance(p, list) and len(p) == 1:
            return p[0]  # type: ignore[return-value]
        raise OpenAIError(400, "send one prompt per request (batched prompts are not supported)",
                          param="prompt")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    # Parts are checked in text(), one error for the first bad part: pydantic would build
    # one error per item of a huge invalid list.
    content: str | list[Any] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if not isinstance(part, dict):
                raise OpenAIError(400, "message content parts must be objects "
                                  '({"type": "text", "text": ...})', param="messages")
            if part.get("type") != "text":
                raise OpenAIError(400, f"content part type {part.get('type')!r} is not supported",
                                  param="messages")
            parts.append(str(part.get("text", "")))
        return "".join(parts)

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates read it: text content plus any other keys the
        client sent (name, tool_calls, tool_call_id), as vLLM passes them."""
        message = {k: v for k, v in (self.model_extra or {}).items() if v is not None}
        message["role"] = self.role
        message["content"] = self.text()
        return message


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolParam(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str = Field(min_length=1)


class NamedToolChoice(BaseModel):
    type: Literal["function"] = "function"
    function: NamedFunction


class ChatCompletionRequest(_SamplingFields):
    _endpoint: ClassVar[api_fields.Endpoint] = "chat"

    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(0, ge=0, le=MAX_LOGPROBS)
    max_completion_tokens: int | None = Field(None, ge=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    documents: list[dict[str, str]] | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    return_prompt_text: bool | None = None
    tools: list[ToolParam] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = True

    @model_validator(mode="after")
    def _chat_checks(self):
        if self.tools is not None and not self.tools:
            raise OpenAIError(400, "`tools` must not be an empty array. Either provide at least "
                              "one tool or omit the field entirely.", param="tools")
        if self.tool_choice is None:
            self.tool_choice = "auto" if self.tools else "none"
        if self.tool_choice != "none" and not self.tools:
            raise OpenAIError(400, "When using `tool_choice`, `tools` must be set.",
                              param="tool_choice")
        if isinstance(self.tool_choice, NamedToolChoice):
            if self.tool_choice.function.name not in {t.function.name for t in self.tools or ()}:
                raise OpenAIError(400, "The tool specified in `tool_choice` does not match any "
                                  "of the specified `tools`", param="tool_choice")
        if self.tool_choice not in ("none", "auto") and (
                self.structured_outputs is not None or (
                    self.response_format is not None and self.response_format.type != "text")):
            raise OpenAIError(400, "You can only either use constraints for structured outputs "
                              "or a required/named tool choice, not both.", param="tool_choice")
        if self.top_logprobs and not self.logprobs:
            raise OpenAIError(400, "when using `top_logprobs`, `logprobs` must be set to true.",
                              param="top_logprobs")
        if self.continue_final_message and self.add_generation_prompt:
            raise OpenAIError(400, "Cannot set both `continue_final_message` and "
                              "`add_generation_prompt` to True.", param="continue_final_message")
        return self

    @property
    def num_logprobs(self) -> int | None:
        return self.top_logprobs if self.logprobs else None

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def tool_dicts(self) -> list[dict[str, Any]]:
        return [t.model_dump(exclude_none=True) for t in self.tools or ()]

    def structured_spec(self) -> StructuredSpec | None:
        """`required` and named tool choices are guaranteed by a JSON schema (vLLM's)."""
        choice = self.tool_choice
        if choice == "required":
            schema = tool_calls.required_schema(self.tool_dicts, self.parallel_tool_calls)
        elif isinstance(choice, NamedToolChoice):
            schema = tool_calls.named_schema(self.tool_dicts, choice.function.name)
        else:
            return super().structured_spec()
        return StructuredSpec(json=json.dumps(schema))

    def template_kwargs(self) -> dict[str, Any]:
        """Variables for the chat template, as vLLM's `build_chat_params` sets them."""
        kwargs: dict[str, Any] = dict(self.chat_template_kwargs or {})
        if self.tools:
            kwargs["tools"] = self.tool_dicts
        kwargs.update(add_generation_prompt=self.add_generation_prompt,
                      continue_final_message=self.continue_final_message)
        if self.documents is not None:
            kwargs["documents"] = self.documents
        if self.reasoning_effort is not None:
            kwargs["reasoning_effort"] = self.reasoning_effort
            kwargs.setdefault("enable_thinking", self.reasoning_effort != "none")
        return kwargs


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(num_prompt: int, num_completion: int) -> dict[str, int]:
    return {"prompt_tokens": num_prompt, "completion_tokens": num_completion,
            "total_tokens": num_prompt + num_completion}


def completion_body(rid: str, model: str, text: str, finish: str | None,
                    use: dict | None, logprobs: dict | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}],
    }
    if use is not None:
        body["usage"] = use
    return body


def chat_body(rid: str, model: str, message: str | dict[str, Any], finish: str | None,
              use: dict, logprobs: dict | None = None) -> dict[str, Any]:
    if isinstance(message, str):
        message = {"role": "assistant", "content": message}
    return {
        "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": message,
                     "logprobs": logprobs, "finish_reason": finish}],
        "usage": use,
    }


def chat_chunk(rid: str, model: str, delta: dict[str, Any], finish: str | None,
               use: dict | None = None, with_choice: bool = True,
               logprobs: dict | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]
        if with_choice else [],
    }
    if use is not None:
        body["usage"] = use
    return body
