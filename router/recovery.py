"""Recovery from worker faults: prefill retries behind per-instance circuit breakers, and
decode migration that continues a stream on another instance. Policies only: the handoff
(router/handoff.py) calls them at the two points described under "Hooks".

(Just over ~350 lines: three small policies that decide together what a fault costs:
the breaker, the retry loop and the migration budget with the stall watch; most of the
length is this docstring's account of which faults are recovered and how.)

Which failures are recovered. Only *instance faults*: the connection to the worker broke,
the worker is gone or timed out (`is_instance_fault`). A worker that reports a failure of
the request itself (`TokenDelta.error`, a refused input) would fail again anywhere: it is
never retried.

Prefill retry (before the first token; nothing has reached the client)::

    attempt 1 on P_a ──instance fault──▶ breaker(P_a) +1 failure ── sleep backoff(1) ──▶
    attempt 2 on the best instance not yet tried ... at most `max_attempts`, then the
    last error. Backoff: full jitter, uniform(0, min(cap, base * 2^(n-1))).

Circuit breaker, per instance::

    CLOSED ──failure_threshold consecutive faults──▶ OPEN ──open_s──▶ HALF_OPEN
      ▲                                                ▲                 │
      └──────────── a success ─────────────────────────┼─────────────────┤
                                                       └──── a fault ────┘
    OPEN instances are skipped by routing; HALF_OPEN lets one trial request through, and
    an answered stats poll in HALF_OPEN counts as a successful trial (the poll crosses the
    same channel): without it, an instance back from a freeze with every client waiting
    took one request and refused the rest with 503 until that one ended.

Decode migration (after tokens reached the client). The stream continues on another decode
with `continuation(req, emitted)`: the prompt grows by the tokens the client already has
(the new decode recomputes their KV), the budget shrinks by them, so nothing is repeated
and nothing skipped; tokens lost in flight never reached the client and are generated
anew. At most `migration_limit` times per request. Not migrated: requests whose sampling
depends on earlier output (penalties, grammars, bad words: `SamplingSpec.depends_on_output`),
for which emitted tokens turned into prompt would change the semantics; they end with the
error. Greedy requests continue exactly as an uninterrupted run would; seeded sampling
continues validly but not bit-identically (the new engine's generator starts afresh).

Stall timeout (`StallWatch`, `router.stream_stall_timeout_s`). A frozen worker (SIGSTOP, a
wedged engine) closes no connection, so nothing above fails by itself. One task per pool
scans every watched call each `period_s` (a quarter of the timeout, at most 1 s); nothing
is armed per token. A call is *stalled* when the worker owes output and gave none for
`timeout_s`:
- after its stream's first delta (the worker is decoding), measured from the last delta
  the handoff pulled, counting only time the handoff was waiting on the worker (a client
  that does not read is not a stalled worker);
- before the first delta (a prefill call, or a stream whose instance is computing the
  prompt: local prefill, colocated, recompute after a migration), the same clock, *and* the
  instance has failed its stats poll (`InstanceView.is_healthy` false): a long prompt on a
  live instance is slow work, not a stall.
A stalled call's task is cancelled with the watch's mark; the handoff turns that
cancellation back (`Task.uncancel`) into `StreamStalled`, an instance fault. So a stall
is detected between `timeout_s` and `timeout_s + 2 * period_s` after the last output.

Where the handoff uses these (router/handoff.py): `Handoff._disaggregated` runs prefill
through `prefill_with_retries`, picking with `WorkerPool.pick_prefill(route, exclude=tried)`
(routing skips instances whose breaker is OPEN: `WorkerPool._pick`); `Handoff._stream`
migrates a stream on an instance fault while `MigrationBudget.may_migrate` allows.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import msgspec

from cluster.channel import ChannelLost
from cluster.config import RouterConfig
from cluster.wire import EngineRequest, SamplingSpec, WorkerUnavailable

if TYPE_CHECKING:  # router.pool builds a Recovery; the view type is for annotations only
    from router.handoff import RequestTrace
    from router.pool import InstanceView

T = TypeVar("T")


class StreamStalled(TimeoutError):
    """The instance owed output and gave none for `stream_stall_timeout_s` (StallWatch)."""


def is_instance_fault(exc: BaseException) -> bool:
    """The instance, not the request, failed: its connection broke, it vanished or it
    stopped answering. Anything else (an error the worker reports about the request,
    `ChannelError` but not `ChannelLost`) would fail the same way on another instance."""
    return isinstance(exc, (ChannelLost, ConnectionError, asyncio.TimeoutError, TimeoutError,
                            WorkerUnavailable, EOFError))


def fault_reason(exc: BaseException) -> str:
    """The `reason` label of a retry or migration."""
    if isinstance(exc, StreamStalled):
        return "stalled"
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return "timeout"
    if isinstance(exc, WorkerUnavailable):
        return "unavailable"
    return "instance_lost"


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    def __init__(self, failure_threshold: int = 3, open_s: float = 5.0):
        if failure_threshold < 1 or open_s <= 0:
            raise ValueError("failure_threshold must be >= 1 and open_s > 0")
        self.failure_threshold = failure_threshold
        self.open_s = open_s
        self._failures = 0
        self._opened_at: float | None = None
        self._trial_out = False  # HALF_OPEN: the one trial request is running
        self._trial_at = 0.0  # a trial that never reports (its client left) expires after open_s

    def state(self, now: float) -> BreakerState:
        if self._opened_at is None:
            return BreakerState.CLOSED
        if now - self._opened_at < self.open_s:
            return BreakerState.OPEN
        return BreakerState.HALF_OPEN

    def allows(self, now: float) -> bool:
        state = self.state(now)
        return state == BreakerState.CLOSED or (state == BreakerState.HALF_OPEN and (
            not self._trial_out or now - self._trial_at >= self.open_s))

    def on_attempt(self, now: float) -> None:
        if self.state(now) == BreakerState.HALF_OPEN:
            self._trial_out = True
            self._trial_at = now

    def record_success(self) -> None:
        self._failures = 0
        self._opened_at = None
        self._trial_out = False

    def poll_answered(self, now: float) -> None:
        """The instance answered a stats poll: a successful trial once open_s is over."""
        if self.state(now) == BreakerState.HALF_OPEN:
            self.record_success()

    def record_failure(self, now: float) -> None:
        self._failures += 1
        self._trial_out = False
        if self._opened_at is not None or self._failures >= self.failure_threshold:
            self._opened_at = now  # (re)open: a failed trial waits a whole open_s again


class Breakers:
    """One breaker per instance id, made on first use."""

    def __init__(self, failure_threshold: int = 3, open_s: float = 5.0):
        self.failure_threshold = failure_threshold
        self.open_s = open_s
        self._by_instance: dict[str, CircuitBreaker] = {}

    def __getitem__(self, instance_id: str) -> CircuitBreaker:
        breaker = self._by_instance.get(instance_id)
        if breaker is None:
            breaker = self._by_instance[instance_id] = CircuitBreaker(self.failure_threshold, self.open_s)
        return breaker

    def allowed(self, views: Sequence[InstanceView], now: float) -> list[InstanceView]:
        by_instance = self._by_instance
        return [v for v in views
                if (b := by_instance.get(v.instance_id)) is None or b.allows(now)]

    def record_success(self, instance_id: str) -> None:
        """Only breakers that exist (an instance that never failed has none)."""
        breaker = self._by_instance.get(instance_id)
        if breaker is not None:
            breaker.record_success()

    def poll_answered(self, instance_id: str, now: float) -> None:
        breaker = self._by_instance.get(instance_id)
        if breaker is not None:
            breaker.poll_answered(now)

    def on_attempt(self, instance_id: str, now: float) -> None:
        """Routing chose `instance_id`: a HALF_OPEN breaker's one trial is out."""
        breaker = self._by_instance.get(instance_id)
        if breaker is not None:
            breaker.on_attempt(now)

    def state(self, instance_id: str, now: float) -> BreakerState:
        breaker = self._by_instance.get(instance_id)
        return BreakerState.CLOSED if breaker is None else breaker.state(now)


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 3
    backoff_base_s: float = 0.05
    backoff_cap_s: float = 1.0

    def delay_s(self, attempt: int, rng: Callable[[], float] = random.random) -> float:
        """Wait before attempt `attempt + 1` (full jitter, bounded by the cap)."""
        return rng() * min(self.backoff_cap_s, self.backoff_base_s * 2 ** (attempt - 1))


async def prefill_with_retries(
        pick: Callable[[set[str]], InstanceView], call: Callable[[InstanceView], Awaitable[T]],
        policy: RetryPolicy, breakers: Breakers, *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: Callable[[], float] = random.random,
        on_retry: Callable[[InstanceView, BaseException], None] | None = None,
) -> tuple[InstanceView, T]:
    """`call` on instances from `pick(tried ids)` until one succeeds, retrying instance
    faults only. Raises the last fault after `max_attempts`, or what `pick` raises
    (WorkerUnavailable) when no untried instance is left."""
    tried: set[str] = set()
    for attempt in range(1, policy.max_attempts + 1):
        view = pick(tried)
        breaker = breakers[view.instance_id]
        breaker.on_attempt(clock())
        try:
            result = await call(view)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if not is_instance_fault(e):
                raise
            breaker.record_failure(clock())
            tried.add(view.instance_id)
            if attempt == policy.max_attempts:
                raise
            if on_retry is not None:
                on_retry(view, e)
            await sleep(policy.delay_s(attempt, rng))
            continue
        breaker.record_success()
        return view, result
    raise AssertionError("unreachable")  # the loop returns or raises


class MigrationBudget:
    """How many more times one request may move to another decode."""

    def __init__(self, migration_limit: int):
        if migration_limit < 0:
            raise ValueError("migration_limit must be >= 0")
        self.migration_limit = migration_limit
        self.num_migrations = 0

    def may_migrate(self, sampling: SamplingSpec) -> bool:
        return self.num_migrations < self.migration_limit and not sampling.depends_on_output

    def spend(self) -> int:
        self.num_migrations += 1
        return self.num_migrations


def continuation(req: EngineRequest, emitted: Sequence[int]) -> EngineRequest:
    """The request that carries `req` on after the client received `emitted` token ids:
    prompt + emitted, the budget less what was emitted, no KV handle (the new decode
    computes what it lacks). Same request id: it runs on another instance, and the
    handoff's abort path (abort `request_id` on the active instance) stays as it is."""
    n = len(emitted)
    s = req.sampling
    if n >= s.max_tokens:
        raise ValueError("nothing is left to generate: the request had already ended")
    sampling = msgspec.structs.replace(s, max_tokens=s.max_tokens - n,
                                       min_tokens=max(0, s.min_tokens - n))
    return EngineRequest(request_id=req.request_id,
                         prompt_token_ids=tuple(req.prompt_token_ids) + tuple(emitted),
                         sampling=sampling, kv_handle=None)


class Watched:
    """One call the StallWatch looks after. `task` is the task that awaits the worker (the
    handoff sets it when the consuming task may have changed); `is_waiting` is false while
    the handoff hands a delta on (two stores per delta, nothing else)."""

    __slots__ = ("view", "trace", "task", "is_waiting", "is_prompt_phase", "is_stalled",
                 "_mark", "_since")

    def __init__(self, view: InstanceView, trace: RequestTrace, is_prompt_phase: bool, now: float):
        self.view = view
        self.trace = trace
        self.task: asyncio.Task | None = asyncio.current_task()
        self.is_waiting = True
        self.is_prompt_phase = is_prompt_phase
        self.is_stalled = False
        self._mark = trace.num_output_tokens
        self._since: float | None = now


class StallWatch:
    """Finds calls whose worker owes output and gives none (module docstring: "Stall
    timeout"). One scanning task per event loop while anything is watched."""

    CANCEL_MESSAGE = "pdserve: stalled worker"

    def __init__(self, timeout_s: float | None, period_s: float | None = None):
        self.timeout_s = timeout_s
        self.period_s = period_s if period_s is not None else (
            min(1.0, timeout_s / 4) if timeout_s is not None else 1.0)
        self._watched: set[Watched] = set()
        self._task: asyncio.Task | None = None
        self.num_stalled = 0

    @property
    def is_on(self) -> bool:
        return self.timeout_s is not None

    def watch(self, view: InstanceView, trace: RequestTrace, is_prompt_phase: bool) -> Watched:
        loop = asyncio.get_running_loop()
        w = Watched(view, trace, is_prompt_phase, loop.time())
        if self.timeout_s is None:
            return w
        self._watched.add(w)
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            self._task = loop.create_task(self._scan_while_watching())
        return w

    def unwatch(self, w: Watched) -> None:
        self._watched.discard(w)

    async def stop(self) -> None:
        """Ends the scanning task (the pool's shutdown): it may be asleep between scans."""
        task, self._task = self._task, None
        if task is None or task.done() or task.get_loop() is not asyncio.get_running_loop():
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _scan_while_watching(self) -> None:
        loop = asyncio.get_running_loop()
        while self._watched:
            await asyncio.sleep(self.period_s)
            self.scan(loop.time())

    def scan(self, now: float) -> list[Watched]:
        """One pass: mark and cancel the stalled calls; returns them."""
        assert self.timeout_s is not None
        stalled = []
        for w in list(self._watched):
            if not w.is_waiting or w.task is None:  # handing a delta on, not waiting
                w._since = None
                continue
            n = w.trace.num_output_tokens
            if w._since is None or n != w._mark:
                w._mark, w._since = n, now
                continue
            if now - w._since < self.timeout_s:
                continue
            if w.is_prompt_phase and w.view.is_healthy:
                continue  # computing a prompt, and the instance answers its stats poll
            w.is_stalled = True
            self._watched.discard(w)
            self.num_stalled += 1
            w.task.cancel(self.CANCEL_MESSAGE)
            stalled.append(w)
        return stalled


def stalled_instead_of_cancelled(w: Watched) -> bool:
    """Inside `except CancelledError` around a watched call: True when the cancellation was
    the watch's (then it is undone and the caller raises StreamStalled); False when someone
    else cancelled too (the client left): re-raise."""
    if not w.is_stalled:
        return False
    task = asyncio.current_task()
    return task is not None and task.uncancel() == 0


@dataclass
class Recovery:
    """The deployment's recovery state, shared by every request (one per WorkerPool)."""

    retry: RetryPolicy
    breakers: Breakers
    stall_watch: StallWatch
    migration_limit: int

    @classmethod
    def from_config(cls, config: RouterConfig) -> "Recovery":
        return cls(
            retry=RetryPolicy(max_attempts=config.prefill_max_attempts,
                              backoff_base_s=config.retry_backoff_base_s,
                              backoff_cap_s=config.retry_backoff_cap_s),
            breakers=Breakers(config.breaker_failure_threshold, config.breaker_open_s),
            stall_watch=StallWatch(config.stream_stall_timeout_s),
            migration_limit=config.migration_limit)
