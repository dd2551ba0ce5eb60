"""Discrete-event simulation of colocated instances (the vLLM-style baseline).

Request lifecycle on one colocated instance:

    ARRIVED --dispatch(least outstanding prompt tokens)--> WAITING (FCFS)
      --KV for prompt+output reserved--> PREFILLING (whole prompt, or chunk by chunk)
      --last prompt token computed: first token--> RUNNING (one token per iteration)
      --last token--> FINISHED (reservation released)

Two schedulers, one iteration at a time per instance:
- `prefill_priority` (vLLM without chunking): if any waiting prompt can be admitted, the
  iteration is a prefill batch under the token budget and every decode stalls behind it;
  otherwise it is one decode step of all running requests.
- `chunked_prefill` (Sarathi / vLLM chunked prefill): every iteration carries one token of
  each running request, and the rest of the token budget is filled with prompt chunks FCFS.
Pipeline parallelism (`pipeline_parallel_size` p > 1): an instance runs p interleaved
micro-batch lanes (vLLM's virtual engines), each with its own scheduler and 1/p of the
instance's KV cache; a lane's iteration visits every stage, so it takes the unpipelined time
of its own batch (`timing` is then the lane timing: pipeline degree 1, with the fixed cost of
all p stages, see `EngineTiming.stage_fixed_cost`). Requests are routed to the lane with the
fewest outstanding prompt tokens.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass
from typing import Literal

import numpy as np

from .latency_model import EngineTiming

ColocatedScheduler = Literal["prefill_priority", "chunked_prefill"]


@dataclass(frozen=True)
class ColocatedPool:
    num_instances: int
    timing: EngineTiming
    kv_capacity_tokens: int
    scheduler: ColocatedScheduler = "prefill_priority"
    token_budget: int = 4096
    max_num_seqs: int = 128
    pipeline_parallel_size: int = 1  # lanes per instance; `timing` is one lane's

    def __post_init__(self) -> None:
        if self.timing.pipeline_parallel_size != 1 or self.pipeline_parallel_size < 1:
            raise ValueError("colocated timing is per lane (pipeline degree 1); set pipeline_parallel_size")
        if self.num_instances < 1 or self.token_budget < 1 or self.max_num_seqs < 1:
            raise ValueError("a colocated pool needs >= 1 instance, token_budget >= 1, max_num_seqs >= 1")


@dataclass(frozen=True)
class ColocatedOutcome:
    first_token_s: np.ndarray  # [N] inf if never reached
    finish_s: np.ndarray  # [N]
    num_violations: int
    stopped_early: bool


class _Instance:
    __slots__ = ("waiting", "prefilling", "progress", "b", "ctx", "step", "fin", "reserved",
                 "admitted", "busy", "outstanding")

    def __init__(self) -> None:
        self.waiting: deque[int] = deque()
        self.prefilling: list[int] = []  # admitted, prompt partly computed (chunked only)
        self.progress: dict[int, int] = {}
        self.b = self.ctx = self.step = self.reserved = self.admitted = self.outstanding = 0
        self.fin: list[tuple[int, int]] = []
        self.busy = False


def simulate_colocated_pool(
    arrival_s: np.ndarray,
    input_lens: np.ndarray,
    output_lens: np.ndarray,
    pool: ColocatedPool,
    ttft_limit_s: float = float("inf"),
    tpot_limit_s: float = float("inf"),
    max_violations: int | None = None,
) -> ColocatedOutcome:
    n = len(arrival_s)
    arrivals, ins, outs = arrival_s.tolist(), input_lens.tolist(), output_lens.tolist()
    first = [float("inf")] * n
    finish = [float("inf")] * n
    flagged = [False] * n
    lanes = pool.pipeline_parallel_size
    cap, budget, max_seqs = pool.kv_capacity_tokens // lanes, pool.token_budget, pool.max_num_seqs
    timing, chunked = pool.timing, pool.scheduler == "chunked_prefill"
    insts = [_Instance() for _ in range(pool.num_instances * lanes)]  # lanes of every instance
    events: list[tuple[float, int, int, tuple]] = []
    seq = 0
    violations = 0
    limit = max_violations if max_violations is not None else n + 1

    def violate(r: int) -> None:
        nonlocal violations
        if not flagged[r]:
            flagged[r] = True
            violations += 1

    def try_reserve(st: _Instance, r: int) -> bool | None:
        """True: reserved; False: must wait; None: can never fit (request failed)."""
        need = ins[r] + outs[r]
        if need > cap:
            violate(r)
            return None
        if st.reserved + need > cap or st.admitted >= max_seqs:
            return False
        st.reserved += need
        st.admitted += 1
        return True

    def schedule(i: int, now: float) -> None:
        nonlocal seq
        st = insts[i]
        chunks: list[tuple[int, int, int]] = []  # (request, new tokens, prefix tokens)
        left = budget - (st.b if chunked else 0)
        for r in st.prefilling:  # chunked: continue admitted prompts first
            if left <= 0:
                break
            take = min(ins[r] - st.progress[r], left)
            chunks.append((r, take, st.progress[r]))
            left -= take
        while st.waiting and left > 0:
            r = st.waiting[0]
            if not chunked and chunks and ins[r] > left:
                break
            ok = try_reserve(st, r)
            if ok is False:
                break
            st.waiting.popleft()
            if ok is None:
                continue
            take = min(ins[r], left) if chunked else ins[r]
            if chunked:
                st.prefilling.append(r)
                st.progress[r] = 0
            chunks.append((r, take, 0))
            left -= take
        if chunks and not chunked:
            tokens = sum(c[1] for c in chunks)
            dt = timing.prefill_latency_s(tokens, sum(c[1] * c[1] for c in chunks))
            decode_b = 0
        elif chunks or st.b:
            decode_b = st.b if (chunked or not chunks) else 0
            dt = timing.mixed_step_s([c[1] for c in chunks], [c[2] for c in chunks],
                                     decode_b, st.ctx if decode_b else 0)
        else:
            st.busy = False
            return
        st.busy = True
        heapq.heappush(events, (now + dt, seq, i, (tuple(chunks), decode_b)))
        seq += 1

    def iteration_done(i: int, now: float, chunks: tuple, decode_b: int) -> None:
        st = insts[i]
        if decode_b:
            st.step += 1
            st.ctx += st.b
            while st.fin and st.fin[0][0] == st.step:
                _, r = heapq.heappop(st.fin)
                finish[r] = now
                st.b -= 1
                st.ctx -= ins[r] + outs[r] - 1
                st.reserved -= ins[r] + outs[r]
                st.admitted -= 1
                # cluster.slo.tpot_s, inlined: this is the simulator's hot loop
                if (now - first[r]) / (outs[r] - 1) > tpot_limit_s:
                    violate(r)
        for r, take, prefix in chunks:
            if prefix + take < ins[r]:
                st.progress[r] = prefix + take
                continue
            if chunked:
                st.prefilling.remove(r)
                del st.progress[r]
            st.outstanding -= ins[r]
            first[r] = now
            if now - arrivals[r] > ttft_limit_s:
                violate(r)
            if outs[r] == 1:
                finish[r] = now
                st.reserved -= ins[r] + 1
                st.admitted -= 1
            else:
                st.b += 1
                st.ctx += ins[r]
                heapq.heappush(st.fin, (st.step + outs[r] - 1, r))

    k = len(insts)
    nxt = 0
    while nxt < n or events:
        # Arrivals at time t are taken before events at t; an idle instance starts in a
        # kick event (chunks None) after them, so requests arriving together batch together.
        if events and (nxt >= n or events[0][0] < arrivals[nxt]):
            now, _, i, (chunks, decode_b) = heapq.heappop(events)
            if chunks is not None:
                iteration_done(i, now, chunks, decode_b)
                if violations > limit:
                    break
            schedule(i, now)
        else:
            r = nxt
            nxt += 1
            now = arrivals[r]
            i = min(range(k), key=lambda j: insts[j].outstanding) if k > 1 else 0
            st = insts[i]
            st.waiting.append(r)
            st.outstanding += ins[r]
            if not st.busy:
                st.busy = True  # until the kick schedules an iteration
                heapq.heappush(events, (now, seq, i, (None, 0)))
                seq += 1
    return ColocatedOutcome(np.array(first), np.array(finish), violations, violations > limit)
