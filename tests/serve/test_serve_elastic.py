"""The Serve application's control plane on a real Ray + Serve, with fake engines: replicas
join routing when ready, pools resize under load without losing a request (removed
replicas drain), and a killed replica is replaced while the router moves its streams to
the other decode and routes around it.

One Ray instance and one deployment for the whole module (Ray and Serve start once)."""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.net import free_port

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

ROOT = Path(__file__).resolve().parents[2]
APP = "pdserve-fakes"
TOKEN_DELAY_S = 0.02
MAX_TOKENS = 16  # ~0.3 s per request with the fake's token delay


def _registry():
    return serve.get_deployment_handle("registry", app_name=APP)


def _entries(role: str | None = None) -> list:
    entries = _registry().snapshot.remote().result()
    return [e for e in entries if role is None or e.role == role]


def _wait(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def app_url():
    from pdserve.serve_app import build_application, parse_args

    port = free_port()
    ray.init(num_cpus=8, include_dashboard=False, namespace="pdserve-test", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT),
                                       "PDSERVE_FAKE_TOKEN_DELAY_S": str(TOKEN_DELAY_S)}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = {"prefill": {"num_instances": 1}, "decode": {"num_instances": 1},
                  "router": {"stats_interval_s": 0.1}, "ray": {"app_name": APP, "drain_timeout_s": 20}}
        serve.run(build_application(parse_args(config), worker_factory="tests.serve.fake_workers:make_worker"),
                  name=APP, route_prefix="/", external_scaler_enabled=True)
        url = f"http://127.0.0.1:{port}"
        _wait(lambda: httpx.get(f"{url}/health", timeout=2).status_code == 200, 60, "/health")
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


def _complete(url: str, prompt: str = "hello", stream: bool = False, max_tokens: int = MAX_TOKENS):
    body = {"model": "pdserve-tiny", "prompt": prompt, "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": stream}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60)


def test_openai_api_through_serve(app_url):
    from openai import OpenAI

    client = OpenAI(base_url=f"{app_url}/v1", api_key="unused")
    plain = client.completions.create(model="pdserve-tiny", prompt="Once", max_tokens=8,
                                      temperature=0, extra_body={"ignore_eos": True})
    assert plain.usage.completion_tokens == 8
    pieces = [c.choices[0].text for c in client.completions.create(
        model="pdserve-tiny", prompt="Once", max_tokens=8, temperature=0, stream=True,
        extra_body={"ignore_eos": True}) if c.choices]
    assert "".join(pieces) == plain.choices[0].text
    [prefill] = _entries("prefill")
    [decode] = _entries("decode")
    assert prefill.address != decode.address and not decode.is_draining


async def _load(url: str, stop: asyncio.Event, outcomes: Counter, concurrency: int = 3) -> None:
    """A bounded closed-loop load: `concurrency` clients, each one request at a time."""
    async with httpx.AsyncClient(timeout=60) as client:
        async def one_client(k: int) -> None:
            n = 0
            while not stop.is_set():
                n += 1
                body = {"model": "pdserve-tiny", "prompt": f"client {k} request {n}",
                        "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
                try:
                    r = await client.post(f"{url}/v1/completions", json=body)
                except httpx.HTTPError as e:
                    outcomes[f"transport error {type(e).__name__}"] += 1
                    continue
                if r.status_code == 200 and r.json()["usage"]["completion_tokens"] == MAX_TOKENS:
                    outcomes["ok"] += 1
                else:
                    outcomes[f"http {r.status_code}"] += 1

        await asyncio.gather(*(one_client(k) for k in range(concurrency)))


def _scale(role: str, n: int) -> None:
    from pdserve.serving import scale

    states = scale(APP, role, n, address=None, namespace="pdserve-test", timeout_s=120)
    assert states == {"RUNNING": n}


def test_scale_up_and_down_under_load_loses_no_request(app_url):
    outcomes: Counter = Counter()
    timeline: list[str] = []

    async def scenario() -> None:
        stop = asyncio.Event()
        load = asyncio.ensure_future(_load(app_url, stop, outcomes))
        await asyncio.sleep(1.0)
        t0 = time.monotonic()
        await asyncio.to_thread(_scale, "decode", 2)
        await asyncio.to_thread(_wait, lambda: len([e for e in _entries("decode") if not e.is_draining]) == 2,
                                30, "the new decode to join")
        timeline.append(f"scale-up to 2 decodes: {time.monotonic() - t0:.1f} s, ok so far {outcomes['ok']}")
        await asyncio.sleep(2.0)
        t0 = time.monotonic()
        await asyncio.to_thread(_scale, "decode", 1)
        timeline.append(f"scale-down to 1 decode: {time.monotonic() - t0:.1f} s, ok so far {outcomes['ok']}")
        await asyncio.sleep(1.0)
        stop.set()
        await load

    before = {e.instance_id for e in _entries("decode")}
    asyncio.run(scenario())
    print("\n" + "\n".join(timeline) + f"\noutcomes: {dict(outcomes)}")
    assert set(outcomes) == {"ok"} and outcomes["ok"] >= 10, dict(outcomes)
    after = _entries("decode")
    # The removed replica drained and withdrew: one live decode is left (Serve chose which).
    assert len(after) == 1 and not after[0].is_draining
    assert len(before) == 1


def _replica_actor(entry):
    from ray.serve._private.constants import SERVE_NAMESPACE

    name = f"SERVE_REPLICA::{APP}#{entry.role}#{entry.replica_id}"
    return ray.get_actor(name, namespace=SERVE_NAMESPACE)


def test_killed_replica_is_replaced_and_routed_around(app_url):
    _scale("decode", 2)
    _wait(lambda: len(_entries("decode")) == 2, 30, "two decodes")
    victim = _entries("decode")[0]
    outcomes: Counter = Counter()
    report: dict = {}

    async def scenario() -> None:
        stop = asyncio.Event()
        load = asyncio.ensure_future(_load(app_url, stop, outcomes))
        await asyncio.sleep(1.0)
        report["ok_before_kill"] = outcomes["ok"]
        killed_at = time.monotonic()
        ray.kill(_replica_actor(victim), no_restart=True)
        survivors = {e.instance_id for e in await asyncio.to_thread(_entries, "decode")} - {victim.instance_id}
        new = await asyncio.to_thread(
            _wait, lambda: [e for e in _entries("decode")
                            if e.instance_id not in survivors | {victim.instance_id}],
            120, "a replacement decode replica")
        report["replaced_after_s"] = time.monotonic() - killed_at
        ok_at_replacement = outcomes["ok"]
        await asyncio.to_thread(_wait, lambda: outcomes["ok"] >= ok_at_replacement + 5, 30,
                                "requests served by the replacement")
        report["replacement"] = new[0].instance_id
        stop.set()
        await load

    asyncio.run(scenario())
    report["outcomes"] = dict(outcomes)
    metrics = httpx.get(f"{app_url}/metrics", timeout=10).text
    report["migrations"] = _counter(metrics, "pdserve_request_migrations_total")
    print(f"\nkilled {victim.instance_id}: {report}")
    # Its registry entry expires (no heartbeat for ENTRY_TTL_S); routers close its channel.
    _wait(lambda: victim.instance_id not in {e.instance_id for e in _entries()}, 15,
          "the dead replica's entry to expire")
    # What the kill did: the streams the dead replica held moved to the other decode
    # (router/recovery.py: continued from the tokens already sent), so no request failed;
    # the other decode took the new ones meanwhile.
    assert set(outcomes) == {"ok"}, dict(outcomes)
    assert outcomes["ok"] > report["ok_before_kill"] + 5
    assert _complete(app_url).status_code == 200


def _counter(metrics_text: str, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for family in text_string_to_metric_families(metrics_text)
               for s in family.samples if s.name == name)


def test_replica_that_cannot_read_the_model_fails_naming_node_and_path(app_url, tmp_path):
    from pdserve.serve_app import build_application, parse_args
    from pdserve.serving import _deployment_messages, _first_cause

    missing = tmp_path / "no-such-model"
    config = parse_args({"model": {"path": str(missing)}, "ray": {"app_name": "bad-model"}})
    with pytest.raises(RuntimeError):
        serve.run(build_application(config, worker_factory="tests.serve.fake_workers:make_worker"),
                  name="bad-model", route_prefix="/bad-model")
    line = _first_cause(_deployment_messages("bad-model"))
    node_ip = ray.util.get_node_ip_address()
    assert "\n" not in line and str(missing) in line and f"on node {node_ip}" in line, line
    serve.delete("bad-model")
