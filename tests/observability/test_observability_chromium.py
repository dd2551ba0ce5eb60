"""The live dashboard in a real browser: headless Chromium against a router under traffic.

Skipped without Chromium (Debian: `apt-get install -y chromium`). With
PDSERVE_SAVE_SCREENSHOT=1 the screenshot refreshes docs/img/dashboard.png, after a 65 s
warm-up that fills the router's 60 s windows (so that run takes ~75 s); otherwise it goes to
a temp dir and the test takes a few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest

from cluster.config import SLOConfig
from tests.observability.support import (
    REPO_ROOT,
    completion,
    deployment_with_dashboard,
    serving,
    wait_ready,
)


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="headless Chromium not found (install it: apt-get update && apt-get install -y chromium)")

SAVE_SCREENSHOT = os.environ.get("PDSERVE_SAVE_SCREENSHOT") == "1"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--hide-scrollbars", "--mute-audio"]


async def run_chromium(user_data_dir: Path, *args: str, timeout_s: float = 60.0) -> str:
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={user_data_dir}", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except asyncio.TimeoutError:
        os.killpg(proc.pid, signal.SIGKILL)  # our own session: chromium and its helpers
        await proc.wait()
        raise AssertionError(f"chromium did not finish within {timeout_s} s")
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode(errors="replace")


class DomIndex(HTMLParser):
    """Attributes, text and descendant tags of every element with an id (and of <body>)."""

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
            "track", "wbr"}

    def __init__(self, html: str):
        super().__init__()
        self.attrs: dict[str, dict[str, str]] = {}
        self.text: dict[str, str] = {}
        self.tags: dict[str, list[str]] = {}
        self._stack: list[tuple[str, str | None]] = []  # (tag, id) of open elements
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        key = "body" if tag == "body" else a.get("id")
        for _, open_id in self._stack:
            if open_id is not None:
                self.tags[open_id].append(tag)
        if key is not None:
            self.attrs[key], self.text[key], self.tags[key] = a, "", []
        if tag not in self.VOID:
            self._stack.append((tag, key))

    def handle_endtag(self, tag):
        for i in range(len(self._stack) - 1, -1, -1):
            if self._stack[i][0] == tag:
                del self._stack[i:]
                return

    def handle_data(self, data):
        for _, open_id in self._stack:
            if open_id is not None:
                self.text[open_id] += data


def parse(html: str) -> DomIndex:
    return DomIndex(html)


async def drive_traffic(client: httpx.AsyncClient, prefills, decodes, stop: asyncio.Event,
                        kv_trouble: asyncio.Event) -> None:
    """Two requests at a time. Prefill and decode speeds vary, so some requests miss an SLO;
    now and then decode loses the KV and recomputes (the fallback the page must show), more
    often once `kv_trouble` is set."""
    rng = random.Random(1)

    async def one() -> None:
        for p in prefills:
            p.delay_s = rng.choice((0.004, 0.008, 0.015, 0.03, 0.06))
        for d in decodes:
            d.token_delay_s = rng.choice((0.002, 0.004, 0.006, 0.015))
            d.lose_kv = rng.random() < (0.15 if kv_trouble.is_set() else 0.03)
        body = completion([11 + rng.randrange(50) for _ in range(rng.randint(4, 40))],
                          rng.randint(2, 12))
        with contextlib.suppress(httpx.HTTPError):
            await client.post("/v1/completions", json=body)

    while not stop.is_set():
        await asyncio.gather(one(), one())
        await asyncio.sleep(0.05)


async def test_dashboard_fills_its_charts_in_headless_chromium(tmp_path):
    app, deps, prefills, decodes = deployment_with_dashboard(
        num_prefill=2, num_decode=2, slo=SLOConfig(ttft_s=0.05, tpot_s=0.01, attainment=0.9))
    screenshot = (REPO_ROOT / "docs" / "img" / "dashboard.png") if SAVE_SCREENSHOT \
        else tmp_path / "dashboard.png"
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    async with serving(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:
        await wait_ready(client)
        # One silent fallback before the page opens: the page must show it.
        for d in decodes:
            d.lose_kv = True
        assert (await client.post("/v1/completions", json=completion([11, 12, 13], 4))).status_code == 200
        for d in decodes:
            d.lose_kv = False
        stop, kv_trouble = asyncio.Event(), asyncio.Event()
        traffic = asyncio.create_task(drive_traffic(client, prefills, decodes, stop, kv_trouble))
        try:
            # For the docs, fill the router's 60 s windows first so the numbers are steady.
            await asyncio.sleep(65.0 if SAVE_SCREENSHOT else 1.0)
            kv_trouble.set()  # while the page watches, a KV-transfer problem starts
            page = f"{url}/dashboard"
            # Virtual time: the page's 1 s polls run back to back, each fetch real.
            early = parse(await run_chromium(tmp_path / "profile-1", "--virtual-time-budget=1500",
                                             "--dump-dom", page))
            late = parse(await run_chromium(tmp_path / "profile-2", "--virtual-time-budget=5000",
                                            "--dump-dom", page))
            await run_chromium(tmp_path / "profile-3", "--window-size=1400,1000",
                               f"--virtual-time-budget={30000 if SAVE_SCREENSHOT else 4000}",
                               f"--screenshot={screenshot}", page)
        finally:
            stop.set()
            await traffic

    early_samples = int(early.attrs["body"]["data-samples"])
    late_samples = int(late.attrs["body"]["data-samples"])
    assert early_samples >= 1
    assert late_samples >= 3 and late_samples > early_samples, (early_samples, late_samples)
    assert "live" in late.text["status"] and f"{late_samples} samples" in late.text["status"]
    # Every time-series chart drew its series from the history.
    for chart in ("ch-goodput", "ch-attainment", "ch-ttft", "ch-tpot", "ch-served",
                  "ch-bandwidth", "ch-transfers", "ch-outcomes", "ch-queue", "ch-kv"):
        assert int(late.attrs[chart].get("data-points", "0")) >= 2, chart
        assert "path" in late.tags.get(chart, []), f"{chart} has no line"
    # SLO lines are drawn and labelled; the fallback is visible.
    assert "SLO 50.0 ms" in late.text["ch-ttft"] and "SLO 10.0 ms" in late.text["ch-tpot"]
    assert "target 90.0%" in late.text["ch-attainment"]
    assert int(late.attrs["body"]["data-recomputed"]) >= 1
    assert "recomputed" in late.text["lg-served"]
    for instance in ("prefill-0", "prefill-1", "decode-0", "decode-1"):
        assert instance in late.text["pool-rows"]
    png = screenshot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
