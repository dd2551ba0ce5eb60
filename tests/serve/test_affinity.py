"""High affinity enacted in routing (no Ray): with `placement.affinity: high`, the router
sends a prompt's decode to a decode instance on the node of the prefill that staged its KV
(the registry says where each replica runs), and falls back to any decode when none on
that node is available. Other affinities leave the choice to the decode policy."""

from __future__ import annotations

import asyncio

import httpx

from cluster.config import RouterConfig, ServeConfig
from cluster.tiny_model import ensure_tiny_model
from pdserve.registry import ReplicaEntry
from pdserve.replicas import Membership
from router.build import build_router
from router.pool import RouteRequest, WorkerPool
from router.tokenizer import ModelTokenizer
from tests.fakes import FakeDecodeWorker, FakePrefillWorker, serving

ROUTE = RouteRequest(tuple(range(40)))


def _pool(prefer_same_node: bool) -> tuple[WorkerPool, dict[str, object]]:
    """Prefills on nodes a and b; decodes on b (listed first, so the policy's tie-break
    picks it) and a."""
    pool = WorkerPool(RouterConfig(prefix_aware_routing=False), prefer_same_node=prefer_same_node)
    views = {}
    for iid, role, node in (("prefill-a", "prefill", "a"), ("prefill-b", "prefill", "b"),
                            ("decode-b", "decode", "b"), ("decode-a", "decode", "a")):
        worker = FakePrefillWorker(iid) if role == "prefill" else FakeDecodeWorker(iid)
        views[iid] = pool.add(worker, role, node_id=node)
    asyncio.run(pool.refresh())
    return pool, views


def test_high_affinity_prefers_a_decode_on_the_prefills_node():
    pool, views = _pool(prefer_same_node=True)
    assert pool.pick_decode(ROUTE, near=views["prefill-a"]).instance_id == "decode-a"
    assert pool.pick_decode(ROUTE, near=views["prefill-b"]).instance_id == "decode-b"
    # Among same-node decodes the policy still decides; a node unknown: any decode.
    views["prefill-a"].node_id = None
    assert pool.pick_decode(ROUTE, near=views["prefill-a"]).instance_id == "decode-b"


def test_high_affinity_falls_back_when_the_node_has_no_available_decode():
    pool, views = _pool(prefer_same_node=True)
    views["decode-a"].is_healthy = False
    assert pool.pick_decode(ROUTE, near=views["prefill-a"]).instance_id == "decode-b"
    views["decode-a"].is_healthy = True
    # Excluded (a migration away from it) counts as unavailable too.
    assert pool.pick_decode(ROUTE, ("decode-a",), near=views["prefill-a"]).instance_id == "decode-b"


def test_without_high_affinity_the_decode_policy_alone_decides():
    pool, views = _pool(prefer_same_node=False)
    assert pool.pick_decode(ROUTE, near=views["prefill-a"]).instance_id == "decode-b"
    # The policy still sees load: decode-b with KV reserved since the last poll loses.
    views["decode-b"].blocks_reserved_since_poll = 50
    assert pool.pick_decode(ROUTE, near=views["prefill-a"]).instance_id == "decode-a"


class _Client:
    """A fake worker as Membership's connect() would return it (a closable client)."""

    def __init__(self, worker) -> None:
        self._worker = worker
        self.instance_id = worker.instance_id

    def __getattr__(self, name):
        return getattr(self._worker, name)

    async def close(self) -> None:
        pass


def _entry(iid: str, role: str, node: str) -> ReplicaEntry:
    return ReplicaEntry(instance_id=iid, role=role, address=f"10.0.0.{node}:1", node_id=f"node-{node}",
                        node_ip=f"10.0.0.{node}", replica_id=iid)


async def _served_nodes(affinity: str) -> list[tuple[str, str, str]]:
    """Requests through the router app over fakes that joined from registry entries on two
    nodes; (served_by, prefill node, decode node) of each request's trace."""
    prefills = [FakePrefillWorker("prefill-1"), FakePrefillWorker("prefill-2")]
    decodes = [FakeDecodeWorker(iid, prefills=prefills) for iid in ("decode-2", "decode-1")]
    workers = {w.instance_id: w for w in prefills + decodes}
    config = ServeConfig.model_validate({"placement": {"affinity": affinity},
                                         "router": {"stats_interval_s": 0.05,
                                                    "prefix_aware_routing": False}})
    app, deps = build_router(config, ModelTokenizer(ensure_tiny_model("tiny")), "pdserve-tiny")
    membership = Membership(deps.pool, lambda address, iid, role: _Client(workers[iid]))
    entries = [_entry("prefill-1", "prefill", "1"), _entry("prefill-2", "prefill", "2"),
               _entry("decode-2", "decode", "2"), _entry("decode-1", "decode", "1")]
    await membership.reconcile(entries)
    node_of = {e.instance_id: e.node_id for e in entries}
    seen = []
    async with serving(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
        while not deps.pool.is_ready():
            await asyncio.sleep(0.02)

        async def one(i: int) -> tuple[str, str, str]:
            r = await client.post("/v1/completions", json={
                "model": "pdserve-tiny", "prompt": f"request {i} " * 8, "max_tokens": 4,
                "ignore_eos": True})
            r.raise_for_status()
            trace = (await client.get(f"/v1/requests/{r.json()['id']}/trace")).json()
            return (trace["served_by"], node_of[trace["prefill_instance"]],
                    node_of[trace["decode_instance"]])

        # Concurrent requests, so that both prefills (least queued prompt tokens) are used.
        for _ in range(3):
            seen += await asyncio.gather(*(one(i) for i in range(4)))
    await membership.close()
    return seen


def test_router_with_high_affinity_keeps_each_request_on_its_prefills_node():
    seen = asyncio.run(_served_nodes("high"))
    assert {served_by for served_by, _, _ in seen} == {"transferred"}
    assert {p for _, p, _ in seen} == {"node-1", "node-2"}  # both prefills (nodes) served
    assert all(p == d for _, p, d in seen), seen


def test_router_without_affinity_lets_requests_cross_nodes():
    seen = asyncio.run(_served_nodes("any"))
    assert any(p != d for _, p, d in seen), seen
