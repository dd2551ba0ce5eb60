"""Tool calls: vLLM's forcing schemas, the Hermes parser (whole and streamed), and the
chat API shaping calls into messages, deltas and finish reasons over scripted workers."""

from __future__ import annotations

import asyncio
import contextlib
import json

import httpx

from cluster.wire import PrefillResult, TokenDelta
from router import tool_calls
from router.chat_output import StreamDeltas, ToolChoice
from tests.fakes import FakeDecodeWorker, FakePrefillWorker, serving
from tests.router.test_api_fields import MODEL, build_recording

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {}}}


def test_required_and_named_schemas_are_vllms():
    schema = tool_calls.required_schema([WEATHER, TIME], parallel_tool_calls=False)
    assert schema["type"] == "array" and schema["minItems"] == 1 and schema["maxItems"] == 1
    names = [o["properties"]["name"]["enum"] for o in schema["items"]["anyOf"]]
    assert names == [["get_weather"], ["get_time"]]
    assert schema["items"]["anyOf"][1]["properties"]["parameters"] == {"type": "object", "properties": {}}
    assert "maxItems" not in tool_calls.required_schema([WEATHER], parallel_tool_calls=None)
    assert tool_calls.named_schema([WEATHER, TIME], "get_weather") == WEATHER["function"]["parameters"]


def test_hermes_parser_whole():
    text = ('Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
            '</tool_call>\n<tool_call>{"name": "get_time", "arguments": {}}</tool_call>')
    content, calls = tool_calls.parse_hermes(text)
    assert content == "Let me check. "
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Oslo"}), ("get_time", {})]
    assert all(c.id.startswith("chatcmpl-tool-") for c in calls) and calls[0].id != calls[1].id
    assert tool_calls.parse_hermes("no calls here") == ("no calls here", [])
    broken = "<tool_call>{not json</tool_call>"
    assert tool_calls.parse_hermes(broken) == (broken, [])
    # An unclosed last call still counts when its JSON is whole (vLLM's regex does this).
    _, calls = tool_calls.parse_hermes('<tool_call>{"name": "get_time", "arguments": {}}')
    assert [c.name for c in calls] == ["get_time"]


def test_hermes_stream_matches_whole_parse_for_any_split():
    text = ('Sure<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
            '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>')
    for size in (1, 2, 3, 5, 7, 11, len(text)):
        stream = tool_calls.HermesStream()
        content, calls = "", []
        for i in range(0, len(text), size):
            c, new = stream.feed(text[i:i + size])
            assert "<" not in c, "part of <tool_call> leaked into content"
            content += c
            calls += new
        c, new = stream.finish()
        content, calls = content + c, calls + new
        assert content == "Sure" and [x.name for x in calls] == ["get_weather", "get_time"]
    stream = tool_calls.HermesStream()
    assert stream.feed("a <tool") == ("a ", [])
    assert stream.finish() == ("<tool", [])  # never became a call: content
    stream = tool_calls.HermesStream()
    stream.feed("x <tool_call>{bad")
    assert stream.finish() == ("<tool_call>{bad", [])


def test_stream_deltas_for_named_and_required():
    named = StreamDeltas(ToolChoice("named", "get_weather"))
    first = named.step('{"city"')
    rest = named.step(': "Oslo"}')
    assert first[0]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city"'}
    assert first[0]["tool_calls"][0]["id"].startswith("chatcmpl-tool-")
    assert rest == [{"tool_calls": [{"index": 0, "function": {"arguments": ': "Oslo"}'}}]}]
    required = StreamDeltas(ToolChoice("required"))
    assert required.step('[{"name": "get_time", ') == []
    ends = required.step('"parameters": {}}]') + required.end()
    assert ends[0]["tool_calls"][0]["function"] == {"name": "get_time", "arguments": "{}"}


class ScriptedPrefill(FakePrefillWorker):
    """Prefill whose first token is the first of a scripted answer."""

    script: list[int] = []

    async def prefill(self, req):
        result = await super().prefill(req)
        return PrefillResult(**{**{f: getattr(result, f) for f in result.__struct_fields__},
                                "first_token_id": self.script[0]})


class ScriptedDecode(FakeDecodeWorker):
    """Decode that emits the rest of the script, then EOS."""

    script: list[int] = []

    async def generate(self, req):
        if req.kv_handle is not None:
            for p in self.prefills:
                p.claim(req.kv_handle)
        rest = self.script[1:]
        for i, tok in enumerate(rest):
            yield TokenDelta(token_ids=(tok,), served_by="transferred" if i == 0 else None,
                             num_prompt_tokens_computed=1 if i == 0 else None)
        yield TokenDelta(token_ids=(self.eos_token_id,), finish_reason="stop")


@contextlib.asynccontextmanager
async def scripted(answer: str):
    prefill, decode = ScriptedPrefill("prefill-0"), ScriptedDecode("decode-0")
    decode.prefills = [prefill]
    app, deps = build_recording(prefill, decode)
    ids = deps.tokenizer.encode(answer, add_special_tokens=False)
    prefill.script = decode.script = ids
    async with serving(app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            for _ in range(200):
                if (await client.get("/health")).status_code == 200:
                    break
                await asyncio.sleep(0.02)
            yield client


def _chat(**kw):
    return {"model": MODEL, "messages": [{"role": "user", "content": "weather in Oslo?"}],
            "max_tokens": 200, **kw}


async def test_auto_tool_calls_whole_and_streamed():
    answer = ('Checking. <tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
              '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>')
    async with scripted(answer) as client:
        r = await client.post("/v1/chat/completions", json=_chat(tools=[WEATHER, TIME]))
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        assert choice["message"]["content"] == "Checking. "
        calls = choice["message"]["tool_calls"]
        assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
        assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo"}
        assert calls[0]["type"] == "function"
        # parallel_tool_calls=false: the first call only.
        r = await client.post("/v1/chat/completions", json=_chat(tools=[WEATHER, TIME],
                                                                  parallel_tool_calls=False))
        assert len(r.json()["choices"][0]["message"]["tool_calls"]) == 1
        # tool_choice none: the text is content, nothing parsed.
        r = await client.post("/v1/chat/completions", json=_chat(tools=[WEATHER], tool_choice="none"))
        assert r.json()["choices"][0]["message"]["content"] == answer
        assert "tool_calls" not in r.json()["choices"][0]["message"]
        assert r.json()["choices"][0]["finish_reason"] == "stop"
        r = await client.post("/v1/chat/completions", json=_chat(tools=[WEATHER, TIME], stream=True))
        events = [json.loads(line[6:]) for line in r.text.splitlines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
        deltas = [e["choices"][0]["delta"] for e in events]
        content = "".join(d.get("content") or "" for d in deltas)
        streamed = [tc for d in deltas for tc in d.get("tool_calls", [])]
        assert content == "Checking. "
        assert [(tc["index"], tc["function"]["name"]) for tc in streamed] == [(0, "get_weather"), (1, "get_time")]
        assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


async def test_tools_reach_the_chat_template_and_bad_tool_requests_are_400():
    async with scripted("hello") as client:
        template = ("{% for t in tools %}[{{ t.function.name }}]{% endfor %}"
                    "{% for m in messages %}{{ m.content }}{% endfor %}")
        r = await client.post("/v1/chat/completions", json=_chat(
            tools=[WEATHER, TIME], chat_template=template, return_prompt_text=True))
        assert r.json()["prompt_text"] == "[get_weather][get_time]weather in Oslo?"
        # An assistant turn with tool calls and a tool result reach the template too.
        r = await client.post("/v1/chat/completions", json={
            "model": MODEL, "max_tokens": 3, "return_prompt_text": True, "tools": [WEATHER],
            "chat_template": "{% for m in messages %}{{ m.role }}:{{ m.content }}"
                             "{% if m.tool_calls %}{{ m.tool_calls[0].function.name }}{% endif %}"
                             "{% if m.tool_call_id %}#{{ m.tool_call_id }}{% endif %};{% endfor %}",
            "messages": [{"role": "user", "content": "q"},
                         {"role": "assistant", "content": None, "tool_calls": [{
                             "id": "c1", "type": "function",
                             "function": {"name": "get_weather", "arguments": "{}"}}]},
                         {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]})
        assert r.status_code == 200, r.text
        assert r.json()["prompt_text"] == "user:q;assistant:get_weather;tool:sunny#c1;"
        for bad, param in (
                (dict(tools=[]), "tools"),
                (dict(tool_choice="required"), "tool_choice"),
                (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}),
                 "tool_choice"),
                (dict(tools=[WEATHER], tool_choice="required",
                      response_format={"type": "json_object"}), "tool_choice"),
                (dict(tools=[WEATHER], tool_choice="sometimes"), "tool_choice")):
            r = await client.post("/v1/chat/completions", json=_chat(**bad))
            assert r.status_code == 400, (bad, r.text)
            assert r.json()["error"]["param"].startswith(param), r.text


async def test_required_and_named_choices_are_forced_by_a_schema():
    from tests.router.test_api_fields import recording_deployment

    async with recording_deployment() as (client, prefill, decode):
        await client.post("/v1/chat/completions", json=_chat(tools=[WEATHER, TIME], tool_choice="required",
                                                             parallel_tool_calls=False))
        schema = json.loads(prefill.requests[-1].sampling.structured.json)
        assert schema == tool_calls.required_schema([WEATHER, TIME], False)
        assert decode.requests[-1].sampling.structured == prefill.requests[-1].sampling.structured
        await client.post("/v1/chat/completions", json=_chat(
            tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_weather"}}))
        assert json.loads(prefill.requests[-1].sampling.structured.json) == WEATHER["function"]["parameters"]
        await client.post("/v1/chat/completions", json=_chat(tools=[WEATHER]))
        assert prefill.requests[-1].sampling.structured is None  # auto: the model is free
