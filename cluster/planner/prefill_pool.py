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
from collections import deque
from dataclasses import dataclass

import numpy as np

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
    arrivals = arrival_s.tolist()
    lens = input_lens.tolist()
    done = [float("inf")] * n
    inst_of = [0] * n
    k, pp, budget = pool.num_instances, pool.timing.pipeline_parallel_size, pool.token_budget
    stage_s = pool.timing.prefill_stage_s
    queues: list[deque[int]] = [deque() for _ in range(k)]
    outstanding = [0] * k  # prompt tokens queued or running, what the router balances on
    stage1_busy = [False] * k
    stage_free = [[0.0] * pp for _ in range(k)]
    events: list[tuple[float, int, int, int, tuple[int, ...]]] = []
    seq = 0
    violations = 0
    limit = max_violations if max_violations is not None else n + 1

    def start_batch(i: int, now: float) -> None:
        nonlocal seq
        q = queues[i]
        batch = []
        tokens = sq = 0
        while q:
            l = lens[q[0]]
            if batch and tokens + l > budget:
                break
            batch.append(q.popleft())
            tokens += l
            sq += l * l
        first, later = stage_s(tokens, sq)
        free = stage_free[i]
        t = now + first
        free[0] = t
        for s in range(1, pp):  # a later stage may still be busy with the previous batch
            t = (free[s] if free[s] > t else t) + later
            free[s] = t
        stage1_busy[i] = True
        heapq.heappush(events, (now + first, _STAGE1_FREE, seq, i, ()))
        heapq.heappush(events, (t, _BATCH_DONE, seq + 1, i, tuple(batch)))
        seq += 2

    next_arrival = 0
    while next_arrival < n or events:
        if events and (next_arrival >= n or events[0][0] < arrivals[next_arrival]):
            now, kind, _, i, batch = heapq.heappop(events)
            if kind == _KICK:
                start_batch(i, now)
            elif kind == _STAGE1_FREE:
                stage1_busy[i] = False
                if queues[i]:
                    start_batch(i, now)
            else:
                for r in batch:
                    done[r] = now
                    outstanding[i] -= lens[r]
                    if now - arrivals[r] > ttft_limit_s:
                        violations += 1
                if violations > limit:
                    return PrefillOutcome(np.array(done), np.array(inst_of), violations, True)
        else:
            r = next_arrival
            next_arrival += 1
            now = arrivals[r]
            i = min(range(k), key=outstanding.__getitem__) if k > 1 else 0
            inst_of[r] = i
            queues[i].append(r)
            outstanding[i] += lens[r]
            if not stage1_busy[i]:
                stage1_busy[i] = True  # until the kick starts the batch
                heapq.heappush(events, (now, _KICK, seq, i, ()))
                seq += 1
    return PrefillOutcome(np.array(done), np.array(inst_of), violations, False)
