"""The soak command: slopes and verdicts on made-up samples, and a one-minute soak of a
router over fake workers (its own process) with every check of the ten-minute one."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from bench import soak
from bench.soak import Sample, SoakResult

ROOT = Path(__file__).resolve().parents[2]
FAKE_ROUTER = """
import sys, uvicorn
from cluster.config import RouterConfig
from tests.fakes import make_fake_deployment
app, *_ = make_fake_deployment(router_config=RouterConfig(stats_interval_s=0.1),
                               token_delay_s=0.002)
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""


def _sample(t_s, rss, fds=10, segments=0, failed=0) -> Sample:
    return Sample(t_s=t_s, rss_mib={"1 router": rss}, num_fds={"1 router": fds},
                  num_segments=segments, segment_mib=0.0, object_store_mib=None,
                  num_ok=10, num_failed=failed, num_rejected=0)


class _Proc:
    def __init__(self, cmdline):
        self._cmdline = cmdline

    def cmdline(self):
        return self._cmdline


def test_the_gcs_of_a_local_ray_is_found_from_its_gcs_server(tmp_path):
    """`pdserve serve` starts Ray with ray.init(), which publishes no address for `auto`:
    the soak reads the port the GCS wrote into its session directory."""
    session = tmp_path / "session_x"
    session.mkdir()
    (session / "gcs_server_port_abc123").write_text("45057")
    gcs = _Proc(["/x/ray/core/src/ray/gcs/gcs_server", "--gcs_server_port=0",
                 "--node-ip-address=10.1.2.3", f"--session-dir={session}"])
    assert soak.gcs_address([_Proc(["python", "-m", "x"]), gcs]) == "10.1.2.3:45057"
    assert soak.gcs_address([_Proc(["python"])]) is None


def test_object_store_use_is_read_from_rays_memory_summary(monkeypatch):
    internal_api = pytest.importorskip("ray._private.internal_api")
    asked = []

    def summary(address, stats_only):
        asked.append((address, stats_only))
        return "--- Aggregate object store stats across all nodes ---\n" \
               "Plasma memory usage 12.5 MiB, 3 objects, 5.0% full, 0.0% needed\n"

    monkeypatch.setattr(internal_api, "memory_summary", summary)
    token_setup = pytest.importorskip("ray._private.authentication.authentication_token_setup")
    monkeypatch.setattr(token_setup, "maybe_enable_token_auth_if_token_available",
                        lambda warn_if_disabled: asked.append("token") or True)
    assert soak.object_store_mib("10.1.2.3:45057") == 12.5
    # The token is presented first (Ray 2.60's local clusters require it).
    assert asked == ["token", ("10.1.2.3:45057", True)]
    assert soak.object_store_mib(None) is None


def test_slope_is_least_squares_per_minute():
    assert soak.slope_per_min([(0, 1.0), (60, 3.0), (120, 5.0)]) == pytest.approx(2.0)
    assert soak.slope_per_min([(0, 5.0), (60, 5.0)]) == 0.0
    assert soak.slope_per_min([(0, 5.0)]) == 0.0


def test_verdicts_catch_growth_leftover_segments_and_failures_after_warm_up():
    flat = SoakResult(samples=[_sample(0, 50), _sample(60, 80), _sample(120, 80.5),
                               _sample(180, 80.2)])
    soak.judge(flat, max_rss_mib_per_min=2, max_fds_per_min=0.5, max_store_mib_per_min=1)
    assert flat.is_flat  # the jump from the first (warm-up) sample does not count

    leaky = SoakResult(samples=[_sample(t, 50 + t / 10, fds=10 + t // 60) for t in (0, 60, 120, 180)])
    soak.judge(leaky, 2, 0.5, 1)
    assert not leaky.verdicts["rss_mib[1 router]"] and not leaky.verdicts["total_fds"]

    left = SoakResult(samples=[_sample(0, 50), _sample(60, 50), _sample(120, 50, segments=2, failed=1)])
    soak.judge(left, 2, 0.5, 1)
    assert not left.verdicts["no_staged_segment_left"] and not left.verdicts["no_failed_request"]


def test_one_minute_soak_over_fake_workers_is_flat(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen([sys.executable, "-c", FAKE_ROUTER, str(port)], cwd=ROOT, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and server.poll() is None, "fake router did not start"
            time.sleep(0.2)
        out = tmp_path / "soak.json"
        rc = soak.main(["--url", url, "--minutes", "1", "--interval-s", "15", "--concurrency", "2",
                        "--max-tokens", "16", "--pid", str(server.pid), "--staging-dir",
                        str(tmp_path), "--settle-s", "1", "--output", str(out), "--check",
                        # One minute is mostly warm-up (the router keeps its last 10k traces):
                        "--max-rss-mib-per-min", "8"])
        record = json.loads(out.read_text())
        assert len(record["samples"]) >= 5  # t=0, every 15 s, and after the drain
        last = record["samples"][-1]
        assert last["num_ok"] > 50 and last["num_failed"] == 0
        assert list(last["rss_mib"]) and all(v > 10 for v in last["rss_mib"].values())
        assert "total_fds" in record["slopes_per_min"]
        assert rc == 0, record["verdicts"]
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
