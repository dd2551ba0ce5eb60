"""The router over zero-latency workers (bench/router_alone.py): in process and over channels."""

import asyncio
import json

import httpx
import pytest

from bench.router_alone import _channel_workers, build_app
from tests.fakes import serving


async def _stream(url: str, max_tokens: int) -> tuple[str, dict]:
    body = {"model": "pdserve-tiny", "prompt": "hello world", "max_tokens": max_tokens,
            "stream": True, "stream_options": {"include_usage": True}}
    text, usage = "", {}
    async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
        async with client.stream("POST", url + "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk["choices"]:
                    text += choice["text"]
    return text, usage


async def _run(app, max_tokens: int = 7):
    async with serving(app) as url:
        for _ in range(100):  # the pool polls stats before it routes
            async with httpx.AsyncClient(trust_env=False) as c:
                if (await c.get(url + "/health")).status_code == 200:
                    break
            await asyncio.sleep(0.05)
        return await _stream(url, max_tokens)


@pytest.mark.parametrize("mode", ["colocated", "disaggregated"])
def test_zero_latency_router_streams_every_token(mode):
    text, usage = asyncio.run(_run(build_app(mode, 1)))
    assert usage["completion_tokens"] == 7 and text


def test_channel_workers_give_the_same_output():
    in_process, _ = asyncio.run(_run(build_app("disaggregated", 1)))
    workers = _channel_workers("disaggregated", 1, core=None)
    over_channel, usage = asyncio.run(_run(build_app("disaggregated", 1, workers=workers)))
    assert over_channel == in_process and usage["completion_tokens"] == 7
