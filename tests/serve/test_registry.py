"""Registry entries and the router's membership logic, without Ray: replicas join when
published, leave routing when draining (their requests finish over the open channel),
are closed when withdrawn or expired."""

from __future__ import annotations

import asyncio

from cluster.config import RouterConfig
from pdserve.registry import Registry, ReplicaEntry
from pdserve.replicas import Membership, config_error_line
from router.pool import WorkerPool
from tests.fakes import FakeDecodeWorker, FakePrefillWorker


def _entry(iid: str, role: str, draining: bool = False) -> ReplicaEntry:
    return ReplicaEntry(instance_id=iid, role=role, address=f"10.0.0.1:{abs(hash(iid)) % 60000}",
                        node_id="n1", node_ip="10.0.0.1", replica_id=iid[-4:], is_draining=draining)


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_entries_expire_without_heartbeat_and_draining_sticks():
    clock = _Clock()
    reg = Registry(ttl_s=6.0, clock=clock)
    reg.publish(_entry("decode-a", "decode"))
    reg.publish(_entry("decode-b", "decode"))
    clock.now = 4.0
    reg.publish(_entry("decode-b", "decode"))  # heartbeat
    reg.publish(_entry("decode-a", "decode", draining=True))
    reg.publish(_entry("decode-a", "decode"))  # a stale heartbeat cannot undo draining
    assert [e.is_draining for e in reg.snapshot()] == [True, False]
    clock.now = 10.5  # b last seen at 4.0, a at 4.0: both past 6 s
    reg.publish(_entry("decode-b", "decode"))
    assert [e.instance_id for e in reg.snapshot()] == ["decode-b"]
    reg.withdraw("decode-b")
    assert reg.snapshot() == []


class _Client:
    """A fake worker wrapped as a channel client would be (closable)."""

    def __init__(self, worker) -> None:
        self._worker = worker
        self.instance_id = worker.instance_id
        self.closed = False

    def __getattr__(self, name):
        return getattr(self._worker, name)

    async def close(self) -> None:
        self.closed = True


def test_membership_join_drain_and_leave():
    async def run() -> None:
        pool = WorkerPool(config=RouterConfig())
        made: dict[str, _Client] = {}

        def connect(address, instance_id, role):
            worker = FakePrefillWorker(instance_id) if role == "prefill" else FakeDecodeWorker(instance_id)
            made[instance_id] = _Client(worker)
            return made[instance_id]

        seen = []
        m = Membership(pool, connect, on_change=lambda mem: seen.append(mem.routed_roles()))
        await m.reconcile([_entry("prefill-1", "prefill"), _entry("decode-1", "decode")])
        assert [v.instance_id for v in pool.all()] == ["prefill-1", "decode-1"]
        await pool.refresh()
        assert pool.is_ready()
        # A second decode joins; the first drains: out of routing, channel still open.
        await m.reconcile([_entry("prefill-1", "prefill"), _entry("decode-1", "decode", draining=True),
                           _entry("decode-2", "decode")])
        assert [v.instance_id for v in pool.decode] == ["decode-2"]
        assert not made["decode-1"].closed
        # It withdrew after draining: now its channel closes. The prefill died: expired.
        await m.reconcile([_entry("decode-2", "decode")])
        assert made["decode-1"].closed and made["prefill-1"].closed
        assert [v.instance_id for v in pool.all()] == ["decode-2"]
        assert seen[-1] == {"decode": 1} and seen[1] == {"prefill": 1, "decode": 1}
        await m.close()
        assert made["decode-2"].closed

    asyncio.run(run())


def test_config_error_is_one_line():
    from cluster.config import ConfigError, load_config

    try:
        load_config(None, {"decode": {"num_instances": -1}, "router": {"port": "x"}})
    except ConfigError as e:
        line = config_error_line(e)
    assert "\n" not in line and "decode.num_instances" in line and "router.port" in line
