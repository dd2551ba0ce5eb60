"""The re-planning loop on a running router (pdserve/replanner.py): snapshots from the
router's traces and pool, actuators for Serve and for an in-process pool, decisions in the
router's metrics and dashboard, and a short workload shift that the loop follows."""

from __future__ import annotations

import asyncio

import pytest

from cluster.config import SLOConfig
from cluster.planner.online import (AddInstances, DrainInstance, RemoveInstance, Replanner,
                                    ReplanSettings, Sizing)
from pdserve.replanner import PoolActuator, ReplanTask, ServeActuator, snapshot_from_router
from router.dashboard import dashboard_snapshot
from router.handoff import RequestTrace
from tests.fakes import FakeDecodeWorker, FakePrefillWorker, make_fake_deployment

SLO = SLOConfig(ttft_s=0.5, tpot_s=0.05, attainment=0.9)


def _trace(rid: str, arrival: float, ttft: float, tpot: float, prompt: int, output: int) -> RequestTrace:
    t = RequestTrace(rid, prompt, arrival_s=arrival, num_output_tokens=output)
    t.events["first_token"] = arrival + ttft
    t.events["finish"] = arrival + ttft + tpot * (output - 1)
    return t


def _deployment(num_prefill=2, num_decode=2):
    app, deps, prefills, decodes = make_fake_deployment(num_prefill=num_prefill, num_decode=num_decode,
                                                        slo=SLO)
    return deps, prefills, decodes


def test_snapshot_reads_the_window_from_traces_and_pool():
    deps, prefills, _ = _deployment()
    now = 1000.0
    deps.remember(_trace("old", now - 100, 0.1, 0.01, 999, 999))  # ended before the window
    for i in range(20):  # 20 requests over the last 10 s: 2 req/s; one in four misses TTFT
        deps.remember(_trace(f"r{i}", now - 10 + 0.4 * i, 0.9 if i % 4 == 0 else 0.1, 0.01, 100 + i, 10))
    snap = snapshot_from_router(deps, now, window_s=10.0)
    assert snap.arrival_rate_rps == pytest.approx(20 / 10)
    assert sorted(snap.input_lens) == [100 + i for i in range(20)]  # not the old one
    assert set(snap.output_lens) == {10}
    assert snap.attainment == pytest.approx(15 / 20)
    assert snap.mean_ttft_s == pytest.approx((5 * 0.9 + 15 * 0.1) / 20)
    assert {(i.instance_id, i.role, i.state) for i in snap.instances} == {
        ("prefill-0", "prefill", "serving"), ("prefill-1", "prefill", "serving"),
        ("decode-0", "decode", "serving"), ("decode-1", "decode", "serving")}


def test_snapshot_samples_the_lengths_of_the_traffic_that_arrived_in_the_window():
    # A shift inside the window: old short-prompt requests still ending, new long-prompt
    # ones arriving. The sizer must see the new traffic; the deployment's figures (here the
    # attainment) still cover everything that ended in the window.
    deps, _, _ = _deployment()
    now = 1000.0
    for i in range(10):  # arrived before the window, ended in it
        deps.remember(_trace(f"old{i}", now - 12 + 0.1 * i, 0.1, 0.08, 32, 64))  # TPOT missed
    for i in range(15):
        deps.remember(_trace(f"new{i}", now - 9 + 0.5 * i, 0.1, 0.01, 1024, 8))
    snap = snapshot_from_router(deps, now, window_s=10.0)
    assert set(snap.input_lens) == {1024} and len(snap.input_lens) == 15
    assert snap.attainment == pytest.approx(15 / 25)
    # Requests longer than the window: under half of what ended arrived in it, so all count.
    deps2, _, _ = _deployment()
    for i in range(10):
        deps2.remember(_trace(f"long{i}", now - 30 + 0.1 * i, 0.1, 0.01, 500, 2500))
    for i in range(3):
        deps2.remember(_trace(f"short{i}", now - 5 + i, 0.1, 0.01, 100, 10))
    assert len(snapshot_from_router(deps2, now, window_s=10.0).input_lens) == 13


def test_snapshot_samples_the_newest_arrivals_with_those_still_in_flight():
    # A shift half a window ago: the requests that ended are mostly the old traffic, and the
    # new prompts are queued. The newest half window, in flight included, is the new traffic.
    from router.handoff import RequestState

    deps, _, _ = _deployment()
    now = 1000.0
    for i in range(60):  # old traffic, ended
        deps.remember(_trace(f"old{i}", now - 10 + 0.08 * i, 0.1, 0.01, 32, 64))
    for i in range(20):  # new traffic, ended
        deps.remember(_trace(f"new{i}", now - 5 + 0.05 * i, 0.1, 0.01, 1024, 8))
    for i in range(40):  # new traffic, queued (output limit 8, or 1000: the median caps it)
        queued = RequestTrace(f"queued{i}", 1024, arrival_s=now - 4 + 0.1 * i, max_tokens=8 if i < 35 else 1000)
        deps.remember(queued)
    failed = RequestTrace("failed", 4096, arrival_s=now - 1, max_tokens=8)
    failed.state = RequestState.FAILED
    deps.remember(failed)  # ended without output: no lengths to learn from
    snap = snapshot_from_router(deps, now, window_s=10.0, min_sample=50)
    assert len(snap.input_lens) == 60 and set(snap.input_lens) == {1024}
    # 55 known or capped at 8; five in flight with a limit of 1000 take the window's median
    # output (the 60 old requests' 64 tokens).
    assert sorted(snap.output_lens) == [8] * 55 + [64] * 5
    assert snap.attainment == pytest.approx(1.0)  # the window's figures: what ended in it
    # Under `min_sample` in the newest half window: the earlier rule (what ended and arrived
    # in the window, here old and new alike).
    fallback = snapshot_from_router(deps, now, window_s=10.0, min_sample=61)
    assert sorted(fallback.input_lens) == [32] * 60 + [1024] * 20


def test_serve_actuator_sets_each_pool_replica_count():
    calls = []
    act = ServeActuator("pdserve", {"prefill": 2, "decode": 2}, lambda role, n: calls.append((role, n)))
    act.add("decode", 2)
    act.drain("prefill", "prefill-1")  # Serve picks and drains the replica that leaves
    act.remove("prefill", "prefill-1")  # nothing left to do: Serve stopped it after its drain
    assert calls == [("decode", 4), ("prefill", 1)]


def _loop(deps, sizing: Sizing, **settings) -> ReplanTask:
    made = []

    def make_client(role, instance_id):
        client = FakePrefillWorker(instance_id) if role == "prefill" else FakeDecodeWorker(instance_id)
        made.append(client)
        return client

    actuator = PoolActuator(deps.pool, make_client, lambda c, on: setattr(c, "draining", on))
    replanner = Replanner(ReplanSettings(observe_only=False, interval_s=1.0, min_requests=5, max_units=4,
                                         **settings), lambda snap, corr: sizing)
    return ReplanTask(deps, replanner, actuator, window_s=10.0, clock=lambda: clock[0])


clock = [1000.0]


async def _poll(deps) -> None:
    await deps.pool.refresh()


def test_loop_resizes_drains_then_removes_and_reports(monkeypatch):
    deps, prefills, _ = _deployment()
    for c in prefills:  # fakes whose stats report a drain the actuator asks for
        c.draining = False
        orig = c.stats

        async def stats(c=c, orig=orig):
            s = await orig()
            return type(s)(**{**{f: getattr(s, f) for f in s.__struct_fields__}, "is_draining": c.draining})
        c.stats = stats
    now = clock[0]
    for i in range(10):
        deps.remember(_trace(f"r{i}", now - 5 + 0.4 * i, 0.1, 0.01, 50, 20))
    task = _loop(deps, Sizing(1, 3, 0.1, 0.01, predicted_overloaded=False))

    async def scenario():
        await _poll(deps)
        effects = await task.tick()
        assert effects == [DrainInstance("prefill", "prefill-0"), AddInstances("decode", 1)]
        assert [v.instance_id for v in deps.pool.decode] == ["decode-0", "decode-1", "decode-2"]
        await _poll(deps)  # the drained prefill now says so; it holds nothing in flight
        clock[0] += 0.5  # before the next interval: no new sizing, only the finished drain
        effects = await task.tick()
        assert effects == [RemoveInstance("prefill", "prefill-0")]
        assert [v.instance_id for v in deps.pool.prefill] == ["prefill-1"]

    asyncio.run(scenario())
    text = deps.metrics.exposition().decode()
    assert 'pdserve_replan_decisions_total{action="resize",applied="true"} 1.0' in text
    assert 'pdserve_replan_target_instances{role="decode"} 3.0' in text
    assert 'pdserve_replan_target_instances{role="prefill"} 1.0' in text
    assert "pdserve_replan_last_decision_timestamp_seconds{action=\"resize\",reason=" in text
    rows = dashboard_snapshot(deps)["replan"]
    assert rows[0]["action"] == "resize" and rows[0]["prefill"] == [2, 1] and rows[0]["decode"] == [2, 3]
    assert "needs 1 prefill + 3 decode" in rows[0]["reason"]


def test_observe_only_reports_and_leaves_the_pool_alone():
    deps, _, _ = _deployment()
    for i in range(10):
        deps.remember(_trace(f"r{i}", clock[0] - 5 + 0.4 * i, 0.1, 0.01, 50, 20))
    task = _loop(deps, Sizing(1, 3, 0.1, 0.01, predicted_overloaded=False))
    task.replanner.settings = task.replanner.settings.model_copy(update={"observe_only": True})
    effects = asyncio.run(task.tick())
    assert effects == [] and len(deps.pool.prefill) == 2 and len(deps.pool.decode) == 2
    text = deps.metrics.exposition().decode()
    assert 'pdserve_replan_decisions_total{action="resize",applied="false"} 1.0' in text


def test_stop_during_a_tick_applies_the_decision_it_records():
    # The sizing runs in a thread; a stop that arrived meanwhile used to cancel the tick
    # after the decision was recorded (applied=True) and before its effects were applied.
    import threading

    deps, _, _ = _deployment()
    now = 1000.0
    for i in range(20):
        deps.remember(_trace(f"r{i}", now - 10 + 0.4 * i, 0.1, 0.01, 100, 10))
    entered, release = threading.Event(), threading.Event()

    def slow_sizer(snap, corr):
        entered.set()
        release.wait(5)
        return Sizing(1, 3, 0.1, 0.01, False)

    made = []
    actuator = PoolActuator(deps.pool, lambda role, iid: made.append((role, iid)) or FakeDecodeWorker(iid),
                            lambda c, on: None)
    replanner = Replanner(ReplanSettings(observe_only=False, interval_s=1.0, min_requests=5, max_units=4),
                          slow_sizer)
    task = ReplanTask(deps, replanner, actuator, window_s=10.0, clock=lambda: now)

    async def run() -> None:
        task.start()
        await asyncio.to_thread(entered.wait, 5)
        stopping = asyncio.create_task(task.stop())
        await asyncio.sleep(0.05)
        release.set()
        await stopping

    asyncio.run(run())
    [decision] = [d for d in replanner.decisions if d.action == "resize"]
    assert decision.applied and made == [("decode", "decode-2")]
