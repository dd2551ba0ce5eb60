"""Every field of vLLM's OpenAI request models is honoured or refused by name (issue 13,
item 5): the rules table against the installed vLLM, docs/api.md against the table, and
the router's behaviour for each status."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from pathlib import Path

import httpx
import pytest

from cluster.wire import EngineRequest
from router import api_fields
from tests.fakes import FakeDecodeWorker, FakePrefillWorker, serving

MODEL = "pdserve-tiny"
ROOT = Path(__file__).resolve().parents[2]


def _vllm_request_fields() -> dict[str, set[str]]:
    pytest.importorskip("vllm")
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    return {"chat": set(ChatCompletionRequest.model_fields),
            "completions": set(CompletionRequest.model_fields)}


def test_rules_cover_exactly_the_installed_vllm_fields():
    vllm_fields = _vllm_request_fields()
    for endpoint, fields in vllm_fields.items():
        ours = {name for name, rule in api_fields.FIELDS.items() if endpoint in rule.endpoints}
        assert ours == fields, (f"{endpoint}: missing rules for {sorted(fields - ours)}; "
                                f"rules for fields vLLM lacks: {sorted(ours - fields)}")
    # A legacy field is one vLLM no longer has (else it belongs in FIELDS).
    assert not set(api_fields.LEGACY_FIELDS) & (vllm_fields["chat"] | vllm_fields["completions"])


def test_docs_table_is_the_rules_table():
    doc = (ROOT / "docs" / "api.md").read_text()
    found = re.search(r"<!-- fields:begin -->\n(.*?)<!-- fields:end -->", doc, re.S)
    assert found, "docs/api.md lost its field-table markers"
    assert found.group(1) == api_fields.markdown_table(), (
        "docs/api.md's table differs from router/api_fields.py; regenerate it with "
        "router.api_fields.markdown_table()")


class RecordingPrefill(FakePrefillWorker):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.requests: list[EngineRequest] = []

    async def prefill(self, req):
        self.requests.append(req)
        return await super().prefill(req)


class RecordingDecode(FakeDecodeWorker):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.requests: list[EngineRequest] = []

    async def generate(self, req):
        self.requests.append(req)
        async for delta in super().generate(req):
            yield delta


def build_recording(prefill, decode, mode="disaggregated"):
    from cluster.config import RouterConfig, ServeConfig, SLOConfig
    from cluster.tiny_model import ensure_tiny_model
    from router.build import build_router
    from router.tokenizer import ModelTokenizer

    config = ServeConfig(mode=mode, slo=SLOConfig(ttft_s=1.0, tpot_s=0.1),
                         router=RouterConfig(stats_interval_s=0.05))
    tokenizer = ModelTokenizer(ensure_tiny_model("tiny"))
    if mode == "disaggregated":
        return build_router(config, tokenizer, MODEL, prefill=[prefill], decode=[decode])
    return build_router(config, tokenizer, MODEL, colocated=[decode])


@contextlib.asynccontextmanager
async def recording_deployment(prefill_cls=None, decode_cls=None):
    prefill = (prefill_cls or RecordingPrefill)("prefill-0")
    decode = (decode_cls or RecordingDecode)("decode-0", prefills=[prefill])
    app, _deps = build_recording(prefill, decode)
    async with serving(app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            for _ in range(200):
                if (await client.get("/health")).status_code == 200:
                    break
                await asyncio.sleep(0.02)
            yield client, prefill, decode


# A value that turns each refused field on (anything but its no-op values).
_ON_VALUES = {
    "n": 2, "response_format": {"type": "json_object"}, "suffix": "tail", "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {}}}],
    "tool_choice": "auto", "thinking_token_budget": 10, "parallel_tool_calls": False,
    "use_beam_search": True, "watermarking": True, "length_penalty": 0.5,
    "spaces_between_special_tokens": False, "prompt_logprobs": 1, "logprob_token_ids": [3],
    "echo": True, "media_io_kwargs": {"image": {}}, "mm_processor_kwargs": {"x": 1},
    "prompt_embeds": "AAAA", "structured_outputs": {"regex": "a+"}, "priority": 1,
    "cache_salt": "salt", "kv_transfer_params": {"do_remote_prefill": True},
    "ec_transfer_params": {"x": 1}, "vllm_xargs": {"a": 1},
    "repetition_detection": {"max_pattern_size": 2}, "best_of": 2, "guided_json": {},
    "guided_regex": "a", "guided_choice": ["a"], "guided_grammar": "root ::= 'a'",
    "functions": [{"name": "f"}], "function_call": "auto",
}


def _base(endpoint: str) -> dict:
    if endpoint == "chat":
        return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    return {"model": MODEL, "prompt": "hi", "max_tokens": 3}


async def test_every_refused_field_gets_a_400_naming_it_and_its_off_value_passes():
    async with recording_deployment() as (client, prefill, decode):
        for endpoint, path in (("chat", "/v1/chat/completions"), ("completions", "/v1/completions")):
            for name, rule in api_fields.rules_for(endpoint).items():
                if rule.status != "rejected":
                    continue
                assert name in _ON_VALUES, f"no test value for refused field {name}"
                r = await client.post(path, json={**_base(endpoint), name: _ON_VALUES[name]})
                assert r.status_code == 400, (endpoint, name, r.text)
                err = r.json()["error"]
                assert err["param"] == name and f"`{name}`" in err["message"], (name, err)
                for off in rule.off_values:
                    r = await client.post(path, json={**_base(endpoint), name: off})
                    assert r.status_code == 200, (endpoint, name, off, r.text)
        assert prefill.requests, "the off values were served"


async def test_no_op_fields_are_accepted():
    async with recording_deployment() as (client, *_):
        values = {"user": "u", "session_id": "s", "routed_experts_prompt_start": 0,
                  "return_token_offsets": True, "mm_payload": "none", "return_mm_kwargs": False,
                  "include_reasoning": False}
        for endpoint, path in (("chat", "/v1/chat/completions"), ("completions", "/v1/completions")):
            for name, rule in api_fields.rules_for(endpoint).items():
                if rule.status == "no-op":
                    r = await client.post(path, json={**_base(endpoint), name: values[name]})
                    assert r.status_code == 200, (endpoint, name, r.text)


async def test_sampling_fields_reach_both_engines():
    async with recording_deployment() as (client, prefill, decode):
        r = await client.post("/v1/completions", json={
            **_base("completions"), "max_tokens": 6, "temperature": 0.7, "top_p": 0.9, "top_k": 5,
            "min_p": 0.1, "seed": 11, "repetition_penalty": 1.2, "logit_bias": {"17": -5},
            "allowed_token_ids": list(range(10, 900)), "stop_token_ids": [2], "min_tokens": 2,
            "ignore_eos": True, "stream_interval": 2, "return_token_ids": True})
        assert r.status_code == 200, r.text
        p, d = prefill.requests[-1].sampling, decode.requests[-1].sampling
        for spec in (p, d):
            assert (spec.temperature, spec.top_p, spec.top_k, spec.min_p, spec.seed) == (0.7, 0.9, 5, 0.1, 11)
            assert spec.repetition_penalty == 1.2 and spec.logit_bias == ((17, -5.0),)
            assert spec.allowed_token_ids == tuple(range(10, 900)) and spec.stop_token_ids == (2,)
            assert spec.ignore_eos and spec.stream_interval == 2
        assert (p.max_tokens, p.min_tokens) == (6, 2)
        assert (d.max_tokens, d.min_tokens) == (5, 1)  # prefill produced one token
        # Stateless sampling: decode continues from prompt + prefill's token.
        first = r.json()["choices"][0]["token_ids"][0]
        assert decode.requests[-1].prompt_token_ids == prefill.requests[-1].prompt_token_ids + (first,)


async def test_output_dependent_sampling_has_decode_resample_the_first_token():
    async with recording_deployment() as (client, prefill, decode):
        r = await client.post("/v1/completions", json={
            **_base("completions"), "max_tokens": 6, "temperature": 0.8,
            "frequency_penalty": 0.5, "presence_penalty": 0.25, "bad_words": ["zz"],
            "return_token_ids": True})
        assert r.status_code == 200, r.text
        body = r.json()
        p, d = prefill.requests[-1], decode.requests[-1]
        # Decode gets the prompt alone and the whole budget; the router drops its copy of
        # the first token, so the client sees each token once.
        assert d.prompt_token_ids == p.prompt_token_ids
        assert d.sampling.max_tokens == 6 and d.sampling.frequency_penalty == 0.5
        assert d.sampling.presence_penalty == 0.25 and d.sampling.bad_words == ("zz",)
        # One seed pinned for both engines, so both draw the same first token.
        assert p.sampling.seed is not None and p.sampling.seed == d.sampling.seed
        assert len(body["choices"][0]["token_ids"]) == body["usage"]["completion_tokens"] == 6


async def test_router_side_fields():
    async with recording_deployment() as (client, prefill, decode):
        full = (await client.post("/v1/completions", json={
            **_base("completions"), "max_tokens": 12})).json()["choices"][0]["text"]
        stop = full[4:7]
        r = await client.post("/v1/completions", json={
            **_base("completions"), "max_tokens": 12, "stop": [stop],
            "include_stop_str_in_output": True})
        assert r.json()["choices"][0]["text"] == full[: full.index(stop) + len(stop)]
        ids = list(range(20, 60))
        await client.post("/v1/completions", json={
            "model": MODEL, "prompt": ids, "max_tokens": 2, "truncate_prompt_tokens": 8})
        assert prefill.requests[-1].prompt_token_ids == tuple(ids[-8:])
        await client.post("/v1/completions", json={
            "model": MODEL, "prompt": ids, "max_tokens": 2, "truncate_prompt_tokens": 8,
            "truncation_side": "right"})
        assert prefill.requests[-1].prompt_token_ids == tuple(ids[:8])
        r = await client.post("/v1/completions", json={
            **_base("completions"), "request_id": "client-chosen"})
        assert r.json()["id"] == "cmpl-client-chosen"
        r = await client.post("/v1/chat/completions", json={
            **_base("chat"), "return_prompt_text": True,
            "chat_template": "{% for m in messages %}[{{ m['role'] }}:{{ m['content'] }}]{% endfor %}"
                             "{% if add_generation_prompt %}>{% endif %}{{ greeting }}",
            "chat_template_kwargs": {"greeting": "hello"}})
        assert r.status_code == 200, r.text
        assert r.json()["prompt_text"] == "[user:hi]>hello"
        r = await client.post("/v1/chat/completions", json={
            "model": MODEL, "max_tokens": 2, "return_prompt_text": True,
            "add_generation_prompt": False, "continue_final_message": True,
            "messages": [{"role": "user", "content": "hi"},
                         {"role": "assistant", "content": "The answer is"}]})
        assert r.json()["prompt_text"].endswith("The answer is")
        r = await client.post("/v1/chat/completions", json={
            **_base("chat"), "continue_final_message": True})
        assert r.status_code == 400


def test_a_rule_refuses_only_non_off_values():
    rule = api_fields.LEGACY_FIELDS["best_of"]
    assert not rule.rejects(1) and not rule.rejects(None) and rule.rejects(2) and rule.rejects(True)
    assert not api_fields.FIELDS["length_penalty"].rejects(1.0)
    assert api_fields.FIELDS["length_penalty"].rejects(0.5)


async def test_structured_output_reaches_both_engines_and_bad_ones_are_400():
    async with recording_deployment() as (client, prefill, decode):
        schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
        cases = [
            ({"response_format": {"type": "json_object"}}, "json_object", True),
            ({"response_format": {"type": "json_schema",
                                  "json_schema": {"name": "s", "schema": schema}}},
             "json", json.dumps(schema)),
            ({"structured_outputs": {"regex": "[0-9]+"}}, "regex", "[0-9]+"),
            ({"structured_outputs": {"choice": ["yes", "no"]}}, "choice", ("yes", "no")),
            ({"structured_outputs": {"grammar": "root ::= \"a\""}}, "grammar", "root ::= \"a\""),
        ]
        for extra, key, value in cases:
            r = await client.post("/v1/chat/completions", json={**_base("chat"), **extra})
            assert r.status_code == 200, (extra, r.text)
            p, d = prefill.requests[-1], decode.requests[-1]
            assert getattr(p.sampling.structured, key) == value
            assert d.sampling.structured == p.sampling.structured
            assert d.prompt_token_ids == p.prompt_token_ids  # decode resamples the first token
        for bad in ({"response_format": {"type": "json_schema"}},
                    {"structured_outputs": {"regex": "a", "choice": ["a"]}},
                    {"structured_outputs": {"choice": []}},
                    {"structured_outputs": {"regexp": "a"}},
                    {"response_format": {"type": "yaml"}}):
            r = await client.post("/v1/completions", json={**_base("completions"), **bad})
            assert r.status_code == 400, (bad, r.text)
            assert r.json()["error"]["param"].split(".")[0] in ("response_format", "structured_outputs")
