"""Issue 13 on real engines: logprobs, structured output and output-dependent sampling
across the prefill/decode hop, against the colocated instance of the same model."""

from __future__ import annotations

import json
import re

import httpx
import pytest

pytestmark = pytest.mark.engine
MODEL = "pdserve-tiny"
PROMPT = "the scheduler admits requests while the cache has room " * 3


def post(url: str, path: str, **body) -> dict:
    r = httpx.post(f"{url}{path}", json={"model": MODEL, **body}, timeout=180)
    assert r.status_code == 200, r.text
    return r.json()


def trace(url: str, rid: str) -> dict:
    return httpx.get(f"{url}/v1/requests/{rid}/trace").json()


def sse(url: str, path: str, **body) -> list[dict]:
    r = httpx.post(f"{url}{path}", json={"model": MODEL, "stream": True, **body}, timeout=180)
    assert r.status_code == 200, r.text
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_completion_logprobs_match_colocated(live_engines):
    out = {}
    for mode, url in (("disagg", live_engines.disagg_url), ("coloc", live_engines.coloc_url)):
        out[mode] = post(url, "/v1/completions", prompt=PROMPT, max_tokens=8, temperature=0,
                         logprobs=3, return_token_ids=True)
    d, c = out["disagg"]["choices"][0], out["coloc"]["choices"][0]
    assert trace(live_engines.disagg_url, out["disagg"]["id"])["served_by"] == "transferred"
    assert d["token_ids"] == c["token_ids"]
    dl, cl = d["logprobs"], c["logprobs"]
    assert dl["tokens"] == cl["tokens"] and len(dl["tokens"]) == 8
    assert dl["token_logprobs"] == pytest.approx(cl["token_logprobs"], abs=1e-3)
    for dtop, ctop in zip(dl["top_logprobs"], cl["top_logprobs"]):
        assert 3 <= len(dtop) <= 4 and set(dtop) == set(ctop)
        assert [dtop[k] for k in ctop] == pytest.approx(list(ctop.values()), abs=1e-3)
    # Greedy: every sampled token is its position's most likely one.
    for lp, top in zip(dl["token_logprobs"], dl["top_logprobs"]):
        assert lp == pytest.approx(max(top.values()), abs=1e-6) and lp <= 0
    assert dl["text_offset"][0] == 0


def test_chat_logprobs_streamed_and_whole_agree_across_modes(live_engines):
    body = dict(messages=[{"role": "user", "content": PROMPT}], max_tokens=6, temperature=0,
                logprobs=True, top_logprobs=2)
    whole = post(live_engines.disagg_url, "/v1/chat/completions", **body)
    coloc = post(live_engines.coloc_url, "/v1/chat/completions", **body)
    content = whole["choices"][0]["logprobs"]["content"]
    assert len(content) == 6 == whole["usage"]["completion_tokens"]
    assert [e["token"] for e in content] == [e["token"] for e in coloc["choices"][0]["logprobs"]["content"]]
    for e, ce in zip(content, coloc["choices"][0]["logprobs"]["content"]):
        assert e["logprob"] == pytest.approx(ce["logprob"], abs=1e-3)
        assert len(e["top_logprobs"]) == 2 and e["top_logprobs"][0]["token"] == e["token"]
        assert e["bytes"] == list(e["token"].encode())
    events = sse(live_engines.disagg_url, "/v1/chat/completions", **body)
    streamed = [e for ev in events if ev["choices"] and ev["choices"][0].get("logprobs")
                for e in ev["choices"][0]["logprobs"]["content"]]
    assert [e["token"] for e in streamed] == [e["token"] for e in content]
    assert [e["logprob"] for e in streamed] == pytest.approx([e["logprob"] for e in content], abs=1e-3)


def test_output_dependent_penalties_match_colocated(live_engines):
    """Decode resamples prefill's first token, so it counts as output for the penalties:
    the disaggregated answer is the colocated one."""
    body = dict(prompt=PROMPT, max_tokens=20, temperature=0, frequency_penalty=1.5,
                presence_penalty=0.5, return_token_ids=True)
    d = post(live_engines.disagg_url, "/v1/completions", **body)
    c = post(live_engines.coloc_url, "/v1/completions", **body)
    assert d["choices"][0]["token_ids"] == c["choices"][0]["token_ids"]
    t = trace(live_engines.disagg_url, d["id"])
    assert t["served_by"] == "transferred" and t["decode_instance"] is not None
    # Decode computed one prompt token (the last, again) and loaded the rest.
    assert t["num_prompt_tokens_computed_on_decode"] == 1
    plain = post(live_engines.coloc_url, "/v1/completions", prompt=PROMPT, max_tokens=20,
                 temperature=0, return_token_ids=True)
    assert plain["choices"][0]["token_ids"] != c["choices"][0]["token_ids"], "penalties had no effect"


def test_sampled_output_dependent_request_is_consistent(live_engines):
    """Unseeded temperature sampling with a penalty: the router pins one seed for both
    engines, so decode's resampled first token equals prefill's (else the request fails).
    EOS ignored: an unseeded sample may draw it, which would end the answer early for a
    reason that has nothing to do with the hand-off (seen once in CI: 5 tokens, the last EOS)."""
    for _ in range(3):
        d = post(live_engines.disagg_url, "/v1/completions", prompt=PROMPT, max_tokens=6,
                 temperature=1.0, presence_penalty=1.0, return_token_ids=True, ignore_eos=True)
        assert len(d["choices"][0]["token_ids"]) == 6


@pytest.mark.parametrize("mode", ["disagg", "coloc"])
def test_structured_output_binds_from_the_first_token(live_engines, mode):
    """Random weights: only the constraint makes these answers valid. Sampling at
    temperature 1 so an unconstrained token would show."""
    url = getattr(live_engines, f"{mode}_url")
    regex = "[0-9]{3}-[a-z]{4}"
    for seed in (1, 2):
        r = post(url, "/v1/completions", prompt=PROMPT, max_tokens=20, temperature=1.0, seed=seed,
                 structured_outputs={"regex": regex})
        assert re.fullmatch(regex, r["choices"][0]["text"]), r["choices"][0]["text"]
        if mode == "disagg":
            assert trace(url, r["id"])["decode_instance"] is not None
    r = post(url, "/v1/chat/completions", messages=[{"role": "user", "content": "pick"}],
             max_tokens=20, temperature=1.0, seed=3,
             structured_outputs={"choice": ["alpha beta gamma", "delta epsilon"]})
    assert r["choices"][0]["message"]["content"] in ("alpha beta gamma", "delta epsilon")
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "ok": {"type": "boolean"}},
              "required": ["n", "ok"], "additionalProperties": False}
    r = post(url, "/v1/chat/completions", messages=[{"role": "user", "content": "json"}],
             max_tokens=60, temperature=1.0, seed=4,
             response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}})
    value = json.loads(r["choices"][0]["message"]["content"])
    assert set(value) == {"n", "ok"} and isinstance(value["n"], int) and isinstance(value["ok"], bool)


WEATHER = {"type": "function", "function": {
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                   "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {}, "additionalProperties": False}}}


def _valid_call(call: dict) -> bool:
    name, args = call["function"]["name"], json.loads(call["function"]["arguments"])
    if name == "get_weather":
        return set(args) == {"city"} and isinstance(args["city"], str) and len(args["city"]) <= 12
    return name == "get_time" and args == {}


@pytest.mark.parametrize("mode", ["disagg", "coloc"])
def test_required_and_named_tool_calls_hold_with_random_weights(live_engines, mode):
    """`required` forces a JSON array of calls (vLLM's schema). The grammar binds every
    token but not the answer's length: it admits whitespace between JSON tokens and every
    tokenization of the same text, and a random-weight model at temperature 1 picks among
    them blindly. Measured: seeds 5-10 close the array in 64-87 tokens where the canonical
    encoding of such a call is 33-47; seed 5 needs 87, so the old budget of 80 ended it at
    `length` (the known failure; identical in both modes, and vLLM's own server runs into
    max_tokens at seeds 5-7 too, see test_api_conformance). So: every answer that ends is
    one valid call, one that runs out of budget ends `length` with no calls, both modes walk
    the same tokens (test_required_tool_choice_is_the_same_walk_in_both_modes), and with
    room the seeds close."""
    url = getattr(live_engines, f"{mode}_url")
    messages = [{"role": "user", "content": "what is the weather in Oslo?"}]
    finished = 0
    for seed in range(5, 11):
        r = post(url, "/v1/chat/completions", messages=messages, max_tokens=200, temperature=1.0,
                 seed=seed, tools=[WEATHER, TIME], tool_choice="required",
                 parallel_tool_calls=False, return_token_ids=True)
        choice = r["choices"][0]
        calls = choice["message"].get("tool_calls") or []
        print(f"\n{mode} seed {seed}: {choice['finish_reason']} {len(choice['token_ids'])} tokens "
              f"{json.dumps(calls)[:200]}")
        if choice["finish_reason"] == "tool_calls":
            assert len(calls) == 1 and _valid_call(calls[0]), choice  # parallel_tool_calls false
            finished += 1
        else:
            assert choice["finish_reason"] == "length" and not calls, choice
    assert finished >= 3, f"only {finished} of 6 seeds closed the array within 200 tokens"
    r = post(url, "/v1/chat/completions", messages=messages, max_tokens=60, temperature=1.0,
             seed=6, tools=[WEATHER, TIME],
             tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = r["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["message"]["content"] is None
    call = choice["message"]["tool_calls"][0]
    assert call["function"]["name"] == "get_weather"
    args = json.loads(call["function"]["arguments"])
    assert set(args) == {"city"} and isinstance(args["city"], str) and len(args["city"]) <= 12


def test_required_tool_choice_is_the_same_walk_in_both_modes(live_engines):
    """The hop changes nothing: decode continues the grammar after prefill's first token,
    so at one seed both modes produce the same tokens, including where the walk runs out."""
    messages = [{"role": "user", "content": "what is the weather in Oslo?"}]
    for seed in (5, 6):
        out = [post(url, "/v1/chat/completions", messages=messages, max_tokens=80,
                    temperature=1.0, seed=seed, tools=[WEATHER, TIME], tool_choice="required",
                    parallel_tool_calls=False, return_token_ids=True)["choices"][0]
               for url in (live_engines.disagg_url, live_engines.coloc_url)]
        assert out[0]["token_ids"] == out[1]["token_ids"], seed
        assert out[0]["finish_reason"] == out[1]["finish_reason"], seed
        print(f"\nseed {seed} at 80 tokens: {out[0]['finish_reason']}, "
              f"message {json.dumps(out[0]['message'])[:400]}")
