"""Admission rules, pure: the queue bound, the TTFT prediction from measured throughput,
Retry-After, and learning throughput from traces."""

from __future__ import annotations

import pytest

from cluster.config import RouterConfig, SLOConfig
from cluster.wire import LifecycleEvent, WorkerStats
from router.admission import Admission, ThroughputMeter
from router.handoff import RequestTrace
from router.pool import InstanceView


class _Client:
    def __init__(self, instance_id: str):
        self.instance_id = instance_id


def view(instance_id: str, queued_tokens: int = 0, ready: bool = True) -> InstanceView:
    v = InstanceView(_Client(instance_id), "prefill")
    v.stats = WorkerStats(instance_id=instance_id, role="prefill", is_ready=ready,
                          num_running_reqs=0, num_waiting_reqs=0, kv_cache_usage=0.0,
                          num_kv_blocks=100)
    v.inflight_prompt_tokens = queued_tokens
    return v


def admission(**fields) -> Admission:
    return Admission(RouterConfig(**fields), SLOConfig(ttft_s=1.0, tpot_s=0.1))


def test_throughput_is_tokens_over_the_union_of_busy_intervals():
    meter = ThroughputMeter(window_s=60)
    meter.observe("p0", 100, 0.0, 1.0)
    meter.observe("p0", 100, 0.5, 1.5)  # batched with the first: overlap counted once
    meter.observe("p0", 100, 3.0, 3.5)
    assert meter.tokens_per_s("p0", now=4.0) == pytest.approx(300 / 2.0)
    assert meter.tokens_per_s("p1", now=4.0) is None
    assert meter.tokens_per_s("p0", now=62.0) == pytest.approx(100 / 0.5)  # first two aged out
    assert meter.tokens_per_s("p0", now=100.0) is None
    meter.observe("p0", 0, 0.0, 1.0)  # nothing computed (all cached): ignored
    meter.observe("p0", 10, 5.0, 4.0)  # a clock going backwards: ignored
    assert meter.tokens_per_s("p0", now=100.0) is None


def test_the_queue_bound_rejects_and_tickets_release_once():
    a = admission(max_queued_requests=2, ttft_reject_factor=None)
    views = [view("p0")]
    tickets = [a.admit(), a.admit()]
    rejection = a.decide(views, 10, now=0.0)
    assert rejection is not None and rejection.reason == "queue_full"
    assert rejection.retry_after_s == 1  # nothing measured yet
    tickets[0].release()
    tickets[0].release()  # idempotent
    assert a.num_queued == 1 and a.decide(views, 10, now=0.0) is None


def test_predicted_ttft_over_the_factor_rejects_with_the_wait_as_retry_after():
    a = admission(ttft_reject_factor=10.0)
    a.meter.observe("p0", 1000, 0.0, 1.0)  # 1000 tokens/s
    a.meter.observe("p1", 1000, 0.0, 0.5)  # 2000 tokens/s
    views = [view("p0", queued_tokens=20_000), view("p1", queued_tokens=30_000)]
    # p0: 20.1 s, p1: 15.05 s; routing would pick the better: 15.05 s > 10 s.
    assert a.predicted_ttft_s(views, 100, now=2.0) == pytest.approx(15.05)
    rejection = a.decide(views, 100, now=2.0)
    assert rejection.reason == "ttft_slo" and rejection.retry_after_s == 6  # ceil(5.05)
    assert "15.1 s" in rejection.message and "10.0 s" in rejection.message
    views[1].inflight_prompt_tokens = 10_000  # 5.05 s: within bounds
    assert a.decide(views, 100, now=2.0) is None


def test_no_prediction_while_an_available_instance_is_unmeasured():
    a = admission(ttft_reject_factor=1.0)
    a.meter.observe("p0", 10, 0.0, 1.0)
    views = [view("p0", queued_tokens=10_000), view("p1")]
    assert a.predicted_ttft_s(views, 10, now=2.0) is None and a.decide(views, 10, 2.0) is None
    views[1].stats = None  # p1 not ready: only p0 counts
    assert a.decide(views, 10, now=2.0).reason == "ttft_slo"


def test_factor_none_turns_the_ttft_rule_off():
    a = admission(ttft_reject_factor=None)
    a.meter.observe("p0", 10, 0.0, 1.0)
    assert a.decide([view("p0", queued_tokens=10**6)], 10, now=2.0) is None


def test_retry_after_for_a_full_queue_is_the_measured_drain_time_clamped():
    a = admission(max_queued_requests=1, ttft_reject_factor=None)
    a.admit()
    a.meter.observe("p0", 100, 0.0, 1.0)
    assert a.decide([view("p0", queued_tokens=450)], 1, now=2.0).retry_after_s == 5
    assert a.decide([view("p0", queued_tokens=10**7)], 1, now=2.0).retry_after_s == 60


def test_throughput_is_learned_from_disaggregated_and_colocated_traces():
    a = admission()
    t = RequestTrace("r1", num_prompt_tokens=300)
    t.prefill_instance = "p0"
    t.num_prefix_matched_tokens = 100  # cached: not computed
    t.mark(LifecycleEvent.PREFILL_START, 10.0)
    t.mark(LifecycleEvent.PREFILL_END, 10.5)
    a.observe(t)
    assert a.meter.tokens_per_s("p0", now=11.0) == pytest.approx(200 / 0.5)

    c = RequestTrace("r2", num_prompt_tokens=50)
    c.decode_instance = "colocated-0"
    c.mark(LifecycleEvent.GENERATING, 20.0)
    c.mark(LifecycleEvent.FIRST_TOKEN, 20.25)
    a.observe(c)
    assert a.meter.tokens_per_s("colocated-0", now=21.0) == pytest.approx(200.0)

    failed = RequestTrace("r3", num_prompt_tokens=50)  # never reached a first token
    failed.decode_instance = "colocated-1"
    failed.mark(LifecycleEvent.GENERATING, 20.0)
    a.observe(failed)
    assert a.meter.tokens_per_s("colocated-1", now=21.0) is None
