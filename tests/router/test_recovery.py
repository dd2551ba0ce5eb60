"""Recovery policies, pure: prefill retries only on instance faults, with bounded attempts
and backoff, behind per-instance circuit breakers; decode migration continues a stream
with no duplicated or missing token (checked against fake workers, whose next token is a
function of the whole sequence, exactly as greedy decoding is)."""

from __future__ import annotations

import asyncio

import pytest

from cluster.channel import ChannelError, ChannelLost
from cluster.wire import EngineRequest, SamplingSpec, WorkerStats, WorkerUnavailable
from router.handoff import RequestFailed
from router.pool import InstanceView
from router.recovery import (
    BreakerState,
    Breakers,
    CircuitBreaker,
    MigrationBudget,
    RetryPolicy,
    StreamStalled,
    continuation,
    is_instance_fault,
    prefill_with_retries,
)
from tests.fakes import FakeDecodeWorker


class _Client:
    def __init__(self, instance_id):
        self.instance_id = instance_id


def views(*ids):
    out = []
    for i in ids:
        v = InstanceView(_Client(i), "prefill")
        v.stats = WorkerStats(instance_id=i, role="prefill", is_ready=True, num_running_reqs=0,
                              num_waiting_reqs=0, kv_cache_usage=0.0, num_kv_blocks=10)
        out.append(v)
    return out


def test_only_instance_faults_are_recoverable():
    for e in (ChannelLost("lost"), ConnectionResetError(), asyncio.TimeoutError(),
              WorkerUnavailable("gone"), StreamStalled("no output")):
        assert is_instance_fault(e)
    # An error the worker reported about the request comes over the channel as a plain
    # ChannelError: it would fail the same way anywhere.
    for e in (RequestFailed("prompt too long"), ValueError("bad"), RuntimeError("engine says no"),
              ChannelError("RuntimeError: engine says no")):
        assert not is_instance_fault(e)


def test_breaker_opens_after_consecutive_faults_and_lets_one_trial_through():
    b = CircuitBreaker(failure_threshold=2, open_s=5.0)
    b.record_failure(0.0)
    assert b.state(0.0) == BreakerState.CLOSED and b.allows(0.0)
    b.record_success()  # resets the count
    b.record_failure(1.0)
    b.record_failure(2.0)
    assert b.state(3.0) == BreakerState.OPEN and not b.allows(6.9)
    assert b.state(7.0) == BreakerState.HALF_OPEN and b.allows(7.0)
    b.on_attempt(7.0)
    assert not b.allows(7.1)  # one trial at a time
    b.record_failure(7.2)  # the trial failed: open again for a whole open_s
    assert b.state(12.1) == BreakerState.OPEN and b.state(12.25) == BreakerState.HALF_OPEN
    b.on_attempt(12.3)
    b.record_success()
    assert b.state(12.4) == BreakerState.CLOSED and b.allows(12.4)


def test_an_answered_poll_closes_a_half_open_breaker_but_not_an_open_one():
    b = CircuitBreaker(failure_threshold=1, open_s=5.0)
    b.record_failure(0.0)
    b.poll_answered(1.0)  # still within open_s: the faults are recent
    assert b.state(1.0) == BreakerState.OPEN
    b.poll_answered(5.5)  # the poll is the trial: every request may go again
    assert b.state(5.5) == BreakerState.CLOSED and b.allows(5.5)
    b.on_attempt(5.6)
    assert b.allows(5.6)  # no single-trial limit once closed


def test_backoff_is_full_jitter_and_capped():
    policy = RetryPolicy(max_attempts=5, backoff_base_s=0.1, backoff_cap_s=0.3)
    assert [policy.delay_s(n, rng=lambda: 1.0) for n in (1, 2, 3, 4)] == \
        pytest.approx([0.1, 0.2, 0.3, 0.3])
    assert policy.delay_s(3, rng=lambda: 0.5) == pytest.approx(0.15)


async def test_prefill_retries_another_instance_and_the_breaker_remembers():
    pool = views("p0", "p1")
    breakers = Breakers(failure_threshold=1, open_s=30.0)
    calls, sleeps = [], []

    def pick(tried):
        left = [v for v in breakers.allowed(pool, 0.0) if v.instance_id not in tried]
        if not left:
            raise WorkerUnavailable("no prefill instance is available")
        return left[0]

    async def call(view):
        calls.append(view.instance_id)
        if view.instance_id == "p0":
            raise ChannelLost("the worker closed its channel")
        return "first token"

    async def no_sleep(s):
        sleeps.append(s)

    view, result = await prefill_with_retries(pick, call, RetryPolicy(), breakers,
                                              clock=lambda: 0.0, sleep=no_sleep, rng=lambda: 1.0)
    assert (view.instance_id, result, calls) == ("p1", "first token", ["p0", "p1"])
    assert sleeps == [pytest.approx(0.05)]
    # p0's breaker is open: the next request goes straight to p1.
    calls.clear()
    await prefill_with_retries(pick, call, RetryPolicy(), breakers, clock=lambda: 0.0,
                               sleep=no_sleep)
    assert calls == ["p1"]


async def test_request_errors_are_not_retried_and_attempts_are_bounded():
    pool = views("p0", "p1", "p2", "p3")
    breakers = Breakers(failure_threshold=5)
    calls = []

    def pick(tried):
        return next(v for v in pool if v.instance_id not in tried)

    async def refused(view):
        calls.append(view.instance_id)
        raise RequestFailed("prompt does not fit")

    with pytest.raises(RequestFailed):
        await prefill_with_retries(pick, refused, RetryPolicy(), breakers)
    assert calls == ["p0"]

    async def dead(view):
        calls.append(view.instance_id)
        raise ConnectionResetError("reset")

    calls.clear()

    async def no_sleep(_):
        pass

    with pytest.raises(ConnectionResetError):
        await prefill_with_retries(pick, dead, RetryPolicy(max_attempts=3), breakers, sleep=no_sleep)
    assert calls == ["p0", "p1", "p2"]  # max_attempts, then the last fault


def test_migration_budget_and_what_may_not_migrate():
    budget = MigrationBudget(migration_limit=1)
    greedy = SamplingSpec(max_tokens=10, temperature=0.0)
    assert budget.may_migrate(greedy)
    budget.spend()
    assert not budget.may_migrate(greedy)
    penalized = SamplingSpec(max_tokens=10, presence_penalty=0.5)
    assert penalized.depends_on_output and not MigrationBudget(3).may_migrate(penalized)


async def test_a_migrated_stream_has_no_duplicated_or_missing_token():
    """Decode A dies after 7 of 20 tokens reached the client; the continuation on decode B
    yields exactly the 13 an uninterrupted run would have."""
    req = EngineRequest(request_id="r1", prompt_token_ids=(11, 12, 13, 14),
                        sampling=SamplingSpec(max_tokens=20, temperature=0.0, ignore_eos=True,
                                              min_tokens=10))
    reference = [t async for d in FakeDecodeWorker("ref", role="colocated").generate(req)
                 for t in d.token_ids]
    assert len(reference) == 20

    emitted = []
    async for delta in FakeDecodeWorker("decode-a", role="colocated").generate(req):
        emitted.extend(delta.token_ids)
        if len(emitted) == 7:
            break  # decode A is gone; these 7 reached the client
    rest_req = continuation(req, emitted)
    assert rest_req.request_id == "r1" and rest_req.kv_handle is None
    assert rest_req.sampling.max_tokens == 13 and rest_req.sampling.min_tokens == 3
    rest = []
    async for delta in FakeDecodeWorker("decode-b", role="colocated").generate(rest_req):
        rest.extend(delta.token_ids)
    assert emitted + rest == reference
    with pytest.raises(ValueError):
        continuation(req, reference)  # nothing left to generate
