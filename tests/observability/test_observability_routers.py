"""The Grafana dashboard with several router replicas (the Serve ingress scaled out): every
replica is scraped on its own, and each panel aggregates across them.

- Request metrics (counters, histograms, the 60 s window gauges) are per replica: each
  replica counts the requests it served, so they are summed; a ratio (attainment) is
  recomputed from summed counters, never added.
- Worker gauges (per instance) are the same worker's numbers seen by every replica: the
  dashboard takes their max by instance, not a sum.
- KV transfer records are handed to whichever replica polls a worker first (the worker's
  `stats()` hands over its records since the last poll), so each is counted once in all:
  summed, they are exact.
"""

from __future__ import annotations

import asyncio
import re

import httpx
import pytest

from cluster.config import ServeConfig, SLOConfig
from cluster.tiny_model import ensure_tiny_model
from router.build import build_router
from router.metrics import SLIDING_WINDOW_S, Metrics
from router.tokenizer import ModelTokenizer
from tests.fakes import FakeDecodeWorker, FakePrefillWorker
from tests.observability.support import Scrape, completion, num_judged, serving, wait_ready, wait_until
from tests.observability.test_observability_grafana import all_panels, load_dashboard

AGGREGATION = r"\b(sum|max|min|avg)\b(\s+by\s*\([^)]*\))?\s*\(\s*"


def _gauges() -> set[str]:
    return {f.name for f in Metrics(SLOConfig(), num_units=1).registry.collect() if f.type == "gauge"}


def test_every_gauge_on_the_dashboard_is_aggregated_across_router_replicas():
    """A bare per-replica gauge would draw one line per router replica (or, in a stat
    panel, pick one): each must sit directly inside sum/max/min/avg, unless the target's
    legend names the replica ({{instance}}), a deliberate per-replica line."""
    gauges = _gauges()
    checked = 0
    for panel in all_panels(load_dashboard()):
        for target in panel.get("targets", []):
            expr, legend = target["expr"], target.get("legendFormat", "")
            for gauge in gauges:
                for m in re.finditer(rf"\b{gauge}\b", expr):
                    checked += 1
                    if "{{instance}}" in legend:
                        continue
                    assert re.search(AGGREGATION + "$", expr[:m.start()]), (
                        f"panel {panel['title']!r}: {gauge} is not aggregated across router "
                        f"replicas in {expr!r}")
    assert checked >= 10


def test_per_replica_ratio_gauges_are_recomputed_from_counters():
    """The stat panels show cluster-wide figures: attainment from the summed counters."""
    stats = {p["title"]: [t["expr"] for t in p["targets"]] for p in all_panels(load_dashboard())
             if p["type"] == "stat"}
    [attainment] = [exprs for title, exprs in stats.items() if "attainment" in title.lower()]
    assert all("pdserve_slo_attainment_ratio" not in e for e in attainment)
    assert any("sum(increase(pdserve_slo_met_total" in e and "sum(increase(pdserve_slo_requests_total" in e
               for e in attainment)


async def _two_routers_over_one_pool() -> tuple[list[Scrape], int]:
    """Two router replicas over the same fake workers (as Serve's ingress replicas share
    the engine replicas); 3 requests through one, 2 through the other. Returns both
    scrapes and the number of goodput units."""
    prefills = [FakePrefillWorker("prefill-0")]
    decodes = [FakeDecodeWorker("decode-0", prefills=prefills)]
    config = ServeConfig.model_validate({"slo": {"ttft_s": 10.0, "tpot_s": 1.0},
                                         "router": {"stats_interval_s": 0.05}})
    tokenizer = ModelTokenizer(ensure_tiny_model("tiny"))
    routers = [build_router(config, tokenizer, "pdserve-tiny", prefill=prefills, decode=decodes)
               for _ in range(2)]
    for _, deps in routers:
        deps.metrics.started_s -= SLIDING_WINDOW_S  # both up for a whole window
    scrapes = []
    async with serving(routers[0][0]) as url_a, serving(routers[1][0]) as url_b:
        for url, n in ((url_a, 3), (url_b, 2)):
            async with httpx.AsyncClient(base_url=url, timeout=10) as one:
                await wait_ready(one)
                for _ in range(n):
                    r = await one.post("/v1/completions", json=completion([11, 12, 13], 4))
                    assert r.status_code == 200
        async with httpx.AsyncClient(timeout=10) as client:
            await wait_until(lambda: sum(num_judged(d) for _, d in routers) == 5, what="5 judged")

            async def scrape_both() -> list[Scrape]:
                return [Scrape((await client.get(f"{u}/metrics")).text) for u in (url_a, url_b)]

            for _ in range(200):  # transfer records arrive with a stats poll of either router
                scrapes = await scrape_both()
                if sum(s.sum("pdserve_kv_transfers_total", direction="fetch") for s in scrapes) >= 5:
                    break
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.2)  # a few more polls: nothing is counted twice
            scrapes = await scrape_both()
    return scrapes, routers[0][1].metrics.num_units


def test_summed_replica_series_equal_the_whole_deployment():
    scrapes, units = asyncio.run(_two_routers_over_one_pool())
    a, b = scrapes

    def summed(name: str, **labels: str) -> float:
        return sum(s.sum(name, **labels) for s in scrapes)

    # Each replica's window holds only its own requests: 3 and 2.
    assert a.sum("pdserve_goodput_requests_per_second") * SLIDING_WINDOW_S == pytest.approx(3)
    assert b.sum("pdserve_goodput_requests_per_second") * SLIDING_WINDOW_S == pytest.approx(2)
    assert summed("pdserve_goodput_requests_per_second") * SLIDING_WINDOW_S == pytest.approx(5)
    assert summed("pdserve_throughput_requests_per_second") * SLIDING_WINDOW_S == pytest.approx(5)
    # Every replica divides by the same routed units, so the per-unit figures add up too.
    assert (summed("pdserve_goodput_per_unit_requests_per_second") * SLIDING_WINDOW_S * units
            == pytest.approx(5))
    assert summed("pdserve_slo_met_total") / summed("pdserve_slo_requests_total") == 1.0
    assert summed("pdserve_request_ttft_seconds_count") == 5
    # Each KV fetch went to one replica's metrics only.
    assert summed("pdserve_kv_transfers_total", direction="fetch", outcome="ok") == 5
    # Worker gauges: the same instance seen by both (max, not sum, on the dashboard).
    for s in scrapes:
        assert s.value("pdserve_instances", role="decode", state="ready") == 1
