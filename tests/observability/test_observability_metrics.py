"""/metrics after a known set of requests through the fake deployment (in-process ASGI)."""

from __future__ import annotations

import asyncio

import pytest

from cluster.config import SLOConfig
from router.metrics import SLIDING_WINDOW_S
from tests.observability.support import (
    completion,
    deployment_with_dashboard,
    in_process_client,
    num_judged,
    scrape,
    wait_until,
)

PROMPT = [11, 12, 13, 14, 15, 16, 17]  # token ids: the prompt length is exact


async def send_all(client, bodies) -> None:
    responses = await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies))
    assert [r.status_code for r in responses] == [200] * len(bodies), [r.text for r in responses]


async def test_known_requests_show_up_in_counters_and_histograms():
    app, deps, prefills, decodes = deployment_with_dashboard()
    async with in_process_client(app) as client:
        await deps.pool.refresh()  # ASGI transport runs no lifespan: poll once by hand
        bodies = [completion(PROMPT, 5) for _ in range(3)]
        bodies += [completion(PROMPT, 3, stream=True), completion(PROMPT, 1)]
        await send_all(client, bodies)
        # Accounting runs in a task right after each response: wait for all five.
        await wait_until(lambda: num_judged(deps) == 5, what="5 judged requests")
        await deps.pool.refresh()  # the decode worker reports its transfers on the next poll
        m = await scrape(client)

    assert m.value("pdserve_requests_total", outcome="finished", finish_reason="length") == 5
    assert m.sum("pdserve_requests_total") == 5
    assert m.value("pdserve_prompt_tokens_total") == 5 * len(PROMPT)
    assert m.value("pdserve_generation_tokens_total") == 3 * 5 + 3 + 1
    # Every request has a TTFT; the one-token answer has no TPOT.
    assert m.value("pdserve_request_ttft_seconds_count") == 5
    assert m.value("pdserve_request_tpot_seconds_count") == 4
    assert m.value("pdserve_request_e2e_seconds_count") == 5
    assert m.value("pdserve_request_prefill_seconds_count") == 5
    assert m.value("pdserve_request_ttft_seconds_bucket", le="+Inf") == 5
    # Fast fakes: everything meets the default SLO (TTFT 1 s, TPOT 0.1 s).
    assert m.value("pdserve_slo_requests_total", slo_class="default") == 5
    assert m.value("pdserve_slo_met_total", slo_class="default") == 5
    assert m.value("pdserve_slo_attainment_ratio") == 1.0
    assert m.value("pdserve_goodput_requests_per_second") == pytest.approx(5 / SLIDING_WINDOW_S)
    assert m.value("pdserve_goodput_per_unit_requests_per_second", unit="instance") == pytest.approx(
        5 / SLIDING_WINDOW_S / 2)
    # Four requests went through decode with transferred KV; one ended at its first token.
    assert m.value("pdserve_requests_served_total", served_by="transferred") == 4
    assert m.value("pdserve_requests_served_total", served_by="prefill_only") == 1
    assert m.value("pdserve_requests_served_total", served_by="recomputed") == 0
    assert m.value("pdserve_kv_transfers_total", transport="shm", direction="fetch", outcome="ok") == 4
    assert m.value("pdserve_kv_transfer_bytes_total", transport="shm", direction="fetch") == 4 * 4096
    assert m.value("pdserve_request_kv_transfer_seconds_count") == 4
    # Pool gauges from the polled stats; the configured SLO targets.
    assert m.value("pdserve_instances", role="prefill", state="ready") == 1
    assert m.value("pdserve_instances", role="decode", state="ready") == 1
    assert m.value("pdserve_instance_running_requests", role="decode", instance_id="decode-0") == 0
    assert m.value("pdserve_instance_staged_kv_segments", instance_id="prefill-0") == 0
    assert m.value("pdserve_slo_target_seconds", kind="ttft") == 1.0
    assert m.value("pdserve_slo_target_seconds", kind="tpot") == 0.1
    assert m.value("pdserve_requests_in_flight") == 0


async def test_slow_decode_is_counted_as_a_tpot_miss():
    # 20 ms per token against a 5 ms TPOT SLO; TTFT (prefill only) stays well within 1 s.
    app, deps, _, _ = deployment_with_dashboard(slo=SLOConfig(ttft_s=1.0, tpot_s=0.005),
                                                token_delay_s=0.02)
    async with in_process_client(app) as client:
        await deps.pool.refresh()
        await send_all(client, [completion(PROMPT, 4)])
        await wait_until(lambda: num_judged(deps) == 1, what="1 judged request")
        m = await scrape(client)

    assert m.value("pdserve_requests_total", outcome="finished", finish_reason="length") == 1
    assert m.value("pdserve_slo_requests_total", slo_class="default") == 1
    assert m.value("pdserve_slo_ttft_met_total", slo_class="default") == 1
    assert m.value("pdserve_slo_tpot_met_total", slo_class="default") == 0
    assert m.value("pdserve_slo_met_total", slo_class="default") == 0
    assert m.value("pdserve_slo_attainment_ratio") == 0.0
    assert m.value("pdserve_goodput_requests_per_second") == 0.0
    assert m.value("pdserve_throughput_requests_per_second") == pytest.approx(1 / SLIDING_WINDOW_S)
    # 3 decode tokens at >= 20 ms each after the first: mean TPOT >= ~20 ms, above the SLO.
    assert m.value("pdserve_request_tpot_seconds_count") == 1
    assert m.value("pdserve_request_tpot_seconds_sum") >= 0.015
    assert m.value("pdserve_request_tpot_seconds_bucket", le="0.005") == 0


async def test_lost_kv_recomputed_on_decode_is_visible():
    app, deps, prefills, decodes = deployment_with_dashboard()
    decodes[0].lose_kv = True  # the handle arrives, the KV does not: decode recomputes
    async with in_process_client(app) as client:
        await deps.pool.refresh()
        await send_all(client, [completion(PROMPT, 4), completion(PROMPT, 4)])
        await wait_until(lambda: num_judged(deps) == 2, what="2 judged requests")
        await deps.pool.refresh()
        m = await scrape(client)
        snapshot = (await client.get("/dashboard/data")).json()

    # The requests still succeed: only these series reveal the fallback.
    assert m.value("pdserve_requests_total", outcome="finished", finish_reason="length") == 2
    assert m.value("pdserve_requests_served_total", served_by="recomputed") == 2
    assert m.value("pdserve_requests_served_total", served_by="transferred") == 0
    assert m.value("pdserve_kv_transfers_total", transport="shm", direction="fetch",
                   outcome="failed") == 2
    assert m.value("pdserve_kv_transfers_total", transport="shm", direction="fetch", outcome="ok") == 0
    assert snapshot["totals"]["served_by"]["recomputed"] == 2
    assert snapshot["totals"]["transfers_by_outcome"]["failed"] == 2
    assert not prefills[0].staged  # the recompute path still frees the staged KV


def test_the_sliding_window_stays_bounded_when_nothing_reads_it(monkeypatch):
    # A router that nobody scrapes (no Prometheus, no dashboard open) still judges every
    # request: the window must forget what is older than SLIDING_WINDOW_S as it goes
    # (it grew by one entry per request until read: a soak found the router growing).
    import types

    import router.metrics as metrics_mod
    from router.metrics import Metrics, RequestSLO

    clock = [1000.0]
    monkeypatch.setattr(metrics_mod, "time", types.SimpleNamespace(time=lambda: clock[0]))
    m = Metrics(SLOConfig(ttft_s=1.0, tpot_s=0.1), num_units=1)
    for _ in range(5000):  # 100 requests per second for 50 s, then 5,000 more over 50 s
        m._judge(RequestSLO(0.1, 0.01, True, True), "default")
        clock[0] += 0.01
    assert len(m._window) == 5000
    for _ in range(5000):
        m._judge(RequestSLO(0.1, 0.01, True, True), "default")
        clock[0] += 0.01
    assert len(m._window) == pytest.approx(SLIDING_WINDOW_S / 0.01, abs=2)
    assert m.window_summary(clock[0])["throughput_rps"] == pytest.approx(100, rel=0.01)
