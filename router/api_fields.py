"""What pdserve does with every request field of vLLM's OpenAI server.

vLLM's ``ChatCompletionRequest`` and ``CompletionRequest`` accept a long list of fields. A
drop-in replacement must never accept one of them and quietly do nothing with it: a client
that asked for JSON, a tool call or a penalty and got plain text has been lied to. So each
field has exactly one rule here:

- ``honoured``: pdserve does what vLLM does with it.
- ``rejected``: any value other than the listed no-op values gets a 400 naming the field.
- ``no-op``: vLLM itself does nothing with it on this endpoint (e.g. ``user``, or fields
  that only the ``/render`` endpoints read); pdserve accepts it and does nothing either.

``docs/api.md`` carries this table (``markdown_table()`` renders it) and a test checks both
the table and the document against the installed vLLM's protocol models, so a vLLM upgrade
that adds a field fails that test instead of the field being dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Status = Literal["honoured", "rejected", "no-op"]
Endpoint = Literal["chat", "completions"]

_UNSET = object()


@dataclass(frozen=True)
class FieldRule:
    status: Status
    note: str
    # For `rejected`: values that mean "off" and are accepted (None is always accepted).
    off_values: tuple[Any, ...] = ()
    endpoints: tuple[Endpoint, ...] = ("chat", "completions")

    def rejects(self, value: Any) -> bool:
        if self.status != "rejected" or value is None:
            return False
        return not any(value == off and type(value) is type(off) for off in self.off_values)


def _h(note: str, endpoints: tuple[Endpoint, ...] = ("chat", "completions")) -> FieldRule:
    return FieldRule("honoured", note, endpoints=endpoints)


def _r(note: str, *off: Any, endpoints: tuple[Endpoint, ...] = ("chat", "completions")) -> FieldRule:
    return FieldRule("rejected", note, off, endpoints)


def _noop(note: str, *, endpoints: tuple[Endpoint, ...] = ("chat", "completions")) -> FieldRule:
    return FieldRule("no-op", note, endpoints=endpoints)


CHAT: tuple[Endpoint, ...] = ("chat",)
COMPLETIONS: tuple[Endpoint, ...] = ("completions",)

# Field name -> rule. Order follows vLLM's protocol files.
FIELDS: dict[str, FieldRule] = {
    "messages": _h("text content parts; roles system/developer/user/assistant/tool; assistant "
                   "`tool_calls` and tool results are passed to the chat template", CHAT),
    "prompt": _h("one prompt: a string or token ids (a list of one prompt is accepted)",
                 COMPLETIONS),
    "model": _h("must name the served model (404 otherwise)"),
    "frequency_penalty": _h("engine sampler; in disaggregated mode decode counts prefill's "
                            "first token as output (see 'stateful sampling' below)"),
    "logit_bias": _h("engine sampler (keys are token ids)"),
    "logprobs": _h("chat: bool with `top_logprobs`; completions: int k (0..20). The first "
                   "token's logprobs come from prefill, the rest from decode"),
    "top_logprobs": _h("0..20 alternatives per token, the sampled token first (vLLM's order)",
                       CHAT),
    "max_tokens": _h("completions default 16, as vLLM; chat default: the rest of the context"),
    "max_completion_tokens": _h("takes precedence over `max_tokens`", CHAT),
    "n": _h("1..128 choices. Disaggregated: one prefill stages the prompt once with n "
            "claims, n decodes load it and each samples its own first token (seed + i, "
            "vLLM's rule); colocated: n requests sharing the prefix cache, as vLLM's engine"),
    "presence_penalty": _h("engine sampler; stateful, as `frequency_penalty`"),
    "response_format": _h("`text`, `json_object`, `json_schema` through vLLM's structured-output "
                          "backend on both engines; `structural_tag` formats are refused"),
    "seed": _h("per-request seed on both engines"),
    "stop": _h("stop strings, matched by the router across prefill's and decode's tokens"),
    "stream": _h("SSE chunks ending in `data: [DONE]`"),
    "stream_options": _h("`include_usage` and `continuous_usage_stats`"),
    "suffix": _r("fill-in-the-middle rendering is not supported (vLLM supports it only for "
                 "models with FIM rendering)", "", endpoints=COMPLETIONS),
    "temperature": _h("engine sampler; default 1.0"),
    "top_p": _h("engine sampler"),
    "tools": _h("rendered by the chat template (`tools` variable); calls parsed from the "
                "answer (Hermes `<tool_call>` format) with `tool_choice` auto", CHAT),
    "tool_choice": _h("none, auto (Hermes parser), required and a named function (both "
                      "guaranteed by a JSON-schema constraint, vLLM's schema)", CHAT),
    "reasoning_effort": _h("passed to the chat template (with `enable_thinking`), as vLLM does",
                           CHAT),
    "thinking_token_budget": _r("needs a reasoning parser; pdserve has none"),
    "include_reasoning": _noop("only read by a reasoning parser; vLLM without one ignores it too",
                               endpoints=CHAT),
    "parallel_tool_calls": _h("false: at most one call (`maxItems: 1` for required; the first "
                              "parsed call for auto)", CHAT),
    "user": _noop("vLLM ignores it too"),
    "use_beam_search": _r("beam search is not supported", False),
    "top_k": _h("engine sampler; -1 or 0 disables"),
    "min_p": _h("engine sampler"),
    "repetition_penalty": _h("engine sampler (prompt and output tokens)"),
    "watermarking": _r("watermarked sampling is not supported", False),
    "length_penalty": _r("only meaningful with beam search", 1.0, 1),
    "stop_token_ids": _h("engine stop ids; prefill's first token is checked by the router"),
    "include_stop_str_in_output": _h("the router keeps the matched stop string"),
    "ignore_eos": _h("engine"),
    "min_tokens": _h("engine; decode gets `min_tokens - 1` after prefill's token"),
    "skip_special_tokens": _h("router detokenizer"),
    "spaces_between_special_tokens": _r(
        "the router's fast detokenizer always joins special tokens without spaces", True),
    "truncate_prompt_tokens": _h("router keeps the last (or first) N prompt tokens"),
    "truncation_side": _h("`left` (default) keeps the last N tokens, `right` the first N"),
    "prompt_logprobs": _r("prompt logprobs are not returned yet", 0),
    "logprob_token_ids": _r("logprobs of fixed token ids are not returned yet"),
    "allowed_token_ids": _h("engine sampler"),
    "bad_words": _h("engine sampler; stateful, as `frequency_penalty`"),
    "echo": _r("echoing the prompt is not supported", False),
    "add_generation_prompt": _h("chat template", CHAT),
    "continue_final_message": _h("chat template", CHAT),
    "add_special_tokens": _h("tokenizer (completions default true, chat default false)"),
    "documents": _h("passed to the chat template", CHAT),
    "chat_template": _h("a per-request Jinja template, sandboxed", CHAT),
    "chat_template_kwargs": _h("extra chat template variables", CHAT),
    "media_io_kwargs": _r("pdserve serves text only", endpoints=CHAT),
    "mm_processor_kwargs": _r("pdserve serves text only", endpoints=CHAT),
    "prompt_embeds": _r("prompt embeddings are not supported", endpoints=COMPLETIONS),
    "structured_outputs": _h("json, regex, choice, grammar, json_object, structural_tag and "
                             "their options, through vLLM's backend; prefill's first token is "
                             "constrained, and decode resamples it so its grammar state "
                             "continues after it"),
    "priority": _r("the engines use FCFS scheduling (vLLM rejects a priority then too)", 0),
    "request_id": _h("response id becomes `<prefix>-<request_id>`, as vLLM"),
    "session_id": _noop("vLLM uses it only to route among data-parallel engine ranks"),
    "return_tokens_as_token_ids": _h("logprob tokens written as `token_id:<id>`"),
    "return_token_ids": _h("`token_ids` per choice and `prompt_token_ids`"),
    "routed_experts_prompt_start": _noop(
        "only read when the server returns routed experts (off in vLLM by default)"),
    "return_token_offsets": _noop("read only by the /render endpoints, as in vLLM"),
    "return_prompt_text": _h("`prompt_text` with the rendered chat prompt", CHAT),
    "mm_payload": _noop("read only by the /render endpoints, as in vLLM"),
    "return_mm_kwargs": _noop("read only by the /render endpoints, as in vLLM"),
    "cache_salt": _r("prefix-cache salting is not forwarded to the engines yet"),
    "kv_transfer_params": _r("pdserve moves KV itself; clients cannot drive its connector"),
    "ec_transfer_params": _r("encoder-cache transfer is not supported"),
    "vllm_xargs": _r("custom logits-processor arguments are not forwarded"),
    "repetition_detection": _r("n-gram repetition detection is not forwarded yet"),
    "stream_interval": _h("tokens per streamed chunk (at least the server's setting)"),
}


# Fields older vLLM servers (and OpenAI) accepted that vLLM 0.32 no longer lists. vLLM
# ignores unknown fields; a client still sending one of these means it, so it is refused.
LEGACY_FIELDS: dict[str, FieldRule] = {
    "best_of": _r("vLLM 0.32 has no best_of (its server ignores the field and returns n "
                  "choices); a client sending it wants a selection neither server makes", 1),
    "guided_json": _r("use `response_format` or `structured_outputs`"),
    "guided_regex": _r("use `structured_outputs`"),
    "guided_choice": _r("use `structured_outputs`"),
    "guided_grammar": _r("use `structured_outputs`"),
    "functions": _r("use `tools`", endpoints=CHAT),
    "function_call": _r("use `tool_choice`", endpoints=CHAT),
}


def rules_for(endpoint: Endpoint) -> dict[str, FieldRule]:
    rules = {**FIELDS, **LEGACY_FIELDS}
    return {name: rule for name, rule in rules.items() if endpoint in rule.endpoints}


def first_rejected(data: Any, endpoint: Endpoint) -> tuple[str, FieldRule] | None:
    """The first field of a raw request body whose value pdserve refuses, if any."""
    if not isinstance(data, dict):
        return None
    rules = rules_for(endpoint)
    for name, value in data.items():
        rule = rules.get(name)
        if rule is not None and rule.rejects(value):
            return name, rule
    return None


def markdown_table() -> str:
    """The field table of docs/api.md (the test keeps the two identical)."""
    lines = ["| field | chat | completions | status | notes |", "| --- | --- | --- | --- | --- |"]
    for name, rule in FIELDS.items():
        chat = "yes" if "chat" in rule.endpoints else ""
        cmpl = "yes" if "completions" in rule.endpoints else ""
        note = rule.note.replace("|", "\\|")
        lines.append(f"| `{name}` | {chat} | {cmpl} | {rule.status} | {note} |")
    return "\n".join(lines) + "\n"
