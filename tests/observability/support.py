"""Shared helpers of the observability tests: a fake deployment with the dashboard, a real
loopback server, and a parsed view of a Prometheus scrape."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from router.metrics import SLIDING_WINDOW_S
from tests.fakes import make_fake_deployment, serving  # noqa: F401 (re-exported)

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL = "pdserve-tiny"


def deployment_with_dashboard(mode: str = "disaggregated", **kwargs):
    """`make_fake_deployment` with its dashboard routes, as if the router had been up for a
    full sliding window (so window gauges divide by exactly SLIDING_WINDOW_S)."""
    app, deps, prefills, decodes = make_fake_deployment(mode, **kwargs)
    assert any(getattr(route, "path", None) == "/dashboard/data" for route in app.routes)
    deps.metrics.started_s -= SLIDING_WINDOW_S
    return app, deps, prefills, decodes


def in_process_client(app) -> httpx.AsyncClient:
    """ASGI client: no lifespan, so no stats polling; call `deps.pool.refresh()` yourself."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://pdserve",
                             timeout=10)


async def wait_until(predicate: Callable[[], object], timeout_s: float = 5.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await asyncio.sleep(0.01)


async def wait_ready(client: httpx.AsyncClient) -> None:
    for _ in range(500):
        if (await client.get("/health")).status_code == 200:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("router never became ready")


def num_judged(deps) -> float:
    """Requests judged against the SLO so far (accounting runs just after each response)."""
    return sum(s.value for family in deps.metrics.slo_requests.collect()
               for s in family.samples if s.name.endswith("_total"))


def completion(prompt, max_tokens: int, stream: bool = False) -> dict:
    return {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
            "stream": stream}


class Scrape:
    """A Prometheus text exposition, parsed: sample values by name and labels."""

    def __init__(self, text: str):
        self.text = text
        self.samples: dict[tuple[str, frozenset], float] = {}
        self.families: dict[str, str] = {}  # family name -> type
        for family in text_string_to_metric_families(text):
            self.families[family.name] = family.type
            for s in family.samples:
                self.samples[(s.name, frozenset(s.labels.items()))] = s.value

    @property
    def sample_names(self) -> set[str]:
        return {name for name, _ in self.samples}

    def value(self, name: str, **labels: str) -> float:
        """The sample with exactly these labels; 0.0 if it was never exported (a labelled
        counter has no series until first incremented)."""
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def sum(self, name: str, **labels: str) -> float:
        """Sum over all series of `name` whose labels include `labels`."""
        want = set(labels.items())
        return sum(v for (n, ls), v in self.samples.items() if n == name and want <= ls)


async def scrape(client: httpx.AsyncClient) -> Scrape:
    resp = await client.get("/metrics")
    assert resp.status_code == 200
    return Scrape(resp.text)
