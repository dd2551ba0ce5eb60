"""The built-in dashboard: its JSON snapshot after known traffic, and the page it serves."""

from __future__ import annotations

import re

import pytest

from cluster.config import SLOConfig
from router.dashboard import percentile
from tests.observability.support import (
    completion,
    deployment_with_dashboard,
    in_process_client,
    num_judged,
    wait_until,
)


def test_percentile_interpolates_between_ranks():
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 0) == 1.0
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 90) == pytest.approx(90.1)
    assert percentile(values, 100) == 100.0


async def test_snapshot_reports_window_latency_pool_and_counters():
    slo = SLOConfig(ttft_s=1.0, tpot_s=0.005, attainment=0.8)
    app, deps, _, decodes = deployment_with_dashboard(slo=slo, token_delay_s=0.01)
    async with in_process_client(app) as client:
        await deps.pool.refresh()
        # Two one-token answers meet both SLOs; two decoded ones miss TPOT (10 ms > 5 ms);
        # one of those recomputes its prompt on decode.
        for body in (completion([11, 12], 1), completion([11, 12], 1), completion([11, 12], 4)):
            assert (await client.post("/v1/completions", json=body)).status_code == 200
        decodes[0].lose_kv = True
        assert (await client.post("/v1/completions", json=completion([11, 12], 4))).status_code == 200
        await wait_until(lambda: num_judged(deps) == 4, what="4 judged requests")
        await deps.pool.refresh()
        data = (await client.get("/dashboard/data")).json()

    assert data["slo"] == {"ttft_s": 1.0, "tpot_s": 0.005, "attainment": 0.8}
    assert data["attainment"] == pytest.approx(0.5)
    assert data["goodput_rps"] == pytest.approx(2 / data["window_s"])
    assert data["throughput_rps"] == pytest.approx(4 / data["window_s"])
    assert data["goodput_per_unit_rps"] == pytest.approx(2 / data["window_s"] / data["num_units"])
    lat = data["latency"]
    assert lat["ttft_s"]["num_samples"] == 4
    assert lat["tpot_s"]["num_samples"] == 2  # one-token answers have no TPOT
    assert lat["tpot_s"]["p50"] >= 0.01 > slo.tpot_s
    assert lat["ttft_s"]["p50"] <= lat["ttft_s"]["p90"] <= lat["ttft_s"]["p99"] < 1.0
    totals = data["totals"]
    assert totals["slo_requests"] == 4 and totals["slo_met"] == 2
    assert totals["slo_ttft_met"] == 4 and totals["slo_tpot_met"] == 2
    assert totals["served_by"] == {"transferred": 1, "recomputed": 1, "colocated": 0,
                                   "prefill_only": 2}
    assert totals["transfers_by_outcome"] == {"ok": 1, "failed": 1, "expired": 0}
    assert totals["transfer_bytes"] == 4096
    assert totals["requests_by_outcome"] == {"finished": 4}
    pool = {row["instance_id"]: row for row in data["pool"]}
    assert set(pool) == {"prefill-0", "decode-0"}
    assert pool["decode-0"]["role"] == "decode" and pool["decode-0"]["is_available"]
    assert pool["decode-0"]["num_running_reqs"] == 0
    assert pool["decode-0"]["kv_cache_usage"] == 0.0
    assert pool["prefill-0"]["num_staged_segments"] == 0
    assert data["num_in_flight"] == 0


async def test_snapshot_before_any_request_or_poll():
    app, deps, _, _ = deployment_with_dashboard("colocated")
    async with in_process_client(app) as client:
        data = (await client.get("/dashboard/data")).json()
    assert data["throughput_rps"] == 0 and data["latency"]["ttft_s"]["p90"] is None
    # Not polled yet: the instance is listed, its stats are unknown, not zero.
    [row] = data["pool"]
    assert row["role"] == "colocated" and not row["is_available"]
    assert row["num_running_reqs"] is None and row["kv_cache_usage"] is None


async def test_page_and_script_are_served_and_fully_local():
    app, _, _, _ = deployment_with_dashboard()
    async with in_process_client(app) as client:
        page = await client.get("/dashboard")
        script = await client.get("/dashboard/dashboard.js")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert '<script src="dashboard/dashboard.js">' in page.text
    assert "dashboard/data" in script.text
    for text in (page.text, script.text):
        # No CDN, fonts or remote scripts: nothing is fetched from another origin.
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)
        assert "@import" not in text and "fetch(\"http" not in text
    for chart in ("ch-goodput", "ch-attainment", "ch-ttft", "ch-tpot", "ch-served",
                  "ch-bandwidth", "ch-transfers", "ch-queue", "ch-kv"):
        assert f'id="{chart}"' in page.text
