"""`pdserve plan --from-metrics URL`: the real router's /metrics served on loopback."""

from __future__ import annotations

import argparse
import http.server
import threading
import time
from types import SimpleNamespace

import pytest
from prometheus_client import generate_latest

from cluster.config import SLOConfig
from cluster.planner import cli
from cluster.planner.live import LiveMetricsError, live_figures, parse_prometheus_text
from router.handoff import RequestState, RequestTrace
from router.metrics import Metrics

SLO = SLOConfig(ttft_s=0.2, tpot_s=0.04, attainment=0.9)


def _router_metrics_text(num_requests=40) -> str:
    """What a live router exports after serving `num_requests` 300-token prompts with
    20-token answers (TTFT 50 ms, TPOT 10 ms), with 2 prefill and 1 decode instance."""
    m = Metrics(SLO, num_units=3)
    now = time.time()
    for i in range(num_requests):
        t = RequestTrace(f"r{i}", num_prompt_tokens=300, arrival_s=now - 5 + 0.1 * i)
        t.num_output_tokens = 20
        t.events["first_token"] = t.arrival_s + 0.05
        t.events["finish"] = t.arrival_s + 0.05 + 19 * 0.01
        t.state = RequestState.FINISHED
        m.record_request(t)
    m.refresh_windows()
    views = [SimpleNamespace(role=r, instance_id=f"{r}{i}", is_available=True, is_healthy=True, stats=None)
             for r, n in (("prefill", 2), ("decode", 1)) for i in range(n)]
    m.record_pool(views)
    return generate_latest(m.registry).decode()


@pytest.fixture
def metrics_url():
    body = _router_metrics_text().encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            ok = self.path == "/metrics"
            self.send_response(200 if ok else 404)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.end_headers()
            if ok:
                self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_live_figures_from_the_router_text():
    f = live_figures(parse_prometheus_text(_router_metrics_text()))
    assert f.num_requests == 40 and f.mean_prompt_tokens == 300 and f.mean_output_tokens == 20
    assert f.arrival_rate_rps > 0 and f.attainment == 1.0
    assert (f.ttft_target_s, f.tpot_target_s, f.attainment_target) == (0.2, 0.04, 0.9)
    assert f.mean_ttft_s == pytest.approx(0.05) and f.mean_tpot_s == pytest.approx(0.01)
    assert f.instances == {"decode": 1, "prefill": 2}


def test_bad_metrics_say_what_is_wrong():
    with pytest.raises(LiveMetricsError, match="not Prometheus text"):
        parse_prometheus_text("this is { not metrics")
    with pytest.raises(LiveMetricsError, match="lack pdserve_requests_total"):
        live_figures(parse_prometheus_text("up 1\n"))


def _run(argv):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return cli.run(parser.parse_args(argv))


def test_plan_from_metrics_over_loopback(metrics_url, synthetic_profile_path, tiny_model_dir, capsys):
    code = _run(["--from-metrics", f"{metrics_url}/metrics", "--model", str(tiny_model_dir),
                 "--profile", str(synthetic_profile_path), "--nodes", "1", "--gpus-per-node", "4",
                 "--gpu-memory-gib", "16", "--num-requests", "300", "--num-seeds", "1"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "live deployment at" in out and "prompt mean 300" in out and "2 prefill" in out
    assert "fixed lengths at the means" in out
    assert "fewest GPUs sustaining" in out and "TTFT <= 0.2 s and TPOT <= 0.04 s" in out


def test_unreachable_metrics_url_is_one_line(tiny_model_dir, synthetic_profile_path, capsys):
    code = _run(["--from-metrics", "http://127.0.0.1:9/metrics", "--model", str(tiny_model_dir),
                 "--profile", str(synthetic_profile_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "cannot read metrics" in err
