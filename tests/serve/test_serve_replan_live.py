"""The re-planning loop resizes a live Ray Serve application (issue 16): the router replica
runs the loop of the config's `replan` section, acting, and `ServeActuator` changes the
pools' replica counts through Serve's controller. Fake engines whose decode step grows with
the batch, as the plan's profile says (`a + c*B`); the router, registry, Serve and the loop
are the real ones.

Light traffic on 1 prefill + 2 decodes: the loop drains a decode (Serve stops the replica
it picks after its graceful drain). Then traffic that one decode cannot serve within the
TPOT SLO: the loop adds decodes and the new replicas join routing. No request is lost on
the way."""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import yaml

from tests.net import free_port

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

ROOT = Path(__file__).resolve().parents[2]
APP = "pdserve-replan"
# The fakes' decode step, and the profile the loop plans with: 10 ms + 5 ms per request in
# flight. Sized offline with this profile (TPOT 40 ms at 90%): 3 req/s needs 1 decode,
# 8-10 req/s need 2, 14 need 3.
STEP_MS, PER_REQUEST_MS = 10.0, 5.0
PROFILE = {"pdserve-tiny": {"1": {"prefill": [5.0, 0.0, 0.0],
                                  "decoding_smallbs": [STEP_MS, 0.0, PER_REQUEST_MS],
                                  "decoding_largebs": [STEP_MS, 0.0, PER_REQUEST_MS],
                                  "decoding_large_small_bs_threshold": 10000}}}
SLO = {"ttft_s": 0.5, "tpot_s": 0.04, "attainment": 0.9}
MAX_TOKENS = 16
LIGHT_RPS, HEAVY_RPS = 3.0, 10.0


def _serve_counts() -> dict[str, int]:
    """Replicas of each pool that Serve is running or starting (not stopping)."""
    deployments = serve.status().applications[APP].deployments
    return {role: sum(n for state, n in deployments[role].replica_states.items()
                      if str(state).split(".")[-1] != "STOPPING")
            for role in ("prefill", "decode")}


def _routable(role: str) -> list:
    entries = serve.get_deployment_handle("registry", app_name=APP).snapshot.remote().result()
    return [e for e in entries if e.role == role and not e.is_draining]


async def _wait(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = await asyncio.to_thread(predicate)
        if value:
            return value
        await asyncio.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    from cluster.tiny_model import ensure_tiny_model
    from pdserve.serve_app import build_application, parse_args

    work = tmp_path_factory.mktemp("replan-live")
    (work / "profile.json").write_text(json.dumps(PROFILE))
    plan = work / "plan.yaml"
    plan.write_text(yaml.safe_dump({
        "model": str(ensure_tiny_model("tiny")), "profile": str(work / "profile.json"),
        "profile_model": "pdserve-tiny",
        "workload": {"lengths": {"kind": "fixed", "input_len": 8, "output_len": MAX_TOKENS}},
        "cluster": {"num_nodes": 1, "gpus_per_node": 4},
        "engine": {"framework_overhead": False}}))
    port = free_port()
    ray.init(num_cpus=8, include_dashboard=False, namespace="pdserve-test", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT),
                                       "PDSERVE_FAKE_TOKEN_DELAY_S": str(STEP_MS / 1000),
                                       "PDSERVE_FAKE_TOKEN_DELAY_PER_REQUEST_S": str(PER_REQUEST_MS / 1000)}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = {"prefill": {"num_instances": 1}, "decode": {"num_instances": 2}, "slo": SLO,
                  "router": {"stats_interval_s": 0.1}, "ray": {"app_name": APP, "drain_timeout_s": 20},
                  "replan": {"enabled": True, "observe_only": False, "plan_config": str(plan),
                             "interval_s": 3.0, "window_s": 4.0, "tick_s": 0.5, "min_requests": 10,
                             "prefill": {"min_instances": 1, "max_instances": 1},
                             "decode": {"min_instances": 1, "max_instances": 3}}}
        serve.run(build_application(parse_args(config), worker_factory="tests.serve.fake_workers:make_worker"),
                  name=APP, route_prefix="/", external_scaler_enabled=True)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200 and len(_routable("decode")) == 2:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            raise AssertionError("the application did not come up with 2 decodes in 60 s")
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


async def _open_loop(url: str, rate: float, stop: asyncio.Event, outcomes: Counter) -> None:
    """Poisson arrivals at `rate` until `stop`; every request is awaited to its end."""
    rng = random.Random(0)
    pending: set[asyncio.Task] = set()
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=200)) as client:
        async def one(n: int) -> None:
            body = {"model": "pdserve-tiny", "prompt": f"request {n}", "max_tokens": MAX_TOKENS,
                    "temperature": 0, "ignore_eos": True}
            try:
                r = await client.post(f"{url}/v1/completions", json=body)
            except httpx.HTTPError as e:
                outcomes[f"transport error {type(e).__name__}"] += 1
                return
            ok = r.status_code == 200 and r.json()["usage"]["completion_tokens"] == MAX_TOKENS
            outcomes["ok" if ok else f"http {r.status_code}"] += 1

        n = 0
        while not stop.is_set():
            n += 1
            task = asyncio.ensure_future(one(n))
            pending.add(task)
            task.add_done_callback(pending.discard)
            await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*pending)


def _decisions(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {m.group(1): float(m.group(2)) for m in re.finditer(
        r'^pdserve_replan_decisions_total\{(action="\w+",applied="\w+")\} (\S+)$', text, re.M)}


def test_the_loop_resizes_the_serve_application_under_load(app_url):
    outcomes: Counter = Counter()
    timeline: list[str] = []

    async def phase(rate: float, done, what: str) -> None:
        stop = asyncio.Event()
        load = asyncio.ensure_future(_open_loop(app_url, rate, stop, outcomes))
        t0 = time.monotonic()
        try:
            await _wait(done, 60, what)
            timeline.append(f"{rate:g} req/s: {what} after {time.monotonic() - t0:.1f} s "
                            f"(Serve {await asyncio.to_thread(_serve_counts)})")
            await asyncio.sleep(2.0)  # keep serving on the new size
        finally:
            stop.set()
            await load

    async def scenario() -> None:
        assert await asyncio.to_thread(_serve_counts) == {"prefill": 1, "decode": 2}
        await phase(LIGHT_RPS, lambda: _serve_counts()["decode"] == 1 and len(_routable("decode")) == 1,
                    "one decode left")
        await phase(HEAVY_RPS, lambda: _serve_counts()["decode"] >= 2 and len(_routable("decode")) >= 2,
                    "a decode added and routable")

    asyncio.run(scenario())
    decisions = _decisions(app_url)
    print("\n" + "\n".join(timeline) + f"\noutcomes: {dict(outcomes)}\ndecisions: {decisions}")
    assert set(outcomes) == {"ok"} and outcomes["ok"] >= 30, dict(outcomes)
    assert decisions.get('action="resize",applied="true"', 0) >= 2, decisions
    assert _serve_counts()["prefill"] == 1  # its bounds hold it
