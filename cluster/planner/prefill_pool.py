"""Discrete-event simulation of a pool of prefill instances.

Request lifecycle in the prefill pool:

    ARRIVED --dispatch(least outstanding prompt tokens)--> QUEUED (FCFS, per instance)
      --stage 1 free: batch under the token budget--> RUNNING (pipeline stages 1..p)
      --last stage done--> PREFILLED (first token exists; KV sits on the prefill instance)

A batch takes queued requests in order while their prompt tokens fit `token_budget` (a
longer prompt runs alone). With p pipeline stages each stage takes 1/p of the batch time;
stage 1 starts the next batch as soon as it is free, so up to p batches are in flight.
Prefill never waits on decode: KV stays on the prefill instance until a decode instance
pulls it, and prefill-side KV memory is assumed sufficient (documented in docs/planner.md).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

from .jit import jit
from .latency_model import EngineTiming

# Event kinds in the order they are handled at equal times. Arrivals at time t are taken
# before any event at t, and an idle instance starts its batch in a KICK event after them,
# so requests arriving together can share a batch.
_BATCH_DONE, _STAGE1_FREE, _KICK = 0, 1, 2


@dataclass(frozen=True)
class PrefillPool:
    num_instances: int
    timing: EngineTiming
    token_budget: int = 4096  # prompt tokens per batch (vLLM's max_num_batched_tokens)

    def __post_init__(self) -> None:
        if self.num_instances < 1 or self.token_budget < 1:
            raise ValueError("a prefill pool needs >= 1 instance and token_budget >= 1")


@dataclass(frozen=True)
class PrefillOutcome:
    done_s: np.ndarray  # [N] time the first token exists; inf if not simulated (stopped early)
    instance_ids: np.ndarray  # [N] prefill instance that served the request
    num_violations: int  # requests whose done_s - arrival > ttft_limit_s
    stopped_early: bool


def simulate_prefill_pool(
    arrival_s: np.ndarray,
    input_lens: np.ndarray,
    pool: PrefillPool,
    ttft_limit_s: float = float("inf"),
    max_violations: int | None = None,
) -> PrefillOutcome:
    """Run every request through the pool. Stops as soon as more than `max_violations`
    requests have missed `ttft_limit_s` (the caller then knows the SLO is lost)."""
    n = len(arrival_s)
    fixed_ms, b, c, overhead = pool.timing.prefill_coefficients_ms()
    done, inst_of, violations, stopped = _prefill_pool_kernel(
        np.asarray(arrival_s, dtype=np.float64), np.asarray(input_lens, dtype=np.int64),
        int(pool.num_instances), int(pool.timing.pipeline_parallel_size), int(pool.token_budget),
        float(fixed_ms), float(b), float(c), bool(overhead),
        float(ttft_limit_s), int(max_violations if max_violations is not None else n + 1))
    return PrefillOutcome(done, inst_of, int(violations), bool(stopped))


@jit
def _prefill_pool_kernel(arrivals, lens, k, pp, budget, fixed_ms, b, c, overhead, ttft_limit_s, limit):
    """The event loop (numba-compiled: the planner's hot path); `simulate_prefill_pool` gives
    the contract. arrivals: [N] float64, ascending; lens: [N] int64. The stage times are
    `EngineTiming.prefill_stage_s` written out: `fixed_ms` is its fixed cost of one stage."""
    n = len(arrivals)
    done = np.full(n, np.inf)
    inst_of = np.zeros(n, dtype=np.int64)
    # FCFS queue per instance as linked lists (head/tail per instance, next per request).
    q_head = np.full(k, -1, dtype=np.int64)
    q_tail = np.full(k, -1, dtype=np.int64)
    q_next = np.full(n, -1, dtype=np.int64)
    outstanding = np.zeros(k, dtype=np.int64)  # prompt tokens queued or running, what the router balances on
    stage1_busy = np.zeros(k, dtype=np.bool_)
    stage_free = np.zeros((k, pp))
    members = np.zeros(n, dtype=np.int64)  # batches' requests, each batch a slice [lo, hi)
    filled = 0
    events = [(0.0, 0, 0, 0, 0, 0)]  # (time, kind, seq, instance, lo, hi)
    events.pop()
    seq = 0
    violations = 0

    next_arrival = 0
    while next_arrival < n or len(events):
        if len(events) and (next_arrival >= n or events[0][0] < arrivals[next_arrival]):
            now, kind, _, i, lo, hi = heapq.heappop(events)
            if kind == _BATCH_DONE:
                for j in range(lo, hi):
                    r = members[j]
                    done[r] = now
                    outstanding[i] -= lens[r]
                    if now - arrivals[r] > ttft_limit_s:
                        violations += 1
                if violations > limit:
                    return done, inst_of, violations, True
                continue
            if kind == _STAGE1_FREE:
                stage1_busy[i] = False
                if q_head[i] < 0:
                    continue
            # Start a batch on instance i: queued requests in order while their prompt
            # tokens fit the budget (a longer prompt runs alone).
            lo = filled
            tokens = sq = 0
            while q_head[i] >= 0:
                r = q_head[i]
                l = lens[r]
                if filled > lo and tokens + l > budget:
                    break
                q_head[i] = q_next[r]
                if q_head[i] < 0:
                    q_tail[i] = -1
                members[filled] = r
                filled += 1
                tokens += l
                sq += l * l
            stage = fixed_ms + (b * tokens + c * sq) / pp
            first = (stage + (2.0 + 1e-4 * tokens if overhead else 0.0)) / 1000.0
            later = stage / 1000.0
            t = now + first
            stage_free[i, 0] = t
            for s in range(1, pp):  # a later stage may still be busy with the previous batch
                t = (stage_free[i, s] if stage_free[i, s] > t else t) + later
                stage_free[i, s] = t
            stage1_busy[i] = True
            heapq.heappush(events, (now + first, _STAGE1_FREE, seq, i, 0, 0))
            heapq.heappush(events, (t, _BATCH_DONE, seq + 1, i, lo, filled))
            seq += 2
        else:
            r = next_arrival
            next_arrival += 1
            now = arrivals[r]
            i = 0
            for j in range(1, k):  # the least outstanding tokens, first on ties
                if outstanding[j] < outstanding[i]:
                    i = j
            inst_of[r] = i
            if q_tail[i] < 0:
                q_head[i] = r
            else:
                q_next[q_tail[i]] = r
            q_tail[i] = r
            outstanding[i] += lens[r]
            if not stage1_busy[i]:
                stage1_busy[i] = True  # until the kick starts the batch
                heapq.heappush(events, (now, _KICK, seq, i, 0, 0))
                seq += 1
    return done, inst_of, violations, False
