"""The router's front door over fake workers: API keys (path policy, constant-time compare,
401 in OpenAI format, the openai client), body limits (413), overload (429 + Retry-After),
every rejection counted, and no prompt text in the logs."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import httpx
import openai
import pytest

from cluster.config import RouterConfig, SLOConfig
from router import guard
from tests.fakes import make_fake_deployment, serving

MODEL = "pdserve-tiny"
KEY = "sk-pdserve-test-key-0123456789"
COMPLETION = {"model": MODEL, "prompt": "hello there", "max_tokens": 4}


@contextlib.asynccontextmanager
async def deployment(**router_fields):
    config = RouterConfig(stats_interval_s=0.05, **router_fields)
    app, deps, prefills, decodes = make_fake_deployment(router_config=config)
    async with serving(app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            for _ in range(200):
                if (await client.get("/health")).status_code == 200:
                    break
                await asyncio.sleep(0.02)
            yield client, deps, prefills, url


def rejected(deps, reason: str) -> float:
    return deps.metrics.rejected.labels(reason)._value.get()


def assert_openai_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code
    return err


async def test_without_a_configured_key_nothing_is_checked():
    async with deployment() as (client, deps, *_):
        assert (await client.post("/v1/completions", json=COMPLETION)).status_code == 200
        assert (await client.get("/metrics")).status_code == 200


async def test_api_key_policy_per_path():
    async with deployment(api_key=KEY) as (client, deps, *_):
        good = {"Authorization": f"Bearer {KEY}"}
        for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": KEY},
                        {"Authorization": f"Basic {KEY}"}, {"Authorization": f"Bearer {KEY}x"},
                        {"Authorization": f"Bearer {KEY[:-1]}"}):
            r = await client.post("/v1/completions", json=COMPLETION, headers=headers)
            assert_openai_error(r, 401, "invalid_api_key")
            assert r.headers["www-authenticate"] == "Bearer"
            assert KEY not in r.text
        assert rejected(deps, "unauthorized") == 6

        r = await client.post("/v1/completions", json=COMPLETION, headers=good)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        r = await client.post("/v1/completions", json=COMPLETION,
                              headers={"authorization": f"bearer {KEY}"})  # case-insensitive scheme
        assert r.status_code == 200

        assert (await client.get("/health")).status_code == 200  # always open
        for path in ("/metrics", "/dashboard", "/dashboard/data", "/v1/models", "/openapi.json",
                     "/v1/requests/x/trace"):
            assert (await client.get(path)).status_code == 401, path
        assert (await client.get("/metrics", headers=good)).status_code == 200
        assert (await client.get("/v1/models", headers=good)).status_code == 200


async def test_an_unauthenticated_large_body_still_reads_a_clean_401():
    async with deployment(api_key=KEY) as (client, deps, prefills, _):
        big = {**COMPLETION, "prompt": "x " * 200_000}  # 400 KB, sent before reading
        assert_openai_error(await client.post("/v1/completions", json=big), 401, "invalid_api_key")
        assert prefills[0].num_prefills == 0


async def test_open_metrics_leaves_only_metrics_and_dashboard_open():
    async with deployment(api_key=KEY, open_metrics=True) as (client, *_):
        assert (await client.get("/metrics")).status_code == 200
        assert (await client.get("/dashboard")).status_code == 200
        assert (await client.get("/v1/models")).status_code == 401
        assert (await client.post("/v1/completions", json=COMPLETION)).status_code == 401


async def test_the_openai_client_authenticates_with_its_api_key():
    async with deployment(api_key=KEY) as (client, deps, prefills, url):
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0) as ok:
            chunks = [c async for c in await ok.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                stream=True)]
        assert chunks and chunks[-1].choices[0].finish_reason == "length"
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="sk-wrong",
                                      max_retries=0) as bad:
            with pytest.raises(openai.AuthenticationError) as info:
                await bad.completions.create(model=MODEL, prompt="hi", max_tokens=2)
        assert info.value.status_code == 401 and info.value.code == "invalid_api_key"


def test_keys_are_compared_in_constant_time_on_digests(monkeypatch):
    calls = []
    real = guard.hmac.compare_digest

    def recording(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(guard.hmac, "compare_digest", recording)
    g = guard.Guard(None, api_key=KEY.encode(), open_metrics=False, max_body_bytes=1024,
                    on_reject=lambda _: None)
    assert g.is_authorized([(b"authorization", f"Bearer {KEY}".encode())])
    assert not g.is_authorized([(b"authorization", b"Bearer x")])
    assert not g.is_authorized([(b"authorization", f"Bearer {KEY}".encode())] * 2)  # ambiguous
    assert calls == [(32, 32), (32, 32)]  # equal-length digests: no length leaks


async def test_body_over_the_limit_gets_413_declared_or_streamed():
    async with deployment(max_request_body_bytes=4096) as (client, deps, prefills, _):
        big = {**COMPLETION, "prompt": "x " * 5000}
        err = assert_openai_error(await client.post("/v1/completions", json=big), 413,
                                  "request_too_large")
        assert "4096" in err["message"]

        async def chunks():  # no Content-Length: chunked transfer encoding
            yield b'{"model": "pdserve-tiny", "max_tokens": 2, "prompt": "'
            for _ in range(10):
                yield b"y" * 1000
            yield b'"}'

        r = await client.post("/v1/completions", content=chunks(),
                              headers={"Content-Type": "application/json"})
        assert_openai_error(r, 413, "request_too_large")
        assert rejected(deps, "body_too_large") == 2
        assert prefills[0].num_prefills == 0  # nothing reached a worker
        r = await client.post("/v1/completions", json=COMPLETION)
        assert r.status_code == 200


async def test_a_full_queue_gets_429_with_retry_after_and_recovers():
    async with deployment(max_queued_requests=2) as (client, deps, prefills, _):
        prefills[0].delay_s = 0.5
        rs = await asyncio.gather(*(client.post("/v1/completions", json=COMPLETION)
                                    for _ in range(6)))
        statuses = sorted(r.status_code for r in rs)
        assert statuses == [200, 200, 429, 429, 429, 429]
        for r in rs:
            if r.status_code == 429:
                assert_openai_error(r, 429, "queue_full")
                assert int(r.headers["retry-after"]) >= 1
        assert rejected(deps, "queue_full") == 4
        assert deps.admission.num_queued == 0  # every ticket released
        prefills[0].delay_s = 0.0
        assert (await client.post("/v1/completions", json=COMPLETION)).status_code == 200
        text = (await client.get("/metrics")).text
        assert 'pdserve_requests_rejected_total{reason="queue_full"} 4.0' in text
        assert 'pdserve_requests_rejected_total{reason="ttft_slo"} 0.0' in text


async def test_a_predicted_ttft_far_over_the_slo_gets_429_at_once():
    config = RouterConfig(stats_interval_s=0.05, ttft_reject_factor=3.0)
    app, deps, prefills, _ = make_fake_deployment(router_config=config,
                                                  slo=SLOConfig(ttft_s=0.1, tpot_s=0.1))
    prefills[0].delay_s = 0.2  # a prompt takes 0.2 s: two queued ahead predict 0.6 s > 0.3 s
    async with serving(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:
        while (await client.get("/health")).status_code != 200:
            await asyncio.sleep(0.02)
        assert (await client.post("/v1/completions", json=COMPLETION)).status_code == 200  # measured
        loop = asyncio.get_running_loop()
        started = loop.time()
        rs = await asyncio.gather(*(client.post("/v1/completions", json=COMPLETION)
                                    for _ in range(5)))
        rejected_rs = [r for r in rs if r.status_code == 429]
        assert rejected_rs and any(r.status_code == 200 for r in rs)
        for r in rejected_rs:
            err = assert_openai_error(r, 429, "ttft_slo")
            assert "predicted time to first token" in err["message"]
            assert int(r.headers["retry-after"]) >= 1
        assert loop.time() - started < 2.0  # rejected at once, not after queueing
        assert rejected(deps, "ttft_slo") == len(rejected_rs)


async def test_prompt_text_never_reaches_the_logs(caplog):
    secret_prompt = "my-confidential-prompt-text-4242"
    with caplog.at_level(logging.DEBUG):
        async with deployment() as (client, deps, prefills, _):
            prefills[0].fail = True  # the failure path logs too
            r = await client.post("/v1/completions", json={**COMPLETION, "prompt": secret_prompt})
            assert r.status_code == 500
            prefills[0].fail = False
            for stream in (False, True):
                r = await client.post("/v1/chat/completions", json={
                    "model": MODEL, "stream": stream, "max_tokens": 3,
                    "messages": [{"role": "user", "content": secret_prompt}]})
                assert r.status_code == 200
            r = await client.post("/v1/completions", json={**COMPLETION, "prompt": secret_prompt,
                                                           "max_tokens": 10**9})
            assert r.status_code == 400
    assert caplog.records  # the capture worked (uvicorn and the router did log)
    for record in caplog.records:
        assert secret_prompt not in record.getMessage(), record
