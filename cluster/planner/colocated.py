"""Discrete-event simulation of colocated instances (the vLLM-style baseline).

Request lifecycle on one colocated instance:

    ARRIVED --dispatch(least outstanding prompt tokens)--> WAITING (FCFS)
      --KV admitted--> PREFILLING (whole prompt, or chunk by chunk)
      --last prompt token computed: first token--> RUNNING (one token per iteration)
      --last token--> FINISHED (KV released)
    RUNNING --KV exhausted after a step (paged)--> PREEMPTED: newest running request of the
      lane, KV freed, back to the head of WAITING; re-admitted, it recomputes its prompt and
      the tokens it had generated in one prefill, which also yields its next token

Memory (`memory`), as vLLM's block manager does it:
- `paged` (vLLM): admission allocates the prompt's KV (plus half a block of slack, block
  rounding in aggregate) if it fits under `capacity x (1 - admission_watermark)`; each
  decode step grows every running request by a token; a step that leaves the lane over
  capacity preempts (recompute) its newest requests until it fits.
- `reserve`: admission reserves prompt + output up front; nothing is ever preempted.

Two schedulers, one iteration at a time per instance:
- `prefill_priority` (vLLM without chunking): if any waiting prompt can be admitted, the
  iteration is a prefill batch under the token budget and every decode stalls behind it;
  otherwise it is one decode step of all running requests.
- `chunked_prefill` (Sarathi / vLLM chunked prefill): every iteration carries one token of
  each running request, and the rest of the token budget is filled with prompt chunks FCFS.
Pipeline parallelism (`pipeline_parallel_size` p > 1): an instance runs p interleaved
micro-batch lanes (vLLM's virtual engines), each with its own scheduler and 1/p of the
instance's KV cache; a lane's iteration visits every stage, so it takes the unpipelined time
of its own batch (`timing` is then the lane timing: pipeline degree 1, see
`EngineTiming.stage_fixed_cost`), or, when the busy lanes together keep a stage busy for
longer, one turn of all of them (the sum of their iteration times over p): the lanes share
the stages (as `decode_pool`'s lanes do). Requests are routed to the lane with the fewest
outstanding prompt tokens.
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
    memory: Literal["paged", "reserve"] = "reserve"
    block_size: int = 1  # tokens per KV block (paged: half a block of slack per request)
    admission_watermark: float = 0.0  # paged: share of the cache kept free when admitting

    def __post_init__(self) -> None:
        if self.timing.pipeline_parallel_size != 1 or self.pipeline_parallel_size < 1:
            raise ValueError("colocated timing is per lane (pipeline degree 1); set pipeline_parallel_size")
        if self.num_instances < 1 or self.token_budget < 1 or self.max_num_seqs < 1:
            raise ValueError("a colocated pool needs >= 1 instance, token_budget >= 1, max_num_seqs >= 1")
        if self.block_size < 1 or not 0 <= self.admission_watermark < 1:
            raise ValueError("block_size must be >= 1 and admission_watermark in [0, 1)")


@dataclass(frozen=True)
class ColocatedOutcome:
    first_token_s: np.ndarray  # [N] inf if never reached
    finish_s: np.ndarray  # [N]
    num_violations: int
    stopped_early: bool
    num_preemptions: int = 0


class _Instance:
    __slots__ = ("waiting", "prefilling", "progress", "b", "ctx", "step", "fin", "reserved",
                 "admitted", "busy", "outstanding", "running", "own_s")

    def __init__(self) -> None:
        self.waiting: deque[int] = deque()
        self.prefilling: list[int] = []  # admitted, prompt partly computed (chunked only)
        self.progress: dict[int, int] = {}
        self.b = self.ctx = self.step = self.reserved = self.admitted = self.outstanding = 0
        self.fin: list[tuple[int, int, int]] = []  # (finish step, request, its epoch)
        self.running: set[int] = set()  # requests in the decode batch (paged: preemptible)
        self.busy = False
        self.own_s = 0.0  # the current iteration's own time (its batch through every stage)


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
    paged = pool.memory == "paged"
    slack = pool.block_size // 2 if paged else 0
    admit_cap = cap * (1.0 - pool.admission_watermark) if paged else cap
    # Tokens a request's prefill computes: its prompt, or after a preemption its prompt
    # and every token it had generated (recompute); the KV then holds plen[r] tokens and
    # grows by one per decode step. done[r]: output tokens produced so far.
    plen = list(ins)
    done = [0] * n
    join_step = [0] * n
    epoch = [0] * n
    preemptions = 0
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
        """True: admitted; False: must wait; None: can never fit (request failed)."""
        if ins[r] + outs[r] + slack > cap:
            violate(r)
            return None
        need = plen[r] + slack if paged else ins[r] + outs[r]
        if st.reserved + need > admit_cap or st.admitted >= max_seqs:
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
            take = min(plen[r] - st.progress[r], left)
            chunks.append((r, take, st.progress[r]))
            left -= take
        while st.waiting and left > 0:
            r = st.waiting[0]
            if not chunked and chunks and plen[r] > left:
                break
            ok = try_reserve(st, r)
            if ok is False:
                break
            st.waiting.popleft()
            if ok is None:
                continue
            take = min(plen[r], left) if chunked else plen[r]
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
        if lanes > 1:  # the lanes share the stages: one turn of every busy lane, at least
            st.own_s = dt
            start = i - i % lanes
            turn = sum(insts[o].own_s for o in range(start, start + lanes) if o != i and insts[o].busy)
            dt = max(dt, (dt + turn) / lanes)
        st.busy = True
        heapq.heappush(events, (now + dt, seq, i, (tuple(chunks), decode_b)))
        seq += 1

    def held(st: _Instance, r: int) -> int:
        """KV tokens a running request holds: its last prefill's plus one per step since."""
        return plen[r] + st.step - join_step[r]

    def preempt(st: _Instance) -> None:
        """Newest running requests out (vLLM: the last of its FCFS running list) until the
        lane's KV fits; each goes back to the head of WAITING and will recompute."""
        nonlocal preemptions
        while st.reserved > cap and st.running:
            r = max(st.running)  # request ids are in arrival order
            st.running.discard(r)
            kv = held(st, r)
            done[r] += st.step - join_step[r]
            epoch[r] += 1  # its finish-heap entry is void
            st.b -= 1
            st.ctx -= kv
            st.reserved -= kv + slack
            st.admitted -= 1
            plen[r] = kv + 1  # its KV, and the newest token, which was never fed
            st.outstanding += plen[r]
            st.waiting.appendleft(r)
            preemptions += 1

    def iteration_done(i: int, now: float, chunks: tuple, decode_b: int) -> None:
        st = insts[i]
        if decode_b:
            st.step += 1
            st.ctx += st.b
            if paged:
                st.reserved += st.b
            while st.fin and st.fin[0][0] <= st.step:
                _, r, e = heapq.heappop(st.fin)
                if e != epoch[r]:
                    continue  # preempted since this entry was pushed
                finish[r] = now
                st.running.discard(r)
                st.b -= 1
                st.ctx -= ins[r] + outs[r] - 1
                st.reserved -= (ins[r] + outs[r] - 1 + slack) if paged else ins[r] + outs[r]
                st.admitted -= 1
                # cluster.slo.tpot_s, inlined: this is the simulator's hot loop
                if (now - first[r]) / (outs[r] - 1) > tpot_limit_s:
                    violate(r)
            if paged and st.reserved > cap:
                preempt(st)
        for r, take, prefix in chunks:
            if prefix + take < plen[r]:
                st.progress[r] = prefix + take
                continue
            if chunked:
                st.prefilling.remove(r)
                del st.progress[r]
            st.outstanding -= plen[r]
            done[r] += 1  # a prefill (first or recompute) yields the next token
            if done[r] == 1:
                first[r] = now
                if now - arrivals[r] > ttft_limit_s:
                    violate(r)
            if done[r] >= outs[r]:
                finish[r] = now
                st.reserved -= (plen[r] + slack) if paged else ins[r] + outs[r]
                st.admitted -= 1
                if outs[r] > 1 and (now - first[r]) / (outs[r] - 1) > tpot_limit_s:
                    violate(r)
            else:
                st.b += 1
                st.ctx += plen[r]
                join_step[r] = st.step
                st.running.add(r)
                heapq.heappush(st.fin, (st.step + outs[r] - done[r], r, epoch[r]))

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
    return ColocatedOutcome(np.array(first), np.array(finish), violations, violations > limit,
                            preemptions)
