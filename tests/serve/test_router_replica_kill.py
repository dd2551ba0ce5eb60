"""A SIGKILLed router replica under direct ingress (what `pdserve serve` uses) is replaced
and serves router.port again.

With direct ingress the router replica itself listens on router.port, and Serve allocates
that port per replica. A replica killed without a clean shutdown never gives its port back
itself, so the replacement depends on Serve's controller reclaiming it; an early fault-run
attempt saw replacements fail with NoAvailablePortError. This test kills the process for
real (SIGKILL, not `ray.kill`) while clients hold connections to it, and waits for /health
on router.port. Fake engines."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.net import free_port

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

ROOT = Path(__file__).resolve().parents[2]
APP = "pdserve-router-kill"


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _router_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"ServeReplica:{APP}:router"], capture_output=True, text=True)
    return [int(pid) for pid in out.stdout.split()]


def test_sigkilled_router_replica_is_replaced_on_its_port(monkeypatch):
    from cluster.config import ServeConfig
    from pdserve.serve_app import build_application, parse_args
    from pdserve.serving import direct_ingress_env

    port = free_port()
    config = {"prefill": {"num_instances": 1}, "decode": {"num_instances": 1},
              "router": {"port": port, "stats_interval_s": 0.1},
              "ray": {"app_name": APP, "drain_timeout_s": 5}}
    for key, value in direct_ingress_env(ServeConfig.model_validate(config)).items():
        monkeypatch.setenv(key, value)  # read by the raylet and Serve as they start
    ray.init(num_cpus=8, include_dashboard=False, namespace="pdserve-router-kill",
             log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
        serve.run(build_application(parse_args(config),
                                    worker_factory="tests.serve.fake_workers:make_worker"),
                  name=APP, route_prefix="/", external_scaler_enabled=True)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while not _healthy(url) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _healthy(url), "the router replica never served router.port"
        # Clients hold connections to it when it dies, as under load: the kernel keeps the
        # dead listener's accepted sockets on router.port (FIN-WAIT-2) until they close.
        held = []
        for _ in range(3):
            conn = socket.create_connection(("127.0.0.1", port))
            conn.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert b" 200 " in conn.recv(4096)  # accepted, and kept alive
            held.append(conn)
        [victim] = _router_pids()
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        time.sleep(0.5)
        back_after = None
        while time.monotonic() - killed_at < 90:
            if _healthy(url):
                back_after = time.monotonic() - killed_at
                break
            time.sleep(0.25)
        print(f"\nrouter replica {victim} SIGKILLed; router.port served again after {back_after} s")
        assert back_after is not None, "no router replica served router.port within 90 s"
        assert victim not in _router_pids()  # a new process, not the old one coming back
        body = {"model": "pdserve-tiny", "prompt": "hello", "max_tokens": 4, "temperature": 0}
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=30).status_code == 200
        for conn in held:
            conn.close()
    finally:
        serve.shutdown()
        ray.shutdown()
