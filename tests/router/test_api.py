"""The OpenAI-compatible router over fake workers: protocol, handoff, errors, cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import json

import httpx

from cluster.config import RouterConfig, SLOConfig
from cluster.wire import WorkerStats
from router.pool import RouteRequest, WorkerPool
from tests.fakes import FakeDecodeWorker, make_fake_deployment, serving

MODEL = "pdserve-tiny"


async def wait_ready(client: httpx.AsyncClient) -> None:
    for _ in range(200):
        if (await client.get("/health")).status_code == 200:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("router never became ready")


@contextlib.asynccontextmanager
async def deployment(mode="disaggregated", **kwargs):
    app, deps, prefills, decodes = make_fake_deployment(mode, **kwargs)
    async with serving(app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            await wait_ready(client)
            yield client, deps, prefills, decodes


def sse_events(text: str) -> list:
    events = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


async def test_models_health_and_completion_usage():
    async with deployment() as (client, deps, prefills, decodes):
        models = (await client.get("/v1/models")).json()
        assert models["data"][0]["id"] == MODEL
        r = await client.post("/v1/completions", json={
            "model": MODEL, "prompt": "the model serves", "max_tokens": 7})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "text_completion"
        assert body["usage"]["completion_tokens"] == 7
        assert body["usage"]["prompt_tokens"] == len(deps.tokenizer.encode("the model serves"))
        assert body["choices"][0]["finish_reason"] == "length"
        # KV was handed off and consumed: nothing left staged on prefill.
        assert prefills[0].staged == {} and prefills[0].num_prefills == 1


async def test_disaggregated_and_colocated_produce_identical_text():
    prompts = ["a b c", "the cache and the queue " * 5, "x", "memory latency throughput " * 11]
    outputs = {}
    for mode in ("disaggregated", "colocated"):
        async with deployment(mode) as (client, *_):
            rs = await asyncio.gather(*(client.post("/v1/completions", json={
                "model": MODEL, "prompt": p, "max_tokens": 12, "temperature": 0}) for p in prompts))
            outputs[mode] = [r.json()["choices"][0]["text"] for r in rs]
    assert outputs["disaggregated"] == outputs["colocated"]
    assert all(outputs["colocated"])


async def test_chat_stream_has_role_content_finish_usage_and_done():
    async with deployment() as (client, *_):
        r = await client.post("/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
            "stream": True, "stream_options": {"include_usage": True}})
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.text)
        assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert events[-2]["choices"][0]["finish_reason"] == "length"
        assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 5
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
        r2 = await client.post("/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5})
        assert r2.json()["choices"][0]["message"]["content"] == text


async def test_stop_string_truncates_and_aborts_decode():
    async with deployment() as (client, deps, prefills, decodes):
        full = (await client.post("/v1/completions", json={
            "model": MODEL, "prompt": "stop test", "max_tokens": 20})).json()["choices"][0]["text"]
        stop = full[len(full) // 2 : len(full) // 2 + 3]
        assert stop.strip(), "fake output too short for this test"
        r = await client.post("/v1/completions", json={
            "model": MODEL, "prompt": "stop test", "max_tokens": 20, "stop": [stop]})
        choice = r.json()["choices"][0]
        assert choice["text"] == full[: full.index(stop)]
        assert choice["finish_reason"] == "stop"
        await asyncio.sleep(0.05)
        assert decodes[0].active == set()
        assert prefills[0].staged == {}


async def test_request_ending_at_first_token_releases_staged_kv():
    async with deployment() as (client, deps, prefills, decodes):
        r = await client.post("/v1/completions", json={
            "model": MODEL, "prompt": "one token", "max_tokens": 1})
        assert r.json()["usage"]["completion_tokens"] == 1
        assert r.json()["choices"][0]["finish_reason"] == "length"
        await asyncio.sleep(0.05)
        assert prefills[0].staged == {}, "staged KV of a prefill-only request leaked"
        trace = (await client.get(f"/v1/requests/{r.json()['id']}/trace")).json()
        assert trace["served_by"] == "prefill_only" and trace["decode_instance"] is None


async def test_client_disconnect_aborts_decode_and_frees_everything():
    async with deployment(token_delay_s=0.05) as (client, deps, prefills, decodes):
        async with client.stream("POST", "/v1/completions", json={
                "model": MODEL, "prompt": "long answer", "max_tokens": 200, "stream": True}) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: ") and '"text"' in line:
                    break
            rid = json.loads(line[6:])["id"]
        for _ in range(100):  # the router notices the disconnect and aborts
            if rid in decodes[0].aborted:
                break
            await asyncio.sleep(0.02)
        assert rid in decodes[0].aborted
        assert decodes[0].active == set() and prefills[0].staged == {}
        trace = (await client.get(f"/v1/requests/{rid}/trace")).json()
        assert trace["state"] == "aborted"
        assert deps.num_in_flight == 0


async def test_bad_inputs_get_openai_errors_and_server_stays_healthy():
    async with deployment() as (client, deps, *_):
        limit = deps.tokenizer.max_model_len
        cases = [
            (dict(content=b"{not json", headers={"content-type": "application/json"}), 400),
            (dict(json={"prompt": "no model"}), 400),
            (dict(json={"model": MODEL, "prompt": "x", "n": 0}), 400),
            (dict(json={"model": MODEL, "prompt": "x", "n": 129}), 400),  # over MAX_CHOICES
            (dict(json={"model": MODEL, "prompt": "x", "best_of": 2}), 400),
            (dict(json={"model": MODEL, "prompt": "x", "n": 2, "temperature": 0}), 400),
            (dict(json={"model": MODEL, "prompt": "x", "temperature": -1}), 400),
            (dict(json={"model": MODEL, "prompt": "x", "max_tokens": 0}), 400),
            (dict(json={"model": MODEL, "prompt": "x", "logprobs": 21}), 400),  # over max_logprobs
            (dict(json={"model": MODEL, "prompt": []}), 400),
            (dict(json={"model": "gpt-7", "prompt": "x"}), 404),
            (dict(json={"model": MODEL, "prompt": "x " * (limit + 10)}), 400),
            (dict(json={"model": MODEL, "prompt": "x", "max_tokens": limit}), 400),
            (dict(json={"model": MODEL, "prompt": ["a", "b"]}), 400),
        ]
        for kwargs, status in cases:
            r = await client.post("/v1/completions", **kwargs)
            assert r.status_code == status, (kwargs, r.text)
            err = r.json()["error"]
            assert err["message"] and err["type"], r.text
        r = await client.post("/v1/chat/completions", json={"model": MODEL, "messages": []})
        assert r.status_code == 400
        r = await client.post("/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "wizard", "content": "x"}]})
        assert r.status_code == 400
        assert (await client.get("/health")).status_code == 200
        ok = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 3})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3


async def test_no_available_decode_gives_503():
    app, deps, prefills, decodes = make_fake_deployment("disaggregated")
    deps.pool.decode.clear()
    async with serving(app) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            await asyncio.sleep(0.1)
            assert (await client.get("/health")).status_code == 503
            r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x"})
            assert r.status_code == 503
            assert r.json()["error"]["type"] == "service_unavailable"


async def test_prefill_failure_is_500_then_recovers():
    async with deployment() as (client, deps, prefills, decodes):
        prefills[0].fail = True
        r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 3})
        assert r.status_code == 500 and "injected prefill failure" in r.json()["error"]["message"]
        prefills[0].fail = False
        r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 3})
        assert r.status_code == 200


async def test_recompute_on_decode_is_visible_in_trace():
    async with deployment() as (client, deps, prefills, decodes):
        decodes[0].lose_kv = True
        r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "abc", "max_tokens": 3})
        trace = (await client.get(f"/v1/requests/{r.json()['id']}/trace")).json()
        assert trace["served_by"] == "recomputed"
        assert trace["num_prompt_tokens_computed_on_decode"] == trace["num_prompt_tokens"] + 1


async def test_prefill_routing_spreads_by_queued_prompt_tokens():
    async with deployment(num_prefill=2, num_decode=2) as (client, deps, prefills, decodes):
        for p in prefills:
            p.delay_s = 0.1
        await asyncio.gather(*(client.post("/v1/completions", json={
            "model": MODEL, "prompt": "same length prompt", "max_tokens": 2}) for _ in range(6)))
        assert [p.num_prefills for p in prefills] == [3, 3]


def test_round_robin_policy_cycles():
    clients = [FakeDecodeWorker(name, role="colocated") for name in ("a", "b", "c")]
    pool = WorkerPool.build(RouterConfig(prefill_policy="round_robin"), colocated=clients)
    for v in pool.colocated:
        v.stats = WorkerStats(instance_id=v.instance_id, role="colocated", is_ready=True,
                              num_running_reqs=0, num_waiting_reqs=0, kv_cache_usage=0.0,
                              num_kv_blocks=100, block_size=16)
    route = RouteRequest((1, 2, 3))
    picks = [pool.pick_prefill(route).instance_id for _ in range(6)]
    assert picks == ["a", "b", "c", "a", "b", "c"]


def test_slo_config_is_used_for_metrics():
    slo = SLOConfig(ttft_s=0.5, tpot_s=0.05, attainment=0.99)
    _, deps, _, _ = make_fake_deployment(slo=slo)
    assert deps.metrics.slo.tpot_s == 0.05
