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
from dataclasses import dataclass
from typing import Literal

import numpy as np

from .jit import jit
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
    limit = max_violations if max_violations is not None else n + 1
    timing = pool.timing  # one lane's: pipeline degree 1, so a stage is the whole iteration
    fixed_ms, pb, pc, overhead = timing.prefill_coefficients_ms()
    p = timing.profile
    first, finish, counts = _colocated_kernel(
        np.asarray(arrival_s, dtype=np.float64), np.asarray(input_lens, dtype=np.int64),
        np.asarray(output_lens, dtype=np.int64),
        int(pool.num_instances * pool.pipeline_parallel_size), int(pool.pipeline_parallel_size),
        int(pool.kv_capacity_tokens // pool.pipeline_parallel_size), int(pool.token_budget),
        int(pool.max_num_seqs), pool.scheduler == "chunked_prefill", pool.memory == "paged",
        int(pool.block_size), float(pool.admission_watermark),
        float(fixed_ms), float(p.prefill[0]), float(pb), float(pc), bool(overhead),
        int(p.decoding_large_small_bs_threshold), np.array(p.decoding_smallbs, dtype=np.float64),
        np.array(p.decoding_largebs, dtype=np.float64), float(ttft_limit_s), float(tpot_limit_s),
        int(limit))
    violations = int(counts[_VIOLATIONS])
    return ColocatedOutcome(first, finish, violations, violations > limit, int(counts[_PREEMPTIONS]))


# Counters of the kernel, one int64 array (its helpers cannot rebind the caller's scalars).
_SEQ, _VIOLATIONS, _PREEMPTIONS = 0, 1, 2
# What admission decides for the request at the head of WAITING.
_ADMITTED, _MUST_WAIT, _NEVER_FITS = 0, 1, 2


@jit
def _colocated_kernel(
    arrivals, ins, outs, k, lanes, cap, budget, max_seqs, chunked, paged, block_size, watermark,
    prefill_fixed_ms, pa, pb, pc, overhead, thr, small, large, ttft_limit_s, tpot_limit_s,
    limit,
):
    """The event loop (numba-compiled: a hot path of the search's colocated baselines);
    `simulate_colocated_pool` gives the contract. arrivals: [N] float64, ascending; ins, outs:
    [N] int64; k lanes in all (`lanes` per instance), `cap` tokens of KV each; small, large:
    decode coefficients (a, b, c) below / from `thr`; pa: the prefill profile's fixed cost,
    `prefill_fixed_ms` the same for one (lane-)stage. Iteration times are `EngineTiming`'s
    `prefill_latency_s`, `decode_step_s` and `mixed_step_s` at pipeline degree 1, written out."""
    n = len(arrivals)
    inf = np.inf
    first = np.full(n, inf)
    finish = np.full(n, inf)
    flagged = np.zeros(n, dtype=np.bool_)
    counts = np.zeros(3, dtype=np.int64)
    slack = block_size // 2 if paged else 0
    admit_cap = cap * (1.0 - watermark) if paged else float(cap)
    # Tokens a request's prefill computes: its prompt, or after a preemption its prompt
    # and every token it had generated (recompute); the KV then holds plen[r] tokens and
    # grows by one per decode step. done[r]: output tokens produced so far.
    plen = ins.copy()
    done = np.zeros(n, dtype=np.int64)
    join_step = np.zeros(n, dtype=np.int64)
    epoch = np.zeros(n, dtype=np.int64)
    progress = np.zeros(n, dtype=np.int64)  # prompt tokens computed (chunked, while prefilling)
    in_running = np.zeros(n, dtype=np.bool_)  # in its lane's decode batch (paged: preemptible)
    # Per lane (every instance's lanes, flat). WAITING is FCFS with preempted requests back
    # at its head: linked lists, head/tail per lane and next per request (-1: none).
    w_head = np.full(k, -1, dtype=np.int64)
    w_tail = np.full(k, -1, dtype=np.int64)
    w_next = np.full(n, -1, dtype=np.int64)
    b = np.zeros(k, dtype=np.int64)  # decode batch size
    ctx = np.zeros(k, dtype=np.int64)  # its context tokens
    step = np.zeros(k, dtype=np.int64)  # decode steps done
    reserved = np.zeros(k, dtype=np.int64)
    admitted = np.zeros(k, dtype=np.int64)
    outstanding = np.zeros(k, dtype=np.int64)  # prompt tokens waiting or prefilling: dispatch balances on it
    busy = np.zeros(k, dtype=np.bool_)
    own_s = np.zeros(k)  # the current iteration's own time (its batch through every stage)
    cur_decode_b = np.zeros(k, dtype=np.int64)  # decode batch of the iteration in flight
    prefilling = [[0] for _ in range(k)]  # admitted, prompt partly computed (chunked only)
    cur = [[(0, 0, 0)] for _ in range(k)]  # the iteration in flight: (request, new, prefix tokens)
    fin = [[(0, 0, 0)] for _ in range(k)]  # heaps of (finish step, request, its epoch)
    newest = [[(0, 0)] for _ in range(k)]  # max-heaps of (-request, epoch), lazily pruned
    for i in range(k):  # the literals above only fix the element types
        prefilling[i].pop()
        cur[i].pop()
        fin[i].pop()
        newest[i].pop()
    events = [(0.0, 0, 0, 0)]  # (time, seq, lane, 1: iteration done / 0: kick)
    events.pop()

    def violate(r):
        if not flagged[r]:
            flagged[r] = True
            counts[_VIOLATIONS] += 1

    def decode_ms(batch, context):
        """`EngineTiming.decode_step_s`, in ms."""
        co = small if batch < thr else large
        ms = co[0] + co[1] * (context + batch) + co[2] * batch
        if overhead:
            ms += 2.0 + 1e-4 * context
        return ms

    def join(i, r):
        b[i] += 1
        ctx[i] += plen[r]
        join_step[r] = step[i]
        in_running[r] = True
        heapq.heappush(newest[i], (-r, epoch[r]))
        heapq.heappush(fin[i], (step[i] + outs[r] - done[r], r, epoch[r]))

    def schedule(i, now):
        chunks = cur[i]
        chunks.clear()
        left = budget - (b[i] if chunked else 0)
        for r in prefilling[i]:  # chunked: continue admitted prompts first
            if left <= 0:
                break
            take = min(plen[r] - progress[r], left)
            chunks.append((r, take, progress[r]))
            left -= take
        while w_head[i] >= 0 and left > 0:
            r = w_head[i]
            if not chunked and len(chunks) and plen[r] > left:
                break
            verdict = _ADMITTED
            if ins[r] + outs[r] + slack > cap:
                violate(r)
                verdict = _NEVER_FITS
            else:
                need = plen[r] + slack if paged else ins[r] + outs[r]
                if reserved[i] + need > admit_cap or admitted[i] >= max_seqs:
                    verdict = _MUST_WAIT
                else:
                    reserved[i] += need
                    admitted[i] += 1
            if verdict == _MUST_WAIT:
                break
            w_head[i] = w_next[r]
            if w_head[i] < 0:
                w_tail[i] = -1
            w_next[r] = -1
            if verdict == _NEVER_FITS:
                continue
            take = min(plen[r], left) if chunked else plen[r]
            if chunked:
                prefilling[i].append(r)
                progress[r] = 0
            chunks.append((r, take, 0))
            left -= take
        if len(chunks) and not chunked:  # `prefill_latency_s`
            tokens = sq = 0
            for _, take, _ in chunks:
                tokens += take
                sq += take * take
            ms = prefill_fixed_ms + (pb * tokens + pc * sq)
            if overhead:
                ms += 2.0 + 1e-4 * tokens
            decode_b = 0
        elif len(chunks):  # `mixed_step_s` (chunked)
            decode_b = b[i]
            new = quad = 0
            for _, take, prefix in chunks:
                new += take
                quad += take * take + 2 * take * prefix
            context = ctx[i] if decode_b else 0
            ms = pb * new + pc * quad
            fixed = pa
            if decode_b:
                co = small if decode_b < thr else large
                ms += co[1] * (context + decode_b) + co[2] * decode_b
                fixed = max(pa, co[0])
            ms += fixed
            if overhead:
                ms += 2.0 + 1e-4 * (context + new)
        elif b[i]:
            decode_b = b[i]
            ms = decode_ms(decode_b, ctx[i])
        else:
            busy[i] = False
            return
        dt = ms / 1000.0
        if lanes > 1:  # the lanes share the stages: one turn of every busy lane, at least
            own_s[i] = dt
            start = i - i % lanes
            turn = 0.0
            for o in range(start, start + lanes):
                if o != i and busy[o]:
                    turn += own_s[o]
            dt = max(dt, (dt + turn) / lanes)
        busy[i] = True
        cur_decode_b[i] = decode_b
        heapq.heappush(events, (now + dt, counts[_SEQ], i, 1))
        counts[_SEQ] += 1

    def preempt(i):
        """Newest running requests out (vLLM: the last of its FCFS running list) until the
        lane's KV fits; each goes back to the head of WAITING and will recompute."""
        while reserved[i] > cap and b[i]:  # b[i]: the lane's running requests
            neg, e = heapq.heappop(newest[i])
            r = -neg
            if not in_running[r] or e != epoch[r]:
                continue  # finished or preempted since this entry was pushed
            in_running[r] = False
            kv = plen[r] + step[i] - join_step[r]  # its last prefill's KV plus a token per step since
            done[r] += step[i] - join_step[r]
            epoch[r] += 1  # its finish-heap entry is void
            b[i] -= 1
            ctx[i] -= kv
            reserved[i] -= kv + slack
            admitted[i] -= 1
            plen[r] = kv + 1  # its KV, and the newest token, which was never fed
            outstanding[i] += plen[r]
            w_next[r] = w_head[i]
            w_head[i] = r
            if w_tail[i] < 0:
                w_tail[i] = r
            counts[_PREEMPTIONS] += 1

    def iteration_done(i, now):
        if cur_decode_b[i]:
            step[i] += 1
            ctx[i] += b[i]
            if paged:
                reserved[i] += b[i]
            heap = fin[i]
            while len(heap) and heap[0][0] <= step[i]:
                _, r, e = heapq.heappop(heap)
                if e != epoch[r]:
                    continue  # preempted since this entry was pushed
                finish[r] = now
                in_running[r] = False
                b[i] -= 1
                ctx[i] -= ins[r] + outs[r] - 1
                reserved[i] -= (ins[r] + outs[r] - 1 + slack) if paged else ins[r] + outs[r]
                admitted[i] -= 1
                if (now - first[r]) / (outs[r] - 1) > tpot_limit_s:  # cluster.slo.tpot_s
                    violate(r)
            if paged and reserved[i] > cap:
                preempt(i)
        for r, take, prefix in cur[i]:
            if prefix + take < plen[r]:
                progress[r] = prefix + take
                continue
            if chunked:
                prefilling[i].remove(r)
            outstanding[i] -= plen[r]
            done[r] += 1  # a prefill (first or recompute) yields the next token
            if done[r] == 1:
                first[r] = now
                if now - arrivals[r] > ttft_limit_s:
                    violate(r)
            if done[r] >= outs[r]:
                finish[r] = now
                reserved[i] -= (plen[r] + slack) if paged else ins[r] + outs[r]
                admitted[i] -= 1
                if outs[r] > 1 and (now - first[r]) / (outs[r] - 1) > tpot_limit_s:
                    violate(r)
            else:
                join(i, r)

    nxt = 0
    while nxt < n or len(events):
        # Arrivals at time t are taken before events at t; an idle lane starts in a kick
        # event after them, so requests arriving together batch together.
        if len(events) and (nxt >= n or events[0][0] < arrivals[nxt]):
            now, _, i, is_iteration = heapq.heappop(events)
            if is_iteration:
                iteration_done(i, now)
                if counts[_VIOLATIONS] > limit:
                    break
            schedule(i, now)
        else:
            r = nxt
            nxt += 1
            now = arrivals[r]
            i = 0
            for j in range(1, k):  # the fewest outstanding prompt tokens, first on ties
                if outstanding[j] < outstanding[i]:
                    i = j
            if w_tail[i] < 0:
                w_head[i] = r
            else:
                w_next[w_tail[i]] = r
            w_tail[i] = r
            outstanding[i] += ins[r]
            if not busy[i]:
                busy[i] = True  # until the kick schedules an iteration
                heapq.heappush(events, (now, counts[_SEQ], i, 0))
                counts[_SEQ] += 1
    return first, finish, counts
