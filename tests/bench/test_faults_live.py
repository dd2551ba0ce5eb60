"""The fault harness's long form, the parts that read a live deployment: how a request is
classified behind Ray Serve (whose X-Request-Id is not the router's id), a refused
connection, and the idle engines' KV read from the router's stats."""

from __future__ import annotations

import json

import httpx

from bench.faults import Ending, HarnessResult, _engines_idle, one_request


def _sse(request_id: str, token_ids: list[int]) -> str:
    chunks = [{"id": request_id, "choices": [{"index": 0, "text": "x", "token_ids": [t],
                                              "finish_reason": None}]} for t in token_ids]
    chunks[-1]["choices"][0]["finish_reason"] = "length"
    return "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"


def _serve_like(trace: dict, seen: list[str]) -> httpx.MockTransport:
    """A deployment behind Serve's ingress: X-Request-Id is Serve's, the body's id the
    router's; only the router's id has a trace."""

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        if request.url.path == "/v1/completions":
            return httpx.Response(200, text=_sse("cmpl-router-1", [5, 6, 7]),
                                  headers={"x-request-id": "serve-own-id",
                                           "content-type": "text/event-stream"})
        if request.url.path == "/v1/requests/cmpl-router-1/trace":
            return httpx.Response(200, json=trace)
        return httpx.Response(404, json={"error": {"message": "no trace", "type": "x"}})

    return httpx.MockTransport(handle)


async def test_a_migrated_stream_is_found_by_the_body_id_not_serves_request_id():
    seen: list[str] = []
    trace = {"num_migrations": 1, "migrations": [{"reason": "instance_lost"}],
             "num_prefill_retries": 0, "prefill_retry_reasons": []}
    async with httpx.AsyncClient(transport=_serve_like(trace, seen), base_url="http://t") as http:
        ending = await one_request(http, "m", "p", 3, 5.0)
    assert ending.outcome == "migrated" and "instance_lost" in ending.detail
    assert ending.token_ids == [5, 6, 7]
    assert "/v1/requests/serve-own-id/trace" not in seen


async def test_a_retried_prefill_is_labelled_retried():
    seen: list[str] = []
    trace = {"num_migrations": 0, "migrations": [], "num_prefill_retries": 1,
             "prefill_retry_reasons": ["instance_lost"]}
    async with httpx.AsyncClient(transport=_serve_like(trace, seen), base_url="http://t") as http:
        ending = await one_request(http, "m", "p", 3, 5.0)
    assert ending.outcome == "retried" and "instance_lost" in ending.detail


async def test_a_refused_connection_is_a_clean_error_and_a_cut_stream_is_broken():
    def refuse(request):
        raise httpx.ConnectError("connection refused", request=request)

    async with httpx.AsyncClient(transport=httpx.MockTransport(refuse), base_url="http://t") as http:
        ending = await one_request(http, "m", "p", 3, 5.0)
    assert ending.outcome == "clean_error" and "connection refused" in ending.detail

    def cut(request):  # headers and two tokens, then the connection drops
        return httpx.Response(200, text=_sse("cmpl-1", [5, 6, 7]).rsplit("data:", 2)[0])

    async with httpx.AsyncClient(transport=httpx.MockTransport(cut), base_url="http://t") as http:
        ending = await one_request(http, "m", "p", 3, 5.0)
    assert ending.outcome == "broken"


async def test_idle_engines_kv_use_is_read_from_the_routers_stats_and_checked():
    rows = [
        {"instance_id": "p0", "role": "prefill", "is_healthy": True, "kv_cache_usage": 0.0,
         "num_running_reqs": 0, "num_waiting_reqs": 0},
        {"instance_id": "d0", "role": "decode", "is_healthy": True, "kv_cache_usage": 0.03,
         "num_running_reqs": 1, "num_waiting_reqs": 0},
        # A dead instance's last stats are not the live engines'.
        {"instance_id": "d1", "role": "decode", "is_healthy": False, "kv_cache_usage": 0.5,
         "num_running_reqs": 4, "num_waiting_reqs": 0},
    ]
    transport = httpx.MockTransport(lambda r: httpx.Response(200, json={"pool": rows}))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        held, usage = await _engines_idle(http)
    assert held == 1 and usage == {"prefill/p0": 0.0, "decode/d0": 0.03}

    result = HarnessResult("kill-decode", timeout_s=10.0, kv_usage_left=usage,
                           num_tokens_expected=3, left_on_workers=held)
    result.endings = [Ending("complete", "final", 0.1, token_ids=[1, 2, 3]),
                      Ending("migrated", "fault", 0.2, token_ids=[1, 2])]
    checks = result.checks
    assert not checks["no_kv_blocks_left_on_an_engine"]
    assert not checks["every_answer_has_every_token"]  # the migrated answer lost a token
    assert not checks["no_request_left_on_a_worker"]
