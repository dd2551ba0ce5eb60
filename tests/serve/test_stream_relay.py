"""The stream relay (pdserve/stream_relay.py) in front of a real router app over fake
workers, without Ray: `forward` runs the router's ASGI app in this process exactly as the
router replica's `relay` method does (run_asgi), and a test makes it lose the router."""

from __future__ import annotations

import asyncio
import contextlib
import json

import httpx

from pdserve.stream_relay import Relay, RelayState, RouterLost, run_asgi
from tests.fakes import assert_nothing_held, make_fake_deployment, serving, settle_pool

MODEL = "pdserve-tiny"
STREAM = {"model": MODEL, "prompt": "a long answer", "max_tokens": 40, "stream": True}


def events(text: str) -> list[str]:
    return [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]


@contextlib.asynccontextmanager
async def relayed(*, lose_after: list[int | None] | None = None, max_body_bytes=1 << 20,
                  **fake_kwargs):
    """A router app over fakes, served directly and through a relay. `lose_after[i]` makes
    forward call i lose the router after that many batches (None: never)."""
    app, deps, prefills, decodes = make_fake_deployment(**fake_kwargs)
    calls: list[int] = []
    outcomes: list[RelayState] = []

    async def forward(request_bytes: bytes):
        plan = lose_after or []
        limit = plan[len(calls)] if len(calls) < len(plan) else None
        calls.append(0)
        if limit == 0:
            raise RouterLost("lost before it answered")
        stream = run_asgi(app, request_bytes)
        try:
            async for batch in stream:
                yield batch
                calls[-1] += 1
                if limit is not None and calls[-1] >= limit:
                    raise RouterLost("lost mid-stream")
        finally:
            await stream.aclose()  # as a dead replica's stream ends: the app sees a disconnect

    relay = Relay(forward, max_body_bytes=max_body_bytes, retry_backoff_s=0.01,
                  on_outcome=outcomes.append)
    async with serving(app) as direct_url, serving(relay) as relay_url:
        async with httpx.AsyncClient(base_url=direct_url, timeout=10) as direct, \
                httpx.AsyncClient(base_url=relay_url, timeout=10) as client:
            for _ in range(200):
                if (await direct.get("/health")).status_code == 200:
                    break
                await asyncio.sleep(0.02)
            yield client, direct, deps, prefills, decodes, calls, outcomes


async def test_a_relayed_request_is_answered_as_a_direct_one():
    async with relayed() as (client, direct, deps, prefills, decodes, calls, outcomes):
        body = {**STREAM, "temperature": 0}
        via_relay = await client.post("/v1/completions", json=body)
        plain = await direct.post("/v1/completions", json=body)
        assert via_relay.status_code == 200
        assert via_relay.headers["content-type"].startswith("text/event-stream")
        texts = [[json.loads(e)["choices"][0]["text"] for e in events(r.text)[:-1]]
                 for r in (via_relay, plain)]
        assert texts[0] == texts[1] and len(texts[0]) > 1
        assert events(via_relay.text)[-1] == "[DONE]"
        whole = await client.post("/v1/completions", json={**body, "stream": False})
        assert whole.json()["choices"][0]["text"] == "".join(texts[1])
        assert (await client.get("/health")).status_code == 200
        assert "pdserve_requests_total" in (await client.get("/metrics")).text
        bad = await client.post("/v1/completions", json={"prompt": "no model"})
        assert bad.status_code == 400 and bad.json()["error"]["message"]
        assert outcomes == [RelayState.ENDED] * 5


async def test_a_router_lost_mid_stream_ends_the_stream_with_an_error_event():
    async with relayed(lose_after=[4], token_delay_s=0.02) as (
            client, direct, deps, prefills, decodes, calls, outcomes):
        r = await client.post("/v1/completions", json=STREAM)
        assert r.status_code == 200
        sent = events(r.text)
        assert sent[-1] == "[DONE]"
        error = json.loads(sent[-2])["error"]
        assert error["type"] == "service_unavailable" and "router replica" in error["message"]
        tokens = [json.loads(e) for e in sent[:-2]]
        assert tokens and all("choices" in t for t in tokens)  # what was sent stands
        assert outcomes == [RelayState.ERROR_EVENT] and calls == [4]
        # The router saw its caller go and aborted the request: nothing is held.
        rid = tokens[0]["id"]
        for _ in range(100):
            if rid in decodes[0].aborted:
                break
            await asyncio.sleep(0.02)
        assert rid in decodes[0].aborted
        await settle_pool(deps.pool)
        assert_nothing_held(deps.pool, prefills, decodes)


async def test_a_router_lost_before_the_response_is_asked_again():
    async with relayed(lose_after=[0, 0, None]) as (
            client, direct, deps, prefills, decodes, calls, outcomes):
        body = {**STREAM, "temperature": 0}
        r = await client.post("/v1/completions", json=body)
        plain = await direct.post("/v1/completions", json=body)
        assert r.status_code == 200 and len(calls) == 3
        assert events(r.text)[-1] == "[DONE]"
        assert ([json.loads(e)["choices"][0]["text"] for e in events(r.text)[:-1]] ==
                [json.loads(e)["choices"][0]["text"] for e in events(plain.text)[:-1]])
        assert outcomes == [RelayState.ENDED]


async def test_no_router_after_every_attempt_is_a_503_with_retry_after():
    async with relayed(lose_after=[0, 0, 0]) as (
            client, direct, deps, prefills, decodes, calls, outcomes):
        r = await client.post("/v1/completions", json=STREAM)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "service_unavailable"
        assert len(calls) == 3 and outcomes == [RelayState.FORWARDED]


async def test_a_body_over_the_limit_gets_413_without_reaching_the_router():
    async with relayed(max_body_bytes=1024) as (
            client, direct, deps, prefills, decodes, calls, outcomes):
        r = await client.post("/v1/completions", json={**STREAM, "prompt": "x" * 2048})
        assert r.status_code == 413 and "1024 bytes" in r.json()["error"]["message"]
        assert calls == []


async def test_a_client_that_leaves_the_relay_aborts_its_request():
    async with relayed(token_delay_s=0.05) as (
            client, direct, deps, prefills, decodes, calls, outcomes):
        async with client.stream("POST", "/v1/completions",
                                 json={**STREAM, "max_tokens": 200}) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: ") and '"text"' in line:
                    break
            rid = json.loads(line[6:])["id"]
        for _ in range(100):
            if rid in decodes[0].aborted:
                break
            await asyncio.sleep(0.02)
        assert rid in decodes[0].aborted
        await settle_pool(deps.pool)
        assert_nothing_held(deps.pool, prefills, decodes)
        assert deps.num_in_flight == 0
