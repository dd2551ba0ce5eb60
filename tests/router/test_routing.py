"""The router's per-request state machine step by step, prefix-aware routing and
conditional disaggregation, over fake workers. Every abort path ends in a leak check."""

from __future__ import annotations

import asyncio
import contextlib

import httpx
import pytest

from cluster.config import RouterConfig
from cluster.wire import SamplingSpec, WorkerStats, WorkerUnavailable
from router.handoff import TRANSITIONS, Handoff, InvalidTransition, RequestState, RequestTrace
from router.pool import RouteRequest, WorkerPool
from router.prefix import PrefixIndex, block_hashes
from tests.fakes import FakeDecodeWorker, FakePrefillWorker, make_fake_deployment, next_token, serving
from tests.fakes import assert_nothing_held as _assert_nothing_held
from tests.fakes import settle_pool as _settle

MODEL = "pdserve-tiny"


# -- the transition table ---------------------------------------------------------------
def test_every_state_has_its_edges_and_final_states_have_none():
    assert set(TRANSITIONS) == set(RequestState)
    for state, targets in TRANSITIONS.items():
        assert (not targets) == state.is_final
        if not state.is_final:
            assert {RequestState.ABORTED, RequestState.FAILED} <= targets


@pytest.mark.parametrize("start, wrong", [
    (RequestState.QUEUED, RequestState.HANDOFF),
    (RequestState.PREFILLING, RequestState.DECODING),
    (RequestState.GENERATING, RequestState.DECODING),
    (RequestState.FINISHED, RequestState.ABORTED),
    (RequestState.ABORTED, RequestState.FINISHED),
])
def test_a_wrong_move_is_refused(start, wrong):
    trace = RequestTrace("r", 3)
    trace.state = start
    with pytest.raises(InvalidTransition):
        trace.move_to(wrong)
    assert trace.state == start


# -- Handoff step by step -----------------------------------------------------------------
class GatedPrefill(FakePrefillWorker):
    """A prefill that holds each request until the test opens the gate."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate = asyncio.Event()
        self.started = asyncio.Event()

    async def prefill(self, req):
        self.started.set()
        await self.gate.wait()
        return await super().prefill(req)


async def _ready_pool(config: RouterConfig, **clients) -> WorkerPool:
    pool = WorkerPool.build(config, **clients)
    await pool.refresh()
    return pool


def _handoff(pool, max_tokens=6, prompt=(5, 6, 7, 8)):
    trace = RequestTrace("req-1", len(prompt))
    sampling = SamplingSpec(max_tokens=max_tokens, ignore_eos=True)
    return Handoff(pool, frozenset({1}), "req-1", list(prompt), sampling, trace), trace


async def test_handoff_runs_the_whole_disaggregated_path():
    prefill = FakePrefillWorker()
    decode = FakeDecodeWorker(prefills=[prefill])
    pool = await _ready_pool(RouterConfig(), prefill=[prefill], decode=[decode])
    handoff, trace = _handoff(pool)
    seen_states = []
    out = []
    async for delta in handoff.tokens():
        seen_states.append(trace.state)
        out.extend(delta.token_ids)
    assert seen_states[0] == RequestState.HANDOFF
    assert RequestState.DECODING in seen_states
    assert trace.state == RequestState.FINISHED and trace.served_by == "transferred"
    ids = [5, 6, 7, 8]
    for _ in range(6):
        ids.append(next_token(ids))
    assert out == ids[4:]
    await _settle(pool)
    _assert_nothing_held(pool, [prefill], [decode])


async def test_abort_while_queued_no_worker():
    prefill = FakePrefillWorker()
    decode = FakeDecodeWorker(prefills=[prefill])
    pool = WorkerPool.build(RouterConfig(), prefill=[prefill], decode=[decode])  # never polled
    handoff, trace = _handoff(pool)
    with pytest.raises(WorkerUnavailable):
        await handoff.tokens().__anext__()
    assert trace.state == RequestState.ABORTED
    await _settle(pool)
    _assert_nothing_held(pool, [prefill], [decode])


async def test_abort_while_prefilling_aborts_the_prefill():
    prefill = GatedPrefill()
    decode = FakeDecodeWorker(prefills=[prefill])
    pool = await _ready_pool(RouterConfig(), prefill=[prefill], decode=[decode])
    handoff, trace = _handoff(pool)
    tokens = handoff.tokens()
    task = asyncio.ensure_future(tokens.__anext__())
    await prefill.started.wait()
    assert trace.state == RequestState.PREFILLING
    task.cancel()  # the client went away
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await _settle(pool)
    assert trace.state == RequestState.ABORTED
    assert prefill.aborted == ["req-1"]
    prefill.gate.set()  # the engine finishes the prompt anyway; nobody claims it
    _assert_nothing_held(pool, [prefill], [decode])


async def test_abort_at_handoff_releases_the_staged_kv():
    prefill = FakePrefillWorker()
    decode = FakeDecodeWorker(prefills=[prefill])
    pool = await _ready_pool(RouterConfig(), prefill=[prefill], decode=[decode])
    handoff, trace = _handoff(pool)
    tokens = handoff.tokens()
    first = await tokens.__anext__()
    assert trace.state == RequestState.HANDOFF and len(first.token_ids) == 1
    assert len(prefill.staged) == 1  # the router holds the handle
    await tokens.aclose()
    await _settle(pool)
    assert trace.state == RequestState.ABORTED
    assert decode.aborted == []  # decode never saw it
    _assert_nothing_held(pool, [prefill], [decode])


async def test_abort_while_decoding_aborts_the_decode():
    prefill = FakePrefillWorker()
    decode = FakeDecodeWorker(prefills=[prefill], token_delay_s=0.01)
    pool = await _ready_pool(RouterConfig(), prefill=[prefill], decode=[decode])
    handoff, trace = _handoff(pool, max_tokens=100)
    tokens = handoff.tokens()
    await tokens.__anext__()
    await tokens.__anext__()
    assert trace.state == RequestState.DECODING
    await tokens.aclose()
    await _settle(pool)
    assert trace.state == RequestState.ABORTED
    assert decode.aborted == ["req-1"]
    _assert_nothing_held(pool, [prefill], [decode])


async def test_abort_while_generating_colocated():
    coloc = FakeDecodeWorker("colocated-0", role="colocated", token_delay_s=0.01)
    pool = await _ready_pool(RouterConfig(), colocated=[coloc])
    handoff, trace = _handoff(pool, max_tokens=100)
    tokens = handoff.tokens()
    await tokens.__anext__()
    assert trace.state == RequestState.GENERATING
    await tokens.aclose()
    await _settle(pool)
    assert trace.state == RequestState.ABORTED and coloc.aborted == ["req-1"]
    _assert_nothing_held(pool, [], [coloc])


async def test_a_failing_prefill_fails_the_request_and_holds_nothing():
    prefill = FakePrefillWorker(fail=True)
    decode = FakeDecodeWorker(prefills=[prefill])
    pool = await _ready_pool(RouterConfig(), prefill=[prefill], decode=[decode])
    handoff, trace = _handoff(pool)
    from router.handoff import RequestFailed

    with pytest.raises(RequestFailed, match="prefill failed"):
        await handoff.tokens().__anext__()
    await _settle(pool)
    assert trace.state == RequestState.FAILED
    _assert_nothing_held(pool, [prefill], [decode])


# -- prefix-aware routing -----------------------------------------------------------------
def test_block_hashes_chain_over_full_blocks_only():
    a = block_hashes(list(range(40)), 16)
    b = block_hashes(list(range(32)) + [99] * 8, 16)
    c = block_hashes([7] + list(range(1, 40)), 16)
    assert len(a) == 2 and a == b  # the partial third block does not count
    assert c[0] != a[0] and c[1] != a[1]  # a change in block 0 changes every later hash


def test_prefix_index_matches_leading_blocks_and_evicts_lru():
    index = PrefixIndex(capacity_blocks=3)
    chain = block_hashes(list(range(64)), 16)  # 4 blocks
    index.insert(chain[:2])
    assert index.num_matched_blocks(chain) == 2
    index.insert(block_hashes(list(range(100, 132)), 16))  # 2 more blocks: evicts the oldest
    assert len(index) == 3
    assert index.num_matched_blocks(chain) == 0  # the chain's first block is gone


async def test_prefix_aware_routing_returns_a_prompt_to_the_instance_that_holds_it():
    a, b = (FakeDecodeWorker(f"colocated-{i}", role="colocated") for i in range(2))
    pool = await _ready_pool(RouterConfig(), colocated=[a, b])
    shared = tuple(range(100, 164))  # 4 full blocks
    first = pool.pick_prefill(RouteRequest(shared + (1,)))
    first.remember_prefix(RouteRequest(shared + (1,)))
    other = pool.pick_prefill(RouteRequest(tuple(range(500, 564)) + (1,)))
    # A little load on the instance holding the prefix does not outweigh 64 cached tokens.
    pool.begin(first, 16)
    again = pool.pick_prefill(RouteRequest(shared + (2, 3)))
    assert again is first
    assert again.num_cached_tokens(RouteRequest(shared + (2, 3))) == 64
    # Much more load than the cache saves does.
    pool.begin(first, 200)
    assert pool.pick_prefill(RouteRequest(shared + (4,))) is not first
    assert other is first  # with equal load and no cache, ties go to the first instance


async def test_prefix_aware_routing_is_visible_in_metrics_and_off_when_configured():
    app, deps, _, decodes = make_fake_deployment("colocated", num_colocated=2)
    prompt = "the same long system prompt " * 12
    async with serving(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        await _wait_healthy(http)
        for _ in range(4):
            r = await http.post("/v1/completions", json={"model": MODEL, "prompt": prompt,
                                                         "max_tokens": 2})
            assert r.status_code == 200
        text = (await http.get("/metrics")).text
    matched = _metric(text, "pdserve_routing_prefix_matched_tokens_total")
    assert matched > 0
    app2, deps2, _, _ = make_fake_deployment(
        "colocated", num_colocated=2, router_config=RouterConfig(stats_interval_s=0.05,
                                                                 prefix_aware_routing=False))
    assert all(v.prefixes is None for v in deps2.pool.all())


# -- conditional disaggregation -----------------------------------------------------------
async def _wait_healthy(http: httpx.AsyncClient) -> None:
    for _ in range(200):
        if (await http.get("/health")).status_code == 200:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("router never became healthy")


def _metric(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


async def test_short_prompts_are_prefilled_on_decode_with_identical_output():
    cfg = RouterConfig(stats_interval_s=0.05, local_prefill_max_tokens=16)
    texts = {}
    for name, router_config in (("always_disaggregated", RouterConfig(stats_interval_s=0.05)),
                                ("conditional", cfg)):
        app, deps, prefills, decodes = make_fake_deployment("disaggregated", router_config=router_config)
        async with serving(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
            await _wait_healthy(http)
            short = await http.post("/v1/completions", json={"model": MODEL, "prompt": "hi",
                                                             "max_tokens": 8, "ignore_eos": True})
            long = await http.post("/v1/completions", json={
                "model": MODEL, "prompt": "a much longer prompt " * 20, "max_tokens": 8,
                "ignore_eos": True})
            assert short.status_code == long.status_code == 200
            rid = short.json()["id"]
            trace = (await http.get(f"/v1/requests/{rid}/trace")).json()
            metrics_text = (await http.get("/metrics")).text
        texts[name] = (short.json()["choices"][0]["text"], long.json()["choices"][0]["text"])
        if name == "conditional":
            assert trace["path"] == "local_prefill" and trace["path_reason"] == "short_prompt"
            assert trace["served_by"] == "local_prefill" and trace["prefill_instance"] is None
            assert prefills[0].num_prefills == 1  # only the long prompt used the prefill pool
            assert _metric(metrics_text, "pdserve_routing_paths_total", path="local_prefill",
                           reason="short_prompt") == 1
            assert _metric(metrics_text, "pdserve_routing_paths_total", path="disaggregated") == 1
            assert _metric(metrics_text, "pdserve_requests_served_total",
                           served_by="local_prefill") == 1
        else:
            assert trace["path"] == "disaggregated" and prefills[0].num_prefills == 2
        assert all(not p.staged for p in prefills)
    assert texts["conditional"] == texts["always_disaggregated"]


async def test_a_backed_up_prefill_pool_sends_prompts_to_decode_with_room():
    cfg = RouterConfig(stats_interval_s=0.05, local_prefill_queue_tokens=40)
    app, deps, prefills, decodes = make_fake_deployment("disaggregated", router_config=cfg)
    prefills[0].delay_s = 0.3
    prompt = "twelve token prompt here to be routed ok " * 2
    async with serving(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        await _wait_healthy(http)
        rs = await asyncio.gather(*(http.post("/v1/completions", json={
            "model": MODEL, "prompt": prompt, "max_tokens": 4, "ignore_eos": True})
            for _ in range(6)))
        assert all(r.status_code == 200 for r in rs)
        traces = [(await http.get(f"/v1/requests/{r.json()['id']}/trace")).json() for r in rs]
    paths = [(t["path"], t["path_reason"]) for t in traces]
    assert ("disaggregated", "default") in paths
    assert ("local_prefill", "prefill_saturated") in paths
    assert len({r.json()["choices"][0]["text"] for r in rs}) == 1  # same prompt, same greedy text
    assert all(not p.staged for p in prefills)


async def test_draining_instances_take_nothing_new_and_removed_ones_leave_the_pool():
    a, b = (FakeDecodeWorker(f"colocated-{i}", role="colocated") for i in range(2))
    pool = await _ready_pool(RouterConfig(), colocated=[a, b])
    view_a = pool.colocated[0]
    view_a.stats = WorkerStats(**{**{f: getattr(view_a.stats, f) for f in view_a.stats.__struct_fields__},
                                  "is_draining": True})
    route = RouteRequest((1, 2, 3))
    assert all(pool.pick_prefill(route).instance_id == "colocated-1" for _ in range(4))
    assert pool.remove("colocated-1") is not None
    with pytest.raises(WorkerUnavailable):
        pool.pick_prefill(route)
    with pytest.raises(ValueError, match="already"):
        pool.add(a, "colocated")
