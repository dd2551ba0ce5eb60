"""Disaggregated serving with real vLLM engines on the CPU (the tiny embedded model)."""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from kvtransfer.staging import list_segments

pytestmark = pytest.mark.engine
MODEL = "pdserve-tiny"


def complete(url: str, prompt, **kw) -> dict:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 24, "temperature": 0,
            "return_token_ids": True, **kw}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def varied_prompts() -> list[list[int]]:
    """Token-id prompts: single token, inside one block, exactly one and two blocks (the CPU
    backend uses 32-token blocks, 16 on some GPUs), just past a boundary, and long ones."""
    rng = random.Random(1234)
    lengths = [1, 7, 16, 32, 33, 64, 100, 257, 600, 31]
    return [[0] + [rng.randrange(6, 1800) for _ in range(n - 1)] for n in lengths]


def metric_value(url: str, name: str, **labels) -> float:
    text = httpx.get(f"{url}/metrics").text
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_disaggregated_is_token_identical_to_colocated_and_kv_moved(live_engines):
    prompts = varied_prompts()
    loads_before = metric_value(live_engines.disagg_url, "pdserve_kv_transfers_total",
                                direction="load", outcome="ok")
    with ThreadPoolExecutor(len(prompts)) as pool:  # concurrent, as a real load would be
        disagg = list(pool.map(lambda p: complete(live_engines.disagg_url, p), prompts))
        coloc = list(pool.map(lambda p: complete(live_engines.coloc_url, p), prompts))
    for p, d, c in zip(prompts, disagg, coloc):
        assert d["choices"][0]["token_ids"] == c["choices"][0]["token_ids"], f"prompt of {len(p)} tokens"
        assert d["choices"][0]["text"] == c["choices"][0]["text"]
        assert d["usage"]["completion_tokens"] == len(d["choices"][0]["token_ids"])
    # Evidence that the KV moved: decode computed exactly one prompt token (prefill's first
    # output token); the rest was loaded from prefill's staged KV.
    for p, d in zip(prompts, disagg):
        trace = httpx.get(f"{live_engines.disagg_url}/v1/requests/{d['id']}/trace").json()
        if trace["served_by"] == "prefill_only":
            continue  # ended at its first token (EOS): nothing to hand off
        assert trace["served_by"] == "transferred", trace
        assert trace["num_prompt_tokens_computed_on_decode"] == 1, trace
    time.sleep(0.5)  # connector statistics arrive with the next stats poll
    loads_after = metric_value(live_engines.disagg_url, "pdserve_kv_transfers_total",
                               direction="load", outcome="ok")
    num_decoded = sum(1 for d in disagg if len(d["choices"][0]["token_ids"]) > 1)
    assert loads_after - loads_before == num_decoded
    assert list_segments(live_engines.staging_dir) == [], "staged KV left behind"


def test_seeded_sampling_is_reproducible(live_engines):
    kw = dict(temperature=1.0, top_p=0.9, seed=7, max_tokens=16)
    a = complete(live_engines.disagg_url, "the cache and the queue", **kw)
    b = complete(live_engines.disagg_url, "the cache and the queue", **kw)
    assert a["choices"][0]["token_ids"] == b["choices"][0]["token_ids"]
    c = complete(live_engines.disagg_url, "the cache and the queue", **{**kw, "seed": 8})
    assert c["choices"][0]["token_ids"] != a["choices"][0]["token_ids"]


def _kv_usage(live_engines) -> dict[str, float]:
    stats = {role: live_engines.call(w.stats()) for role, w in live_engines.workers.items()}
    return {role: s.kv_cache_usage for role, s in stats.items()}


def test_cancelled_stream_returns_kv_blocks_to_baseline(live_engines):
    url = live_engines.disagg_url
    # Baseline after a completed request (the stat logger reports after every step).
    complete(url, "warm up", max_tokens=2)
    baseline = _kv_usage(live_engines)
    assert baseline["prefill"] == 0.0 and baseline["decode"] == 0.0
    with httpx.stream("POST", f"{url}/v1/completions", timeout=60, json={
            "model": MODEL, "prompt": "memory latency throughput " * 40, "max_tokens": 1500,
            "ignore_eos": True, "stream": True}) as r:
        seen = 0
        for line in r.iter_lines():
            if line.startswith("data: {"):
                seen += 1
            if seen == 20:
                during = _kv_usage(live_engines)
                break  # the client goes away mid-stream
    assert during["decode"] > 0.0, "the request was not decoding when cancelled"
    # After the abort, the next step's stats show the blocks back in the free pool.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        complete(url, "after cancel", max_tokens=2)
        usage = _kv_usage(live_engines)
        if usage["prefill"] == baseline["prefill"] and usage["decode"] == baseline["decode"]:
            break
        time.sleep(0.2)
    assert usage == {**usage, "prefill": baseline["prefill"], "decode": baseline["decode"]}
    assert list_segments(live_engines.staging_dir) == []


def test_bad_inputs_then_success(live_engines):
    url = live_engines.disagg_url
    r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "x " * 3000})
    assert r.status_code == 400 and "maximum context length" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/completions", json={"model": "nope", "prompt": "x"})
    assert r.status_code == 404
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": MODEL, "messages": "hi"})
    assert r.status_code == 400
    r = httpx.post(f"{url}/v1/completions", content=b"{", headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert complete(url, "still fine", max_tokens=3)["usage"]["completion_tokens"] == 3


def test_stop_string_spanning_prefill_and_decode_tokens(live_engines):
    url = live_engines.disagg_url
    full = complete(url, "stop span", max_tokens=12)
    text = full["choices"][0]["text"]
    first_piece_len = len(httpx.post(f"{url}/v1/completions", json={
        "model": MODEL, "prompt": "stop span", "max_tokens": 1, "temperature": 0}).json()["choices"][0]["text"])
    # A stop string starting inside the first token's text and ending in decode's text.
    start = max(0, first_piece_len - 1)
    stop = text[start:start + 3]
    if len(stop) < 2 or first_piece_len == 0:
        pytest.skip("the random model's first tokens are too short for this case")
    r = complete(url, "stop span", max_tokens=12, stop=[stop])
    assert r["choices"][0]["text"] == text[: text.index(stop)]
    assert r["choices"][0]["finish_reason"] == "stop"


def _forced_transport_gives_identical_output(live_engines, transport: str, prompts):
    from cluster.config import KVTransferSettings

    decode = live_engines.workers["decode"]
    shm_settings = decode._kv.settings
    expected = [complete(live_engines.coloc_url, p)["choices"][0]["token_ids"] for p in prompts]
    fetched_before = metric_value(live_engines.disagg_url, "pdserve_kv_transfers_total",
                                  transport=transport, direction="fetch", outcome="ok")
    decode._kv.settings = KVTransferSettings(**{**shm_settings.model_dump(), "transport": transport})
    try:
        got = [complete(live_engines.disagg_url, p) for p in prompts]
    finally:
        decode._kv.settings = shm_settings
    assert [g["choices"][0]["token_ids"] for g in got] == expected
    for g in got:
        trace = httpx.get(f"{live_engines.disagg_url}/v1/requests/{g['id']}/trace").json()
        assert trace["served_by"] in ("transferred", "prefill_only"), trace
    time.sleep(0.5)
    fetched_after = metric_value(live_engines.disagg_url, "pdserve_kv_transfers_total",
                                 transport=transport, direction="fetch", outcome="ok")
    assert fetched_after - fetched_before == sum(1 for g in got if len(g["choices"][0]["token_ids"]) > 1)
    assert list_segments(live_engines.staging_dir) == []


def test_tcp_transport_gives_identical_output(live_engines):
    """Force decode to fetch staged KV over TCP (the cross-host path) instead of mapping
    the producer's shared memory; outputs must not change and nothing may be left behind."""
    _forced_transport_gives_identical_output(live_engines, "tcp", varied_prompts()[3:7])


def test_dist_transport_gives_identical_output(live_engines):
    """The same over torch.distributed (gloo here, NCCL on GPUs): the decode asks the
    prefill's responder through the rendezvous store and receives over their pair group."""
    _forced_transport_gives_identical_output(live_engines, "dist", varied_prompts()[2:6])


def test_grafana_dashboard_queries_only_series_the_real_deployment_exports(live_engines):
    from tests.observability.test_observability_grafana import load_dashboard, referenced_names

    complete(live_engines.disagg_url, "grafana check", max_tokens=4)
    time.sleep(0.5)
    exported = set()
    for line in httpx.get(f"{live_engines.disagg_url}/metrics").text.splitlines():
        if line and not line.startswith("#"):
            exported.add(line.split("{", 1)[0].split(" ", 1)[0])
    missing = sorted(referenced_names(load_dashboard()) - exported)
    assert not missing, f"Grafana queries series a real deployment does not export: {missing}"
