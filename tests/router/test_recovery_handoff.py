"""Recovery wired into the handoff, over fake workers: prefill retried on another instance
behind circuit breakers, streams migrated mid-way with no duplicated or missing token
(greedy fakes: the next token is a function of the whole sequence), the stall timeout for
a frozen worker, and an abort in each new state ending in a leak check."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from cluster.channel import ChannelError, ChannelLost
from cluster.config import RouterConfig, ServeConfig, SLOConfig
from cluster.wire import SamplingSpec, WorkerUnavailable
from router.handoff import Handoff, RequestFailed, RequestState, RequestTrace
from router.metrics import Metrics
from router.pool import WorkerPool
from router.recovery import BreakerState
from tests.fakes import FakeDecodeWorker, FakePrefillWorker, assert_nothing_held, next_token
from tests.fakes import settle_pool as settle

PROMPT = (5, 6, 7, 8)


def reference(n: int, prompt=PROMPT) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(next_token(ids))
    return ids[len(prompt):]


class LostPrefill(FakePrefillWorker):
    """Its channel is gone: every call fails as a lost connection."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.num_calls = 0

    async def prefill(self, req):
        self.num_calls += 1
        raise ChannelLost("the channel to prefill was lost (IncompleteReadError)")


class RefusingPrefill(FakePrefillWorker):
    """Reports an error about the request itself (over a channel: a plain ChannelError)."""

    async def prefill(self, req):
        raise ChannelError("ValueError: the prompt does not fit")


class GatedPrefill(FakePrefillWorker):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate = asyncio.Event()
        self.started = asyncio.Event()

    async def prefill(self, req):
        self.started.set()
        await self.gate.wait()
        return await super().prefill(req)


class DyingDecode(FakeDecodeWorker):
    """Streams `die_after` tokens, then its connection is lost (or it freezes: `freeze`)."""

    def __init__(self, *args, die_after: int = 3, freeze: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.die_after = die_after
        self.freeze = freeze
        self.thaw = asyncio.Event()

    async def generate(self, req):
        n = 0
        async for delta in super().generate(req):
            if n == self.die_after:
                if self.freeze:
                    await self.thaw.wait()
                raise ChannelLost("the channel to decode was lost (IncompleteReadError)")
            n += len(delta.token_ids)
            yield delta


class SlowPromptDecode(FakeDecodeWorker):
    """Takes `prompt_s` before its first delta (a long prompt), then streams normally."""

    def __init__(self, *args, prompt_s: float = 0.5, **kwargs):
        super().__init__(*args, **kwargs)
        self.prompt_s = prompt_s

    async def generate(self, req):
        await asyncio.sleep(self.prompt_s)
        async for delta in super().generate(req):
            yield delta


async def ready_pool(config: RouterConfig, **clients) -> WorkerPool:
    pool = WorkerPool.build(config, **clients)
    await pool.refresh()
    return pool


def make(pool, max_tokens=12, sampling=None, rid="req-1"):
    trace = RequestTrace(rid, len(PROMPT))
    sampling = sampling or SamplingSpec(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
    return Handoff(pool, frozenset({1}), rid, list(PROMPT), sampling, trace), trace


async def drain(handoff) -> tuple[list[int], list[RequestState]]:
    out, states = [], []
    async for delta in handoff.tokens():
        out.extend(delta.token_ids)
        states.append(handoff.state)
    return out, states


FAST = dict(retry_backoff_base_s=0.001, retry_backoff_cap_s=0.002)


# -- prefill retry ------------------------------------------------------------------------
async def test_a_lost_prefill_is_retried_on_another_and_its_breaker_opens():
    lost, good = LostPrefill("prefill-0"), FakePrefillWorker("prefill-1")
    decode = FakeDecodeWorker(prefills=[lost, good])
    config = RouterConfig(breaker_failure_threshold=1, breaker_open_s=60.0,
                          prefill_policy="round_robin", **FAST)
    pool = await ready_pool(config, prefill=[lost, good], decode=[decode])
    handoff, trace = make(pool)
    out, _ = await drain(handoff)
    assert out == reference(12)
    assert trace.state == RequestState.FINISHED and trace.served_by == "transferred"
    assert lost.num_calls == 1 and trace.num_prefill_retries == 1
    assert trace.prefill_retry_reasons == ("instance_lost",) and "retrying" in trace.events
    assert trace.prefill_instance == "prefill-1"
    assert pool.recovery.breakers.state("prefill-0", time.monotonic()) == BreakerState.OPEN
    # Routing skips the open instance: the next requests never touch it.
    for i in range(3):
        h, t = make(pool, rid=f"next-{i}")
        assert (await drain(h))[0] == reference(12)
        assert t.num_prefill_retries == 0
    assert lost.num_calls == 1
    await settle(pool)
    assert_nothing_held(pool, [lost, good], [decode])
    metrics = Metrics(SLOConfig(), 1)
    metrics.record_request(trace)
    assert b'pdserve_request_prefill_retries_total{reason="instance_lost"} 1.0' in metrics.exposition()


async def test_an_error_the_worker_reports_is_not_retried():
    refusing, good = RefusingPrefill("prefill-0"), FakePrefillWorker("prefill-1")
    decode = FakeDecodeWorker(prefills=[refusing, good])
    pool = await ready_pool(RouterConfig(prefill_policy="round_robin", **FAST),
                            prefill=[refusing, good], decode=[decode])
    handoff, trace = make(pool)
    with pytest.raises(RequestFailed, match="does not fit"):
        await drain(handoff)
    assert trace.state == RequestState.FAILED and trace.num_prefill_retries == 0
    assert pool.recovery.breakers.state("prefill-0", time.monotonic()) == BreakerState.CLOSED
    await settle(pool)
    assert_nothing_held(pool, [refusing, good], [decode])


async def test_prefill_attempts_are_bounded_then_the_request_fails_cleanly():
    prefills = [LostPrefill(f"prefill-{i}") for i in range(4)]
    decode = FakeDecodeWorker(prefills=prefills)
    pool = await ready_pool(RouterConfig(prefill_max_attempts=3, **FAST), prefill=prefills,
                            decode=[decode])
    handoff, trace = make(pool)
    with pytest.raises(RequestFailed, match="prefill failed"):
        await drain(handoff)
    assert sum(p.num_calls for p in prefills) == 3 and trace.num_prefill_retries == 2
    assert trace.state == RequestState.FAILED
    await settle(pool)
    assert_nothing_held(pool, prefills, [decode])


async def test_abort_while_retrying_holds_nothing():
    lost, gated = LostPrefill("prefill-0"), GatedPrefill("prefill-1")
    decode = FakeDecodeWorker(prefills=[lost, gated])
    # A long backoff: the client leaves while the request waits in RETRYING.
    config = RouterConfig(prefill_policy="round_robin", retry_backoff_base_s=30.0,
                          retry_backoff_cap_s=30.0)
    pool = await ready_pool(config, prefill=[lost, gated], decode=[decode])
    handoff, trace = make(pool)
    task = asyncio.ensure_future(handoff.tokens().__anext__())
    for _ in range(50):
        if trace.state == RequestState.RETRYING:
            break
        await asyncio.sleep(0.01)
    assert trace.state == RequestState.RETRYING
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await settle(pool)
    assert trace.state == RequestState.ABORTED and not gated.started.is_set()
    assert_nothing_held(pool, [lost, gated], [decode])


# -- decode migration ---------------------------------------------------------------------
@pytest.mark.parametrize("die_after", [0, 1, 5])
async def test_a_decode_lost_mid_stream_migrates_with_no_token_repeated_or_missing(die_after):
    prefill = FakePrefillWorker()
    dying = DyingDecode("decode-0", prefills=[prefill], die_after=die_after)
    other = FakeDecodeWorker("decode-1", prefills=[prefill])
    pool = await ready_pool(RouterConfig(decode_policy="round_robin"), prefill=[prefill],
                            decode=[dying, other])
    handoff, trace = make(pool, max_tokens=12)
    out, states = await drain(handoff)
    assert out == reference(12)  # exactly the uninterrupted greedy sequence
    assert RequestState.MIGRATING not in states  # never visible between two deltas
    assert trace.state == RequestState.FINISHED and trace.num_migrations == 1
    m = trace.migrations[0]
    assert (m.reason, m.from_instance, m.to_instance) == ("instance_lost", "decode-0", "decode-1")
    assert m.num_tokens_emitted == 1 + die_after  # prefill's first token + decode's
    assert trace.decode_instance == "decode-1" and "migrating" in trace.events
    assert trace.to_dict()["num_migrations"] == 1
    await settle(pool)
    assert dying.aborted == ["req-1"]  # the failed instance is told to stop, in case it lives
    assert_nothing_held(pool, [prefill], [dying, other])  # die_after=0: KV handed back
    metrics = Metrics(SLOConfig(), 1)
    metrics.record_request(trace)
    assert b'pdserve_request_migrations_total{reason="instance_lost"} 1.0' in metrics.exposition()


async def test_migration_limit_bounds_the_moves_then_a_clean_error():
    prefill = FakePrefillWorker()
    decodes = [DyingDecode(f"decode-{i}", prefills=[prefill], die_after=2) for i in range(3)]
    pool = await ready_pool(RouterConfig(decode_policy="round_robin", migration_limit=1),
                            prefill=[prefill], decode=decodes)
    handoff, trace = make(pool, max_tokens=20)
    out = []
    with pytest.raises(RequestFailed, match="instance_lost"):
        async for delta in handoff.tokens():
            out.extend(delta.token_ids)
    # What reached the client is a prefix of the right answer: nothing repeated.
    assert out == reference(20)[:len(out)] and len(out) == 1 + 2 + 2
    assert trace.num_migrations == 1 and trace.state == RequestState.FAILED
    await settle(pool)
    assert_nothing_held(pool, [prefill], decodes)


async def test_no_migration_when_off_or_when_sampling_depends_on_output():
    for config, sampling in (
            (RouterConfig(migration_limit=0), SamplingSpec(max_tokens=12, ignore_eos=True)),
            (RouterConfig(), SamplingSpec(max_tokens=12, ignore_eos=True, presence_penalty=0.5,
                                          seed=7))):
        prefill = FakePrefillWorker()
        dying = DyingDecode("decode-0", prefills=[prefill], die_after=3)
        other = FakeDecodeWorker("decode-1", prefills=[prefill])
        pool = await ready_pool(config.model_copy(update={"decode_policy": "round_robin"}),
                                prefill=[prefill], decode=[dying, other])
        handoff, trace = make(pool, sampling=sampling)
        with pytest.raises(RequestFailed, match="decode-0 failed"):
            await drain(handoff)
        assert trace.num_migrations == 0 and trace.state == RequestState.FAILED
        await settle(pool)
        assert_nothing_held(pool, [prefill], [dying, other])


async def test_a_colocated_instance_lost_mid_stream_migrates():
    dying = DyingDecode("colocated-0", role="colocated", die_after=4)
    other = FakeDecodeWorker("colocated-1", role="colocated")
    pool = await ready_pool(RouterConfig(prefill_policy="round_robin"), colocated=[dying, other])
    handoff, trace = make(pool, max_tokens=10)
    out, _ = await drain(handoff)
    assert out == reference(10) and trace.num_migrations == 1
    assert trace.state == RequestState.FINISHED
    await settle(pool)
    assert_nothing_held(pool, [], [dying, other])


async def test_abort_while_migrating_holds_nothing():
    prefill = FakePrefillWorker()
    dying = DyingDecode("decode-0", prefills=[prefill], die_after=2)
    # The continuation's instance takes long for its prompt: the client leaves meanwhile.
    slow = SlowPromptDecode("decode-1", prefills=[prefill], prompt_s=30.0)
    pool = await ready_pool(RouterConfig(decode_policy="round_robin"), prefill=[prefill],
                            decode=[dying, slow])
    handoff, trace = make(pool, max_tokens=12)
    tokens = handoff.tokens()
    for _ in range(3):
        await tokens.__anext__()
    task = asyncio.ensure_future(tokens.__anext__())
    for _ in range(50):
        if trace.num_migrations:
            break
        await asyncio.sleep(0.01)
    assert trace.num_migrations == 1 and trace.state == RequestState.DECODING
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
        await task
    await tokens.aclose()
    await settle(pool)
    assert trace.state == RequestState.ABORTED and slow.aborted == ["req-1"]
    assert_nothing_held(pool, [prefill], [dying, slow])


# -- the stall timeout --------------------------------------------------------------------
async def test_a_frozen_decode_is_detected_by_the_stall_timeout_and_the_stream_migrates():
    prefill = FakePrefillWorker()
    frozen = DyingDecode("decode-0", prefills=[prefill], die_after=4, freeze=True)
    other = FakeDecodeWorker("decode-1", prefills=[prefill])
    config = RouterConfig(decode_policy="round_robin", stream_stall_timeout_s=0.2)
    pool = await ready_pool(config, prefill=[prefill], decode=[frozen, other])
    handoff, trace = make(pool, max_tokens=12)
    t0 = time.monotonic()
    out, _ = await drain(handoff)
    waited = time.monotonic() - t0
    assert out == reference(12)
    assert trace.num_migrations == 1 and trace.migrations[0].reason == "stalled"
    # Detected between the timeout and the timeout plus two scan periods (0.05 s each).
    assert 0.2 <= waited < 0.2 + 0.1 + 0.1
    frozen.thaw.set()
    await settle(pool)
    assert_nothing_held(pool, [prefill], [frozen, other])


async def test_a_frozen_decode_without_migration_ends_in_a_clean_error_in_time():
    prefill = FakePrefillWorker()
    frozen = DyingDecode("decode-0", prefills=[prefill], die_after=4, freeze=True)
    pool = await ready_pool(RouterConfig(stream_stall_timeout_s=0.2, migration_limit=0),
                            prefill=[prefill], decode=[frozen])
    handoff, trace = make(pool, max_tokens=12)
    out = []
    t0 = time.monotonic()
    with pytest.raises(RequestFailed, match="stalled"):
        async for delta in handoff.tokens():
            out.extend(delta.token_ids)
    assert time.monotonic() - t0 < 0.5 and out == reference(12)[:5]
    frozen.thaw.set()
    await settle(pool)
    assert_nothing_held(pool, [prefill], [frozen])


async def test_a_long_prompt_on_a_live_instance_is_not_a_stall():
    """Before its first delta an instance may compute a prompt for longer than the stall
    timeout: while it answers its stats poll, that is slow work, not a stall."""
    slow = SlowPromptDecode("colocated-0", role="colocated", prompt_s=0.5)
    other = FakeDecodeWorker("colocated-1", role="colocated")
    pool = await ready_pool(RouterConfig(stream_stall_timeout_s=0.1, prefill_policy="round_robin"),
                            colocated=[slow, other])
    handoff, trace = make(pool, max_tokens=6)
    out, _ = await drain(handoff)
    assert out == reference(6) and trace.num_migrations == 0
    assert trace.decode_instance == "colocated-0"
    await settle(pool)
    assert_nothing_held(pool, [], [slow, other])


async def test_a_prompt_on_an_instance_that_fails_its_poll_is_a_stall():
    slow = SlowPromptDecode("colocated-0", role="colocated", prompt_s=30.0)
    other = FakeDecodeWorker("colocated-1", role="colocated")
    pool = await ready_pool(RouterConfig(stream_stall_timeout_s=0.1, prefill_policy="round_robin"),
                            colocated=[slow, other])
    handoff, trace = make(pool, max_tokens=6)
    task = asyncio.ensure_future(drain(handoff))
    await asyncio.sleep(0.2)
    assert not task.done() and trace.decode_instance == "colocated-0"
    pool.colocated[0].is_healthy = False  # its stats poll timed out (a SIGSTOPped process)
    out, _ = await asyncio.wait_for(task, 1.0)
    assert out == reference(6)
    assert trace.num_migrations == 1 and trace.migrations[0].reason == "stalled"
    assert trace.migrations[0].num_tokens_emitted == 0
    await settle(pool)
    assert_nothing_held(pool, [], [slow, other])


async def test_a_frozen_prefill_is_retried_once_its_poll_fails():
    frozen, good = GatedPrefill("prefill-0"), FakePrefillWorker("prefill-1")
    decode = FakeDecodeWorker(prefills=[frozen, good])
    config = RouterConfig(stream_stall_timeout_s=0.1, prefill_policy="round_robin", **FAST)
    pool = await ready_pool(config, prefill=[frozen, good], decode=[decode])
    handoff, trace = make(pool)
    task = asyncio.ensure_future(drain(handoff))
    await frozen.started.wait()
    await asyncio.sleep(0.3)
    assert not task.done()  # alive by its poll: a long prefill is allowed to take long
    pool.prefill[0].is_healthy = False  # the poll times out (SIGSTOP)
    out, _ = await task
    assert out == reference(12) and trace.prefill_retry_reasons == ("stalled",)
    frozen.gate.set()
    await settle(pool)
    frozen.staged.clear()  # the frozen engine finishes the prompt when thawed; its lease reclaims it
    assert_nothing_held(pool, [frozen, good], [decode])


async def test_the_stall_watch_arms_nothing_per_token():
    """One scanning task per pool while streams run, whatever the number of tokens."""
    prefill = FakePrefillWorker()
    decode = FakeDecodeWorker(prefills=[prefill])
    pool = await ready_pool(RouterConfig(stream_stall_timeout_s=5.0), prefill=[prefill],
                            decode=[decode])
    before = len(asyncio.all_tasks())
    handoff, _ = make(pool, max_tokens=200)
    most = 0
    async for _ in handoff.tokens():
        most = max(most, len(asyncio.all_tasks()) - before)
    assert most <= 1  # the watch's own scanning task


async def test_the_pool_shutdown_ends_the_stall_watch_scan():
    """A pool that stops leaves no scanning task asleep behind it (the event loop would
    destroy it pending)."""
    prefill = FakePrefillWorker()
    decode = FakeDecodeWorker(prefills=[prefill])
    pool = await ready_pool(RouterConfig(stream_stall_timeout_s=60.0), prefill=[prefill],
                            decode=[decode])
    handoff, _ = make(pool, max_tokens=4)
    await drain(handoff)
    scan = pool.recovery.stall_watch._task
    assert scan is not None and not scan.done()  # asleep between scans
    await pool.stop_polling()
    assert scan.cancelled()


def test_config_validates_the_recovery_settings():
    with pytest.raises(ValueError):
        RouterConfig(retry_backoff_base_s=2.0, retry_backoff_cap_s=1.0)
    with pytest.raises(ValueError):
        RouterConfig(migration_limit=-1)
    with pytest.raises(ValueError):
        RouterConfig(prefill_max_attempts=0)
    with pytest.raises(ValueError):
        RouterConfig(stream_stall_timeout_s=0)
    assert RouterConfig(stream_stall_timeout_s=None).stream_stall_timeout_s is None
    assert ServeConfig(router={"migration_limit": 0}).router.migration_limit == 0


async def test_no_available_instance_still_means_503_before_any_token():
    prefill = FakePrefillWorker()
    decode = FakeDecodeWorker(prefills=[prefill])
    pool = WorkerPool.build(RouterConfig(), prefill=[prefill], decode=[decode])  # never polled
    handoff, trace = make(pool)
    with pytest.raises(WorkerUnavailable):
        await drain(handoff)


class UnreachableDecode(FakeDecodeWorker):
    """Fails its stats poll (frozen, or gone from the registry): never available."""

    async def stats(self):
        raise ChannelLost("the channel to decode was lost (IncompleteReadError)")


async def test_no_decode_available_after_the_prefill_is_a_503_before_any_token():
    # The fault run on real engines: both decodes out of routing for a moment (one frozen,
    # the other's registry entry expired) while a prefill computed a prompt. The decode is
    # chosen before the first token goes out, so the client gets a clean 503, not a token
    # followed by a dropped connection, and the staged KV goes back to its producer.
    prefill = FakePrefillWorker()
    decode = UnreachableDecode(prefills=[prefill])
    pool = await ready_pool(RouterConfig(), prefill=[prefill], decode=[decode])
    assert not any(v.is_available for v in pool.decode) and pool.prefill[0].is_available
    handoff, trace = make(pool)
    deltas = handoff.tokens()
    with pytest.raises(WorkerUnavailable):
        await deltas.__anext__()
    assert prefill.num_prefills == 1 and trace.state == RequestState.ABORTED
    await settle(pool)
    assert_nothing_held(pool, [prefill], [decode])


class HealingPrefill(FakePrefillWorker):
    """Loses every prefill while `is_lost` (a frozen instance's requests, retried
    elsewhere or failed), answers its polls throughout."""

    is_lost = True

    async def prefill(self, req):
        if self.is_lost:
            raise ChannelLost("the channel to prefill was lost (IncompleteReadError)")
        return await super().prefill(req)


async def test_an_instance_back_from_a_fault_takes_every_request_once_it_answers_a_poll():
    # The fault run on real engines: the only prefill frozen past the stall timeout opened
    # its breaker; once thawed and polled ready, 7 of the next 8 requests got 503 "no
    # prefill instance is available" (HALF_OPEN lets one trial through). An answered poll
    # after open_s is that trial.
    prefill = HealingPrefill()
    decode = FakeDecodeWorker(prefills=[prefill])
    config = RouterConfig(breaker_failure_threshold=1, breaker_open_s=0.05, **FAST)
    pool = await ready_pool(config, prefill=[prefill], decode=[decode])
    with pytest.raises((WorkerUnavailable, RequestFailed)):
        await drain(make(pool)[0])
    assert pool.recovery.breakers.state("prefill-0", time.monotonic()) == BreakerState.OPEN
    prefill.is_lost = False
    await asyncio.sleep(0.06)
    await pool.refresh()
    results = await asyncio.gather(*(drain(make(pool, rid=f"after-{i}")[0]) for i in range(8)),
                                   return_exceptions=True)
    assert [r[0] if isinstance(r, tuple) else r for r in results] == [reference(12)] * 8
    await settle(pool)
    assert_nothing_held(pool, [prefill], [decode])
