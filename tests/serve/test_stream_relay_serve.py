"""The stream relay on a real Ray Serve deployment (fake engines): a router replica
SIGKILLed while it streams. Every stream still ends with `data: [DONE]` (complete, or the
relay's error event after the tokens already sent), and the other router replica takes
every request that follows. Without the relay the same kill cuts the streams
(bench/results/faults-cpu-2core)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.net import free_port

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

ROOT = Path(__file__).resolve().parents[2]
APP = "pdserve-relay-kill"
NUM_STREAMS = 6


def _router_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"ServeReplica:{APP}:router"], capture_output=True, text=True)
    return [int(pid) for pid in out.stdout.split()]


def _stream(url: str, results: list, first_token: threading.Event) -> None:
    body = {"model": "pdserve-tiny", "prompt": "a long answer", "max_tokens": 400,
            "temperature": 0, "stream": True}
    events = []
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[len("data: "):])
                    first_token.set()
        results.append(("ended", events))
    except httpx.HTTPError as e:
        results.append((f"cut: {type(e).__name__}", events))


def test_a_router_replica_killed_mid_stream_behind_the_relay(monkeypatch):
    from cluster.config import ServeConfig
    from pdserve.serve_app import build_application, parse_args
    from pdserve.serving import direct_ingress_env

    port = free_port()
    config = {"prefill": {"num_instances": 1}, "decode": {"num_instances": 1},
              "router": {"port": port, "stats_interval_s": 0.1},
              "ray": {"app_name": APP, "drain_timeout_s": 5, "router_replicas": 2,
                      "stream_relay": True}}
    for key, value in direct_ingress_env(ServeConfig.model_validate(config)).items():
        monkeypatch.setenv(key, value)  # the relay replicas serve router.port and up
    monkeypatch.setenv("PDSERVE_FAKE_TOKEN_DELAY_S", "0.02")  # 400 tokens: ~8 s a stream
    ray.init(num_cpus=8, include_dashboard=False, namespace=APP, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT),
                                       "PDSERVE_FAKE_TOKEN_DELAY_S": "0.02"}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
        serve.run(build_application(parse_args(config),
                                    worker_factory="tests.serve.fake_workers:make_worker"),
                  name=APP, route_prefix="/", external_scaler_enabled=True)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        assert len(_router_pids()) == 2
        results: list = []
        started = [threading.Event() for _ in range(NUM_STREAMS)]
        threads = [threading.Thread(target=_stream, args=(url, results, e)) for e in started]
        for t in threads:
            t.start()
        assert all(e.wait(30) for e in started), "streams did not start"
        victim = _router_pids()[0]
        os.kill(victim, signal.SIGKILL)
        # While it is being replaced, every new request is answered by the other replica.
        after = [httpx.post(f"{url}/v1/completions", timeout=30, json={
            "model": "pdserve-tiny", "prompt": "hello", "max_tokens": 4}).status_code
            for _ in range(10)]
        for t in threads:
            t.join(60)
        print(f"\nkilled router replica {victim}; streams: "
              f"{[(how, len(ev), ev[-2][:60] if len(ev) > 1 else ev) for how, ev in results]}; "
              f"requests after the kill: {after}")
        assert after == [200] * 10
        assert len(results) == NUM_STREAMS
        assert all(how == "ended" for how, _ in results), results  # none cut
        assert all(ev[-1] == "[DONE]" for _, ev in results)
        lost = [ev for _, ev in results if "error" in json.loads(ev[-2])]
        complete = [ev for _, ev in results if "error" not in json.loads(ev[-2])]
        assert lost, "no stream was on the killed replica (the test did not test anything)"
        for ev in lost:
            assert json.loads(ev[-2])["error"]["type"] == "service_unavailable"
            assert all("choices" in json.loads(e) for e in ev[:-2])  # tokens, then the error
        for ev in complete:
            assert json.loads(ev[-2])["choices"][0]["finish_reason"] == "length"
    finally:
        serve.shutdown()
        ray.shutdown()
