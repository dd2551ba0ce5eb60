"""deploy/observability/run.sh: one command brings up Prometheus scraping a pdserve router."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

from tests.observability.support import REPO_ROOT

RUN_SH = REPO_ROOT / "deploy" / "observability" / "run.sh"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_help_and_bad_options():
    shown = subprocess.run(["bash", str(RUN_SH), "--help"], capture_output=True, text=True, timeout=10)
    assert shown.returncode == 0 and "--target HOST:PORT" in shown.stdout and "--demo" in shown.stdout
    bad = subprocess.run(["bash", str(RUN_SH), "--bogus"], capture_output=True, text=True, timeout=10)
    assert bad.returncode == 2 and "unknown option" in bad.stderr
    bad = subprocess.run(["bash", str(RUN_SH), "--target", "nonsense"], capture_output=True,
                         text=True, timeout=10)
    assert bad.returncode == 2 and "HOST:PORT" in bad.stderr


@pytest.mark.skipif(shutil.which("prometheus") is None,
                    reason="prometheus not installed (apt-get install -y prometheus)")
def test_demo_router_is_scraped_by_prometheus():
    router_port, prom_port = free_port(), free_port()
    proc = subprocess.Popen(
        ["bash", str(RUN_SH), "--demo", "--no-grafana", "--target", f"127.0.0.1:{router_port}",
         "--prometheus-port", str(prom_port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    query = urllib.parse.urlencode({"query": "pdserve_slo_target_seconds"})
    url = f"http://127.0.0.1:{prom_port}/api/v1/query?{query}"
    result = []
    try:
        deadline = time.monotonic() + 40  # demo start + Prometheus start + first 5 s scrape
        while time.monotonic() < deadline and not result:
            assert proc.poll() is None, proc.stdout.read()
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    result = json.load(resp)["data"]["result"]
            except OSError:
                pass
            time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGTERM)  # run.sh stops what it started and removes its data
        try:
            output, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
    assert result, f"Prometheus never got a sample from the router:\n{output}"
    kinds = {r["metric"]["kind"]: float(r["value"][1]) for r in result}
    assert set(kinds) == {"ttft", "tpot"}
    assert all(r["metric"]["job"] == "pdserve" for r in result)
    assert f"http://127.0.0.1:{router_port}/dashboard" in output
