"""Registry entries and the router's membership logic, without Ray: replicas join when
published, leave routing when draining (their requests finish over the open channel),
are closed when withdrawn, or when expired and their stats poll fails."""

from __future__ import annotations

import asyncio
import time

from cluster.config import RouterConfig
from pdserve.registry import ENTRY_TTL_S, Registry, ReplicaEntry
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
    while clock.now < 10.5:  # the routers' snapshots every 0.5 s; no heartbeat
        clock.now += 0.5
        reg.snapshot()
    assert reg.snapshot() == []  # b last seen at 4.0, a at 4.0: both past 6 s
    reg.publish(_entry("decode-b", "decode"))
    assert [e.instance_id for e in reg.snapshot()] == ["decode-b"]
    reg.withdraw("decode-b")
    assert reg.snapshot() == []


def test_a_held_up_registry_does_not_expire_every_entry_when_it_resumes():
    """No call at all for a while (the registry was held up, its calls queued): the time
    it did not listen does not age the entries; expiry resumes where it stopped."""
    clock = _Clock()
    reg = Registry(ttl_s=6.0, clock=clock)
    reg.publish(_entry("decode-a", "decode"))
    clock.now = 1.0
    reg.publish(_entry("prefill-b", "prefill"))
    clock.now = 32.0  # held up for 31 s; the first queued call is a router's snapshot
    assert [e.instance_id for e in reg.snapshot()] == ["decode-a", "prefill-b"]
    reg.publish(_entry("prefill-b", "prefill"))  # a queued heartbeat; decode-a beats no more
    while clock.now < 37.5:
        clock.now += 0.5
        if clock.now == 36.5:  # decode-a was 1 s old when the gap began: 5.5 s now
            assert [e.instance_id for e in reg.snapshot()] == ["decode-a", "prefill-b"]
        reg.snapshot()
    assert [e.instance_id for e in reg.snapshot()] == ["prefill-b"]


class _Client:
    """A fake worker wrapped as a channel client would be (closable; `is_dead`: its calls
    fail as a closed channel's do)."""

    def __init__(self, worker) -> None:
        self._worker = worker
        self.instance_id = worker.instance_id
        self.closed = False
        self.is_dead = False
        self.num_open = 0  # calls and streams open on the channel

    def __getattr__(self, name):
        return getattr(self._worker, name)

    async def stats(self):
        if self.is_dead:
            raise ConnectionError(f"{self.instance_id} is gone")
        return await self._worker.stats()

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
        # It withdrew after draining: now its channel closes. The prefill died: expired,
        # and its stats poll fails.
        made["prefill-1"].is_dead = True
        await pool.refresh()
        await m.reconcile([_entry("decode-2", "decode")])
        assert made["decode-1"].closed and made["prefill-1"].closed
        assert [v.instance_id for v in pool.all()] == ["decode-2"]
        assert seen[-1] == {"decode": 1} and seen[1] == {"prefill": 1, "decode": 1}
        await m.close()
        assert made["decode-2"].closed

    asyncio.run(run())


def _membership(pool: WorkerPool) -> tuple[Membership, dict[str, _Client]]:
    made: dict[str, _Client] = {}

    def connect(address, instance_id, role):
        worker = FakePrefillWorker(instance_id) if role == "prefill" else FakeDecodeWorker(instance_id)
        made[instance_id] = _Client(worker)
        return made[instance_id]

    return Membership(pool, connect), made


def test_an_instance_missing_from_one_snapshot_stays_while_its_poll_answers():
    """A snapshot that lacks every replica (a held-up registry's catch-up) while each
    still answers its stats poll: nothing is closed, routing goes on, and the next
    snapshot finds the same clients (no re-join)."""
    async def run() -> None:
        pool = WorkerPool(config=RouterConfig())
        m, made = _membership(pool)
        entries = [_entry("prefill-1", "prefill"), _entry("decode-1", "decode")]
        await m.reconcile(entries)
        await pool.refresh()
        await m.reconcile([])
        assert [v.instance_id for v in pool.all()] == ["prefill-1", "decode-1"]
        assert not any(c.closed for c in made.values())
        assert pool.is_ready() and m.routed_roles() == {"prefill": 1, "decode": 1}
        first = dict(made)
        await m.reconcile(entries)
        assert made == first and [v.instance_id for v in pool.all()] == ["prefill-1", "decode-1"]
        await m.close()

    asyncio.run(run())


def test_a_missing_instance_goes_once_its_poll_fails_or_stops_answering():
    async def run() -> None:
        pool = WorkerPool(config=RouterConfig())
        m, made = _membership(pool)
        await m.reconcile([_entry("prefill-1", "prefill"), _entry("decode-1", "decode"),
                           _entry("decode-2", "decode")])
        await pool.refresh()
        # decode-1 died: its channel fails the poll. decode-2's poll last answered longer
        # ago than an entry lives (a hung poller). Both are missing from the registry.
        made["decode-1"].is_dead = True
        await pool.refresh()
        [stale] = [v for v in pool.decode if v.instance_id == "decode-2"]
        stale.polled_at = time.monotonic() - ENTRY_TTL_S - 1
        await m.reconcile([_entry("prefill-1", "prefill")])
        assert made["decode-1"].closed and made["decode-2"].closed
        assert [v.instance_id for v in pool.all()] == ["prefill-1"]
        # One not polled yet counts from its join: kept within ENTRY_TTL_S.
        await m.reconcile([_entry("prefill-1", "prefill"), _entry("decode-3", "decode")])
        await m.reconcile([_entry("prefill-1", "prefill")])
        assert not made["decode-3"].closed
        await m.close()

    asyncio.run(run())


def test_a_draining_instance_missing_from_a_snapshot_is_closed_only_once_its_requests_end(monkeypatch):
    """A held-up registry's snapshot can lack a draining replica that still streams
    requests: its channel stays open until they end (closing it would cut them), and a
    draining replica that holds nothing is closed as soon as it is missing."""
    import types

    import pdserve.replicas as replicas

    async def run() -> None:
        now = [1000.0]
        monkeypatch.setattr(replicas, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
        pool = WorkerPool(config=RouterConfig())
        m, made = _membership(pool)
        live = [_entry("prefill-1", "prefill"), _entry("decode-1", "decode"), _entry("decode-2", "decode")]
        await m.reconcile(live)
        draining = [live[0], _entry("decode-1", "decode", draining=True),
                    _entry("decode-2", "decode", draining=True)]
        await m.reconcile(draining)
        assert [v.instance_id for v in pool.all()] == ["prefill-1"]  # out of routing
        made["decode-1"].num_open = 2  # two streams still running over its channel
        await m.reconcile([live[0]])  # both missing from the registry
        assert not made["decode-1"].closed and made["decode-2"].closed
        now[0] += 5.0
        await m.reconcile([live[0]])
        assert not made["decode-1"].closed
        made["decode-1"].num_open = 0  # they ended
        await m.reconcile([live[0]])
        assert made["decode-1"].closed
        # One whose requests never end is closed after the bound.
        await m.reconcile([live[0], _entry("decode-3", "decode")])
        await m.reconcile([live[0], _entry("decode-3", "decode", draining=True)])
        made["decode-3"].num_open = 1
        await m.reconcile([live[0]])
        now[0] += replicas.ABSENT_DRAINING_MAX_S - 1
        await m.reconcile([live[0]])
        assert not made["decode-3"].closed
        now[0] += 2
        await m.reconcile([live[0]])
        assert made["decode-3"].closed
        await m.close()

    asyncio.run(run())


def test_config_error_is_one_line():
    from cluster.config import ConfigError, load_config

    try:
        load_config(None, {"decode": {"num_instances": -1}, "router": {"port": "x"}})
    except ConfigError as e:
        line = config_error_line(e)
    assert "\n" not in line and "decode.num_instances" in line and "router.port" in line
