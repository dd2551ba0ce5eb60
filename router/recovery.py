"""Recovery from worker faults: prefill retries behind per-instance circuit breakers, and
decode migration that continues a stream on another instance. Policies only: the handoff
(router/handoff.py) calls them at the two points described under "Hooks".

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
    OPEN instances are skipped by routing; HALF_OPEN lets one trial request through.

Decode migration (after tokens reached the client). The stream continues on another decode
with `continuation(req, emitted)`: the prompt grows by the tokens the client already has
(the new decode recomputes their KV), the budget shrinks by them, so nothing is repeated
and nothing skipped; tokens lost in flight never reached the client and are generated
anew. At most `migration_limit` times per request. Not migrated: requests whose sampling
depends on earlier output (penalties, grammars, bad words: `SamplingSpec.depends_on_output`),
for which emitted tokens turned into prompt would change the semantics; they end with the
error. Greedy requests continue exactly as an uninterrupted run would; seeded sampling
continues validly but not bit-identically (the new engine's generator starts afresh).

Hooks (router/handoff.py, owned by the coordinator):
1. `Handoff._disaggregated`: replace the single `view.client.prefill(...)` by
   `prefill_with_retries(pick, call, policy, breakers)`, where `pick(tried)` is
   `pool.pick_prefill(route)` over available views minus `tried` and minus those
   `breakers.allows()` refuses, and `call(view)` is the existing begin/prefill/prompt_done
   block for that view.
2. `Handoff._stream` for a decode: on an exception `is_instance_fault` accepts (not
   `delta.error`), with `budget.may_migrate(sampling)`, build `continuation(req, emitted)`
   (`emitted`: token ids this stream already yielded, after the replayed-first drop), pick
   another decode (`pool.pick_decode` minus the failed one), count
   `pdserve_request_migrations_total{reason}` and stream the continuation in place.
"""

from __future__ import annotations

import asyncio
import enum
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import msgspec

from cluster.channel import ChannelError
from cluster.wire import EngineRequest, SamplingSpec, WorkerUnavailable
from router.pool import InstanceView

T = TypeVar("T")


def is_instance_fault(exc: BaseException) -> bool:
    """The instance, not the request, failed: its connection broke, it vanished or it
    stopped answering. Anything else would fail the same way on another instance."""
    return isinstance(exc, (ChannelError, ConnectionError, asyncio.TimeoutError, TimeoutError,
                            WorkerUnavailable, EOFError))


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

    def state(self, now: float) -> BreakerState:
        if self._opened_at is None:
            return BreakerState.CLOSED
        if now - self._opened_at < self.open_s:
            return BreakerState.OPEN
        return BreakerState.HALF_OPEN

    def allows(self, now: float) -> bool:
        state = self.state(now)
        return state == BreakerState.CLOSED or (state == BreakerState.HALF_OPEN and not self._trial_out)

    def on_attempt(self, now: float) -> None:
        if self.state(now) == BreakerState.HALF_OPEN:
            self._trial_out = True

    def record_success(self) -> None:
        self._failures = 0
        self._opened_at = None
        self._trial_out = False

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
        return [v for v in views if self[v.instance_id].allows(now)]


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
