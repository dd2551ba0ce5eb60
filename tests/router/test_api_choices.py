"""n > 1 over fake workers: one prefill with a claim per choice, n decodes with vLLM's
per-choice seeds, vLLM's response and stream shapes, usage, and clean-up (every path ends
with nothing staged on the prefill and nothing running on a decode)."""

from __future__ import annotations

import asyncio
import json

from tests.router.test_api import MODEL, deployment, sse_events


def _assert_clean(deps, prefills, decodes) -> None:
    assert all(p.staged == {} for p in prefills), "a claim was left staged"
    assert all(d.active == set() for d in decodes)
    assert deps.num_in_flight == 0


async def _settle(deps) -> None:
    for _ in range(100):  # clean-up runs in background tasks
        if deps.num_in_flight == 0:
            return
        await asyncio.sleep(0.02)


async def test_one_prefill_stages_once_and_each_choice_decodes_with_its_own_seed():
    async with deployment() as (client, deps, prefills, decodes):
        r = await client.post("/v1/completions", json={
            "model": MODEL, "prompt": "the cache and the queue", "max_tokens": 5, "n": 3,
            "seed": 10, "temperature": 0.8, "return_token_ids": True})
        assert r.status_code == 200, r.text
        body = r.json()
        prompt_ids = deps.tokenizer.encode("the cache and the queue")
        assert prefills[0].num_prefills == 1
        assert prefills[0].requests[0].num_kv_claims == 3
        reqs = sorted(decodes[0].requests, key=lambda q: q.request_id)
        assert [q.request_id for q in reqs] == [f"{i}_{body['id']}" for i in range(3)]
        assert [q.sampling.seed for q in reqs] == [10, 11, 12]  # vLLM: seed + index
        assert len({q.kv_handle.data for q in reqs}) == 3  # a claim each
        # Decode samples each choice's first token itself: the prompt alone, whole budget.
        assert all(list(q.prompt_token_ids) == prompt_ids for q in reqs)
        assert all(q.sampling.max_tokens == 5 and q.sampling.temperature == 0.8 for q in reqs)
        assert [c["index"] for c in body["choices"]] == [0, 1, 2]
        assert all(len(c["token_ids"]) == 5 and c["finish_reason"] == "length"
                   for c in body["choices"])
        assert body["usage"] == {"prompt_tokens": len(prompt_ids), "completion_tokens": 15,
                                 "total_tokens": len(prompt_ids) + 15}
        await _settle(deps)
        _assert_clean(deps, prefills, decodes)


async def test_without_a_seed_the_choices_draw_independently():
    async with deployment() as (client, deps, prefills, decodes):
        r = await client.post("/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
            "n": 2, "frequency_penalty": 0.5})  # output-dependent: still no shared seed
        assert r.status_code == 200, r.text
        assert [q.sampling.seed for q in decodes[0].requests] == [None, None]
        assert [c["index"] for c in r.json()["choices"]] == [0, 1]
        assert all(c["message"]["role"] == "assistant" for c in r.json()["choices"])
        await _settle(deps)
        _assert_clean(deps, prefills, decodes)


async def test_streamed_chat_choices_carry_their_index_as_vllm_streams_them():
    async with deployment() as (client, deps, prefills, decodes):
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 4, "n": 3, "seed": 1, "temperature": 0.5}
        r = await client.post("/v1/chat/completions", json={
            **body, "stream": True, "stream_options": {"include_usage": True}})
        assert r.status_code == 200, r.text
        events = sse_events(r.text)
        assert len({e["id"] for e in events}) == 1
        # Every choice's role chunk first, then one choice per chunk, usage last.
        assert [(e["choices"][0]["index"], e["choices"][0]["delta"]) for e in events[:3]] == [
            (i, {"role": "assistant", "content": ""}) for i in range(3)]
        with_choice = events[3:-1]
        assert all(len(e["choices"]) == 1 for e in with_choice)
        texts = {i: "" for i in range(3)}
        finishes: dict[int, list] = {i: [] for i in range(3)}
        for e in with_choice:
            c = e["choices"][0]
            texts[c["index"]] += c["delta"].get("content") or ""
            finishes[c["index"]].append(c["finish_reason"])
        for i in range(3):  # one finish per choice, on its last chunk
            assert finishes[i][-1] == "length" and not any(finishes[i][:-1])
        assert events[-1]["choices"] == []
        whole = (await client.post("/v1/chat/completions", json=body)).json()
        assert {c["index"]: c["message"]["content"] for c in whole["choices"]} == texts
        assert events[-1]["usage"] == whole["usage"]
        assert whole["usage"]["completion_tokens"] == 12
        await _settle(deps)
        _assert_clean(deps, prefills, decodes)


async def test_streamed_completions_choices_and_usage():
    async with deployment() as (client, deps, prefills, decodes):
        r = await client.post("/v1/completions", json={
            "model": MODEL, "prompt": "abc", "max_tokens": 3, "n": 2, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
        events = sse_events(r.text)
        indexed = [e for e in events if e["choices"]]
        assert {e["choices"][0]["index"] for e in indexed} == {0, 1}
        assert [e["choices"][0]["finish_reason"] for e in indexed].count("length") == 2
        # continuous usage is per choice (vLLM's), the final usage sums the choices
        assert all(e["usage"]["completion_tokens"] <= 3 for e in indexed)
        assert events[-1]["usage"]["completion_tokens"] == 6
        assert events[-1]["usage"]["prompt_tokens"] == len(deps.tokenizer.encode("abc"))
        await _settle(deps)
        _assert_clean(deps, prefills, decodes)


async def test_colocated_choices_are_requests_with_their_own_seeds():
    async with deployment("colocated") as (client, deps, _, colocated):
        r = await client.post("/v1/completions", json={
            "model": MODEL, "prompt": "abc", "max_tokens": 3, "n": 2, "seed": 7})
        assert r.status_code == 200, r.text
        reqs = sorted(colocated[0].requests, key=lambda q: q.request_id)
        assert [q.sampling.seed for q in reqs] == [7, 8]
        assert all(q.kv_handle is None for q in reqs)
        assert [c["index"] for c in r.json()["choices"]] == [0, 1]
        assert r.json()["usage"]["completion_tokens"] == 6
        await _settle(deps)
        _assert_clean(deps, [], colocated)


async def test_a_client_gone_mid_stream_aborts_every_choice_and_leaves_no_claim():
    async with deployment(token_delay_s=0.05) as (client, deps, prefills, decodes):
        async with client.stream("POST", "/v1/completions", json={
                "model": MODEL, "prompt": "abc", "max_tokens": 200, "n": 3,
                "stream": True}) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: ") and '"text"' in line:
                    break
            rid = json.loads(line[6:])["id"]
        for _ in range(200):
            if len(decodes[0].aborted) == 3:
                break
            await asyncio.sleep(0.02)
        assert sorted(decodes[0].aborted) == [f"{i}_{rid}" for i in range(3)]
        await _settle(deps)
        _assert_clean(deps, prefills, decodes)
        for i in range(3):
            trace = (await client.get(f"/v1/requests/{i}_{rid}/trace")).json()
            assert trace["state"] == "aborted" and trace["path_reason"] == "n_choices"


async def test_a_failed_prefill_fails_the_request_and_leaves_nothing():
    async with deployment() as (client, deps, prefills, decodes):
        prefills[0].fail = True
        r = await client.post("/v1/completions", json={
            "model": MODEL, "prompt": "abc", "max_tokens": 3, "n": 2})
        assert r.status_code == 500 and "prefill failed" in r.json()["error"]["message"]
        assert not decodes[0].requests  # no decode was asked for anything
        await _settle(deps)
        _assert_clean(deps, prefills, decodes)


async def test_a_choice_whose_claim_is_gone_is_recomputed_and_the_rest_still_load():
    async with deployment() as (client, deps, prefills, decodes):
        real_prefill = prefills[0].prefill

        async def prefill_then_lose_one(req):
            result = await real_prefill(req)
            prefills[0].staged.pop(result.kv_claims[1].data)  # claim 1 expired meanwhile
            return result

        prefills[0].prefill = prefill_then_lose_one
        r = await client.post("/v1/completions", json={
            "model": MODEL, "prompt": "abc", "max_tokens": 3, "n": 3, "return_token_ids": True})
        assert r.status_code == 200, r.text
        rid = r.json()["id"]
        served = [(await client.get(f"/v1/requests/{i}_{rid}/trace")).json()["served_by"]
                  for i in range(3)]
        assert served == ["transferred", "recomputed", "transferred"]
        await _settle(deps)
        _assert_clean(deps, prefills, decodes)


async def test_no_decode_available_gives_503_and_releases_every_claim():
    async with deployment() as (client, deps, prefills, decodes):
        for view in deps.pool.decode:
            view.is_healthy = False
        deps.pool.is_ready = lambda: True  # the prefill pool can take it; decodes cannot
        r = await client.post("/v1/completions", json={
            "model": MODEL, "prompt": "abc", "max_tokens": 3, "n": 3})
        assert r.status_code == 503, r.text
        assert prefills[0].num_prefills == 1
        for _ in range(100):
            if prefills[0].staged == {}:
                break
            await asyncio.sleep(0.02)
        await _settle(deps)
        _assert_clean(deps, prefills, decodes)


async def test_a_choice_failing_mid_stream_ends_the_stream_with_an_error_and_aborts_the_rest():
    from cluster.wire import TokenDelta

    async with deployment(token_delay_s=0.02) as (client, deps, prefills, decodes):
        real = decodes[0].generate

        async def one_choice_fails(req):
            async for delta in real(req):
                yield delta
                if req.request_id.startswith("1_"):
                    yield TokenDelta(token_ids=(), error="decode instance lost its engine")
                    return

        decodes[0].generate = one_choice_fails
        r = await client.post("/v1/completions", json={
            "model": MODEL, "prompt": "abc", "max_tokens": 50, "n": 3, "stream": True})
        assert r.status_code == 200
        lines = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert lines[-1] == "[DONE]"
        assert json.loads(lines[-2])["error"]["message"] == "decode instance lost its engine"
        for _ in range(100):
            if len(decodes[0].aborted) >= 2:
                break
            await asyncio.sleep(0.02)
        rid = json.loads(lines[0])["id"]
        assert {f"0_{rid}", f"2_{rid}"} <= set(decodes[0].aborted)
        await _settle(deps)
        _assert_clean(deps, prefills, decodes)
