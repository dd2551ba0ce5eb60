"""The built-in live dashboard: ``GET /dashboard`` (a page) and ``GET /dashboard/data`` (JSON).

The page is fully local (no CDN): plain JS in ``router/static/dashboard.js`` polls
``/dashboard/data`` every second, keeps a rolling history in the browser and draws inline
SVG charts. The server keeps no history of its own: each snapshot is computed from what the
router already holds (STYLE.md, principle 9: data first, export second):

- attainment, goodput and throughput over the sliding window (`Metrics.window_summary`);
- TTFT/TPOT percentiles over requests that ended within that window (`deps.traces`, read
  with `request_latencies`, the same definitions the histograms use);
- per-instance load from the pool's latest polled stats;
- cumulative counters (transfers, bytes, served_by, outcomes) read back from the Prometheus
  counters in `deps.metrics`, so the page and ``/metrics`` can never disagree. The browser
  turns them into rates from successive snapshots.

Every handler is ``async def`` on purpose: it runs on the event loop that mutates
`deps.traces`, so iterating it can never race a request finishing.
"""

from __future__ import annotations

import collections
import itertools
import math
import time
from importlib import resources
from typing import TYPE_CHECKING

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response
from prometheus_client import Counter

from router.metrics import SLIDING_WINDOW_S, request_latencies

if TYPE_CHECKING:  # router.app imports this module to mount the routes
    from router.deps import RouterDeps

# Percentiles look at no more than this many of the newest traces: bounds the work per poll
# (one poll a second per open page) at high request rates, where it is still ample.
MAX_RECENT_TRACES = 4000
PERCENTILES = (50, 90, 99)
SERVED_BY = ("transferred", "recomputed", "colocated", "prefill_only")


def _static(name: str) -> str:
    return resources.files("router").joinpath("static").joinpath(name).read_text(encoding="utf-8")


def percentile(sorted_values: list[float], p: float) -> float | None:
    """Linear-interpolated percentile (0 <= p <= 100) of an ascending list; None if empty."""
    if not sorted_values:
        return None
    rank = (len(sorted_values) - 1) * p / 100.0
    lo, hi = math.floor(rank), math.ceil(rank)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (rank - lo)


def counter_totals(counter: Counter, *group_by: str) -> dict[str, float]:
    """A labelled Counter's ``_total`` samples summed by one label (or all into ``""``)."""
    out: dict[str, float] = collections.defaultdict(float)
    for family in counter.collect():
        for sample in family.samples:
            if not sample.name.endswith("_total"):
                continue  # skip `_created`
            key = "/".join(sample.labels.get(label, "") for label in group_by)
            out[key] += sample.value
    return dict(out)


def _latency_summary(values: list[float]) -> dict:
    values.sort()
    summary = {f"p{p}": percentile(values, p) for p in PERCENTILES}
    summary["num_samples"] = len(values)
    return summary


def recent_latencies(traces, now: float, window_s: float = SLIDING_WINDOW_S) -> dict:
    """TTFT/TPOT/e2e percentiles of requests that ended in the last `window_s` seconds.

    `traces` is the router's insertion-ordered map; only requests already accounted for by
    `Metrics.record_request` (which marks ``finish``) are included.
    """
    ttfts: list[float] = []
    tpots: list[float] = []
    e2es: list[float] = []
    newest_first = reversed(traces.values())
    for trace in itertools.islice(newest_first, MAX_RECENT_TRACES):
        finish = trace.events.get("finish")
        if finish is None or finish < now - window_s:
            continue
        ttft, tpot, e2e = request_latencies(trace)
        if ttft is not None:
            ttfts.append(ttft)
        if tpot is not None:
            tpots.append(tpot)
        if e2e is not None:
            e2es.append(e2e)
    return {"ttft_s": _latency_summary(ttfts), "tpot_s": _latency_summary(tpots),
            "e2e_s": _latency_summary(e2es)}


def pool_snapshot(views) -> list[dict]:
    """One row per instance; stats fields are None until the instance has been polled."""
    rows = []
    for v in views:
        s = v.stats
        rows.append({
            "instance_id": v.instance_id, "role": v.role,
            "is_healthy": v.is_healthy, "is_available": v.is_available,
            "num_running_reqs": s.num_running_reqs if s else None,
            "num_waiting_reqs": s.num_waiting_reqs if s else None,
            "queued_prompt_tokens": s.queued_prompt_tokens if s else None,
            "kv_cache_usage": s.kv_cache_usage if s else None,
            "num_staged_segments": s.num_staged_segments if s else None,
            # Router-side accounting: exact now, where stats lag by a poll interval.
            "inflight_requests": v.inflight_requests,
        })
    return rows


def replan_row(d) -> dict:
    """A decision of the re-planning loop (`ScalingDecision`), as the page lists it."""
    return {"time_s": d.time_s, "action": d.action, "applied": d.applied,
            "prefill": list(d.num_prefill), "decode": list(d.num_decode),
            "correction": d.correction, "reason": d.reason}


def dashboard_snapshot(deps: RouterDeps, now: float | None = None) -> dict:
    """Everything the live page draws, as of `now` (wall-clock seconds)."""
    now = time.time() if now is None else now
    m = deps.metrics
    window = m.window_summary(now)
    served = counter_totals(m.served, "served_by")
    transfers = counter_totals(m.transfers, "outcome")
    slo_judged = counter_totals(m.slo_requests)
    return {
        "now_s": now,
        "window_s": window["window_s"],
        "slo": {"ttft_s": deps.slo.ttft_s, "tpot_s": deps.slo.tpot_s,
                "attainment": deps.slo.attainment},
        "unit": m.unit,
        "num_units": m.num_units,
        "attainment": window["attainment"],
        "goodput_rps": window["goodput_rps"],
        "goodput_per_unit_rps": window["goodput_per_unit_rps"],
        "throughput_rps": window["throughput_rps"],
        "num_in_flight": deps.num_in_flight,
        "latency": recent_latencies(deps.traces, now),
        "pool": pool_snapshot(deps.pool.all()),
        "replan": [replan_row(d) for d in reversed(m.recent_replans)],  # newest first
        "totals": {
            "requests_by_outcome": counter_totals(m.requests, "outcome"),
            "slo_requests": slo_judged.get("", 0.0),
            "slo_met": counter_totals(m.slo_met).get("", 0.0),
            "slo_ttft_met": counter_totals(m.slo_ttft_met).get("", 0.0),
            "slo_tpot_met": counter_totals(m.slo_tpot_met).get("", 0.0),
            "served_by": {k: served.get(k, 0.0) for k in SERVED_BY},
            "transfers_by_outcome": {k: transfers.get(k, 0.0) for k in ("ok", "failed", "expired")},
            "transfer_bytes": counter_totals(m.transfer_bytes).get("", 0.0),
            "transfer_seconds": counter_totals(m.transfer_seconds).get("", 0.0),
        },
    }


def dashboard_routes(deps: RouterDeps) -> APIRouter:
    """Routes of the live dashboard over a router's `RouterDeps`."""
    router = APIRouter()
    # Read once: the files ship with the package and do not change while serving.
    page = _static("dashboard.html")
    script = _static("dashboard.js")

    @router.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
    async def dashboard_page():
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})

    @router.get("/dashboard/dashboard.js", include_in_schema=False)
    async def dashboard_script():
        return Response(script, media_type="text/javascript",
                        headers={"Cache-Control": "no-cache"})

    @router.get("/dashboard/data")
    async def dashboard_data():
        return dashboard_snapshot(deps)

    return router
