"""Discrete-event simulation of KV transfer and a pool of decode instances.

(Over ~400 lines on purpose: one event loop. Its events (arrival, transfer done, step
boundary, preemption) mutate the same per-lane state, and the loop is the planner's hot
path, compiled with numba (`jit.py`); split, the lifecycle below would have no single place
to read.)

Request lifecycle on the decode side (push model: decode allocates KV, then prefill writes):

    PREFILLED --route(most free KV among allowed instances)--> WAITING (FCFS, per instance)
      --admission: KV fits, a sequence slot and token budget are free--> TRANSFERRING
      --link free (FCFS per link), bytes/bandwidth + latency--> READY
      --next step boundary of the least-loaded lane--> RUNNING (one token per step)
      --last token--> FINISHED (KV freed; waiting requests re-checked)
    RUNNING --KV exhausted at a step (paged memory): newest request of the lane-->
      PREEMPTED (its KV freed, back to the head of WAITING; re-admitted, it recomputes its
      prompt plus the tokens generated so far on the decode instance: vLLM's recompute)

Two memory models (`DecodePool.memory`):

- `paged` (vLLM's and DistServe's engines): admission allocates the prompt's KV; every step
  each running request grows by one token; when a step leaves the instance over capacity,
  the newest requests of that lane are preempted. Admission keeps `admission_watermark`
  of the cache free (vLLM's watermark), so a freshly admitted batch does not preempt at
  once. Block granularity is modelled in aggregate: each request holds half a block of
  unused slots on average (`block_size / 2` tokens).
- `reserve` (the planner's earlier model, kept for comparison): admission reserves the
  final footprint (prompt + output), so nothing is ever preempted.

KV load on the step path (`kv_load_s_per_token` > 0): the instance loads a request's KV
inside its step loop, so the step the request joins takes `prompt tokens x
kv_load_s_per_token` longer for every request of the lane. DistServe's decode engine
migrates KV block by block between steps (`post_process` awaits each migration); vLLM's
connector loads synchronously before the forward of the step. 0: the load overlaps steps.
With pipeline lanes the load holds the instance's one step loop: it waits for the
micro-batches in flight to leave every stage (the youngest has p - 1 of p stages to go), and
every lane's next step waits for the load. This pipeline drain is what makes DistServe's
TP1xPP2 decode collapse between 8 and 10 req/s: once most loop turns carry a migration, the
two micro-batches no longer overlap and the instance runs at half speed.

Admission limits (both models): `max_num_seqs` sequences per instance and
`max_num_batched_tokens` tokens per step (a decode step schedules one token per sequence).
A request that can never fit (prompt + output over the whole cache) fails (finish = inf).
A decode instance with p pipeline stages runs p interleaved micro-batches ("lanes"). A
lane's step takes the unpipelined step time of its own batch (see `EngineTiming`), or, when
the instance's lanes together keep a stage busy for longer, one turn of every lane through
that stage (the sum of their step times over p): lanes share the stages, so a light lane
waits for a heavy one and every request of the instance sees about the same TPOT.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Literal

import numpy as np

from .jit import jit
from .latency_model import EngineTiming

# Event kinds in the order they are handled at equal times: a transfer landing at the end
# of a step joins the next step; an idle lane starts in a KICK event after every arrival and
# transfer at that instant, so requests landing together share a step.
_TRANSFER_DONE, _STEP_DONE, _KICK = 0, 1, 2

DecodeMemory = Literal["paged", "reserve"]


@dataclass(frozen=True)
class DecodePool:
    num_instances: int
    timing: EngineTiming
    kv_capacity_tokens: int
    max_num_seqs: int = 128
    memory: DecodeMemory = "paged"
    block_size: int = 1  # tokens per KV block; 1 = no rounding
    max_num_batched_tokens: int | None = None  # tokens per step; None = no limit
    admission_watermark: float = 0.0  # share of the cache kept free when admitting
    kv_load_s_per_token: float = 0.0  # > 0: loading a request's KV stalls the step it joins

    def __post_init__(self) -> None:
        if self.num_instances < 1 or self.max_num_seqs < 1 or self.kv_capacity_tokens < 0:
            raise ValueError("a decode pool needs >= 1 instance, max_num_seqs >= 1, capacity >= 0")
        if self.block_size < 1 or not 0 <= self.admission_watermark < 1:
            raise ValueError("block_size must be >= 1 and admission_watermark in [0, 1)")

    @property
    def num_lanes(self) -> int:
        return self.timing.pipeline_parallel_size


@dataclass(frozen=True)
class TransferTopology:
    """Which decode instances each prefill instance may hand to, and over which link.

    Links are FCFS servers (a prefill instance's NVLink, a node's NIC); a transfer of L
    prompt tokens holds its link for `latency_s + L * seconds_per_token[p][d]`.
    """

    decode_candidates: tuple[tuple[int, ...], ...]  # [num_prefill] -> allowed decode ids
    link_ids: tuple[tuple[int, ...], ...]  # [num_prefill][num_decode]
    seconds_per_token: tuple[tuple[float, ...], ...]  # [num_prefill][num_decode]
    num_links: int
    latency_s: float = 0.0


@dataclass(frozen=True)
class DecodeOutcome:
    kv_ready_s: np.ndarray  # [N] KV landed on the decode instance (inf: not reached)
    finish_s: np.ndarray  # [N] last token (inf: failed or not simulated)
    transfer_s: np.ndarray  # [N] link-busy seconds of the request's own transfer
    num_violations: int
    stopped_early: bool
    num_preemptions: int = 0


def simulate_decode_pool(
    ready_s: np.ndarray,
    input_lens: np.ndarray,
    output_lens: np.ndarray,
    pool: DecodePool,
    topology: TransferTopology | None = None,
    prefill_ids: np.ndarray | None = None,
    tpot_base_s: np.ndarray | None = None,
    tpot_limit_s: float = float("inf"),
    ttft_deadline_s: np.ndarray | None = None,
    already_violating: np.ndarray | None = None,
    max_violations: int | None = None,
) -> DecodeOutcome:
    """Decode every request with output_len >= 2, in order of `ready_s` (first token exists).

    TPOT of a request = (finish - base) / (output_len - 1), base = `tpot_base_s` (the first
    token time) or, when None, its KV-ready time. `ttft_deadline_s`, when given, counts a
    violation for KV landing after it (first token released by decode). Requests flagged in
    `already_violating` are not counted twice. Stops after `max_violations`.
    """
    n = len(ready_s)
    ready = np.asarray(ready_s, dtype=np.float64)
    ins = np.asarray(input_lens, dtype=np.int64)
    outs = np.asarray(output_lens, dtype=np.int64)
    eligible = np.flatnonzero(outs >= 2)
    order = eligible[np.argsort(ready[eligible], kind="stable")]  # by (ready time, id)
    empty_f = np.zeros(0)
    base = np.asarray(tpot_base_s, dtype=np.float64) if tpot_base_s is not None else empty_f
    deadline = np.asarray(ttft_deadline_s, dtype=np.float64) if ttft_deadline_s is not None else empty_f
    flagged = (np.array(already_violating, dtype=np.bool_) if already_violating is not None
               else np.zeros(n, dtype=np.bool_))
    pids = np.asarray(prefill_ids, dtype=np.int64) if prefill_ids is not None else np.zeros(n, np.int64)
    limit = max_violations if max_violations is not None else n + 1
    k = pool.num_instances
    if topology is not None:
        widest = max(len(c) for c in topology.decode_candidates)
        cands = np.full((len(topology.decode_candidates), widest), -1, dtype=np.int64)
        for p, allowed in enumerate(topology.decode_candidates):
            cands[p, :len(allowed)] = allowed
        link_ids = np.array(topology.link_ids, dtype=np.int64).reshape(-1, k)
        spt = np.array(topology.seconds_per_token, dtype=np.float64).reshape(-1, k)
        num_links, lat = topology.num_links, topology.latency_s
    else:
        cands = np.arange(k, dtype=np.int64).reshape(1, k)
        link_ids, spt, num_links, lat = np.zeros((1, k), np.int64), np.zeros((1, k)), 0, 0.0
    thr, small, large, oa, ob = pool.timing.decode_coefficients_ms()
    max_tokens = pool.max_num_batched_tokens if pool.max_num_batched_tokens is not None else pool.max_num_seqs
    kv_ready, finish, xfer, counts = _decode_pool_kernel(
        ins, outs, ready[order], order, base, deadline, flagged, pids, cands, link_ids, spt,
        int(num_links), float(lat), topology is not None, int(k), int(pool.num_lanes),
        int(pool.kv_capacity_tokens), int(min(pool.max_num_seqs, max_tokens)),  # one token per sequence and step
        pool.memory == "paged", int(pool.block_size), float(pool.admission_watermark),
        int(thr), np.array(small, dtype=np.float64), np.array(large, dtype=np.float64), float(oa), float(ob),
        np.array(pool.timing.profile.prefill, dtype=np.float64),
        1000.0 * pool.kv_load_s_per_token, float(tpot_limit_s),
        tpot_limit_s != float("inf") and max_violations is not None, int(limit))
    violations, preemptions = int(counts[_VIOLATIONS]), int(counts[_PREEMPTIONS])
    return DecodeOutcome(kv_ready, finish, xfer, violations, violations > limit, preemptions)


# Counters of the kernel, one int64 array (its helpers cannot rebind the caller's scalars).
_SEQ, _VIOLATIONS, _PREEMPTIONS = 0, 1, 2


@jit
def _decode_pool_kernel(
    ins, outs, arrivals, arrival_ids, base, deadline, flagged, pids, cands, link_ids, spt, num_links, lat,
    has_topology, k, lanes_per, cap, max_seqs, paged, block_size, watermark,
    thr, small, large, oa, ob, recompute, load_ms_per_token, tpot_limit_s, check_deadlines, limit,
):
    """The event loop (numba-compiled: it is the planner's hot path). Arrays in, per-request
    times and counters out; `simulate_decode_pool` documents the arguments' meaning.

    ins, outs, pids: [N] int64; arrival_ids: the requests with output >= 2 by ready time
    (`arrivals`, float64);
    base, deadline: [N] float64 or empty (absent); flagged: [N] bool, updated in place;
    cands: [num_prefill, widest] allowed decode ids, -1 padded; link_ids, spt: [num_prefill, k];
    small, large: decode coefficients (a, b, c) below / from `thr`; recompute: prefill (a, b, c).
    """
    n = len(ins)
    inf = np.inf
    kv_ready = np.full(n, inf)
    finish = np.full(n, inf)
    xfer = np.zeros(n)
    counts = np.zeros(3, dtype=np.int64)
    has_base, has_deadline = len(base) > 0, len(deadline) > 0
    slack = block_size // 2 if paged else 0  # unused slots of a request's last block
    admit_cap = cap * (1.0 - watermark)
    link_free = np.zeros(max(num_links, 1))

    used = np.zeros(k, dtype=np.int64)  # KV tokens held (paged: current contexts; reserve: final footprints)
    admitted = np.zeros(k, dtype=np.int64)
    # FCFS waiting queue per instance as linked lists (a request waits in one queue at most):
    # head/tail per instance, next per request, -1 = none.
    w_head = np.full(k, -1, dtype=np.int64)
    w_tail = np.full(k, -1, dtype=np.int64)
    w_next = np.full(n, -1, dtype=np.int64)
    waiting_tokens = np.zeros(k, dtype=np.int64)
    generated = np.zeros(n, dtype=np.int64)  # decode steps done before a preemption (recomputed on re-admission)
    epoch = np.zeros(n, dtype=np.int64)  # bumped on preemption: invalidates the request's finish-heap entry
    join_step = np.zeros(n, dtype=np.int64)
    running = np.zeros(n, dtype=np.bool_)
    # Lane state, flat index = instance * lanes_per + lane.
    num_lanes = k * lanes_per
    lane_b = np.zeros(num_lanes, dtype=np.int64)  # running batch size
    lane_ctx = np.zeros(num_lanes, dtype=np.int64)  # sum of context lengths of running requests
    lane_step = np.zeros(num_lanes, dtype=np.int64)  # steps completed
    lane_busy = np.zeros(num_lanes, dtype=np.bool_)
    lane_own = np.zeros(num_lanes)  # own ms of the lane's current step (pipeline lanes only)
    # KV loads by other lanes of the same instance, not yet charged to this lane: the
    # instance's step loop awaits each load (DistServe's decode loop migrates between
    # steps), so every running lane's next step waits for it: a pipeline bubble.
    lane_stall_ms = np.zeros(num_lanes)
    pending = [[0] for _ in range(num_lanes)]  # ready requests joining the lane's next step
    finishing = [[(0, 0, 0)] for _ in range(num_lanes)]  # heaps of (step, request, epoch)
    joined = [[0] for _ in range(num_lanes)]  # join order, lazily pruned
    for lane in range(num_lanes):  # the literals above only fix the element types
        pending[lane].pop()
        finishing[lane].pop()
        joined[lane].pop()
    events = [(0.0, 0, 0, 0)]  # (time, kind, seq, payload)
    events.pop()
    # TPOT deadlines (base + limit x (output - 1)) of unfinished requests: once the clock
    # passes one, that request cannot meet TPOT any more, so it counts as a violation at
    # once instead of at its (late) finish. Overloaded runs then stop early.
    deadlines = [(0.0, 0)]
    deadlines.pop()

    def push(time, kind, payload):
        heapq.heappush(events, (time, kind, counts[_SEQ], payload))
        counts[_SEQ] += 1

    def fail(r):
        if not flagged[r]:
            counts[_VIOLATIONS] += 1
            flagged[r] = True

    def pop_waiting(d):
        r = w_head[d]
        w_head[d] = w_next[r]
        if w_head[d] < 0:
            w_tail[d] = -1
        w_next[r] = -1

    def append_waiting(d, r):
        if w_tail[d] < 0:
            w_head[d] = r
        else:
            w_next[w_tail[d]] = r
        w_tail[d] = r

    def footprint(r):
        """KV tokens admission allocates for r."""
        return ins[r] + generated[r] + slack if paged else ins[r] + outs[r]

    def own_ms(lane):
        """The lane's batch through all stages, unpipelined."""
        b, ctx = lane_b[lane], lane_ctx[lane]
        co = small if b < thr else large
        return co[0] + co[1] * (ctx + b) + co[2] * b + oa + ob * ctx

    def lane_ms(lane):
        """One step of the lane: its own batch through all stages, or, when the instance's
        lanes together keep a stage busy for longer, one turn of every lane on that stage
        (the other lanes at the batch of the step they run now)."""
        own = own_ms(lane)
        if lanes_per == 1:
            return own
        lane_own[lane] = own
        first = lane - lane % lanes_per
        total = own
        for other in range(first, first + lanes_per):
            if other != lane and lane_busy[other] and lane_b[other]:
                total += lane_own[other]
        return max(own, total / lanes_per)

    def start_step(lane, now):
        pend = pending[lane]
        extra_ms = lane_stall_ms[lane]
        lane_stall_ms[lane] = 0.0
        if len(pend):
            load_ms = 0.0
            b, ctx, step, fin = lane_b[lane], lane_ctx[lane], lane_step[lane], finishing[lane]
            for r in pend:
                b += 1
                g = generated[r]
                ctx += ins[r] + g
                if g:  # the profile's unpipelined prefill of the recomputed context
                    length = ins[r] + g
                    extra_ms += recompute[0] + recompute[1] * length + recompute[2] * (length * length)
                else:
                    load_ms += load_ms_per_token * ins[r]
                join_step[r] = step
                running[r] = True
                joined[lane].append(r)
                heapq.heappush(fin, (step + outs[r] - 1 - g, r, epoch[r]))
            lane_b[lane], lane_ctx[lane] = b, ctx
            pend.clear()
            if load_ms and lanes_per > 1:
                # The load waits for the micro-batches in flight to leave every stage (the
                # youngest has p - 1 stages to go), and the next launch waits for the load.
                first = lane - lane % lanes_per
                busy_others, slowest = False, 0.0
                for o in range(first, first + lanes_per):
                    if o != lane and lane_busy[o] and lane_b[o]:
                        slowest = lane_own[o] if not busy_others else max(slowest, lane_own[o])
                        busy_others = True
                if busy_others:
                    load_ms += slowest * (lanes_per - 1) / lanes_per
                for other in range(first, first + lanes_per):
                    if other != lane and lane_busy[other]:  # an idle lane has no step to delay
                        lane_stall_ms[other] += load_ms
            extra_ms += load_ms
        dt = (lane_ms(lane) + extra_ms) / 1000.0
        lane_busy[lane] = True
        push(now + dt, _STEP_DONE, lane)

    def admit(d, now):
        while w_head[d] >= 0:
            r = w_head[d]
            if ins[r] + outs[r] + slack > cap:  # can never finish here: fail, do not block the queue
                pop_waiting(d)
                waiting_tokens[d] -= ins[r] + outs[r]
                fail(r)
                continue
            need = footprint(r)
            if admitted[d] >= max_seqs or (admitted[d] and used[d] + need > admit_cap):
                return
            pop_waiting(d)
            waiting_tokens[d] -= ins[r] + outs[r]
            used[d] += need
            admitted[d] += 1
            if generated[r]:  # preempted earlier: recomputes locally, no transfer
                push(now, _TRANSFER_DONE, r * k + d)
                continue
            done = now
            if has_topology:
                p = pids[r]
                link = link_ids[p, d]
                dur = lat + ins[r] * spt[p, d]
                start = link_free[link] if link_free[link] > now else now
                done = start + dur
                link_free[link] = done
                xfer[r] = dur
            push(done, _TRANSFER_DONE, r * k + d)

    def preempt(lane, d):
        """Free KV by evicting the lane's newest requests until the instance fits."""
        order_l = joined[lane]
        while used[d] > cap and lane_b[lane] > 1:
            r = order_l.pop()
            if not running[r]:
                continue  # finished earlier; pruned lazily
            g = generated[r] + lane_step[lane] - join_step[r]
            lane_b[lane] -= 1
            lane_ctx[lane] -= ins[r] + g
            used[d] -= ins[r] + generated[r] + slack + (lane_step[lane] - join_step[r])
            admitted[d] -= 1
            generated[r] = g
            running[r] = False
            epoch[r] += 1
            counts[_PREEMPTIONS] += 1
            w_next[r] = w_head[d]  # back to the head of the queue
            w_head[d] = r
            if w_tail[d] < 0:
                w_tail[d] = r
            waiting_tokens[d] += ins[r] + outs[r]

    nxt = 0
    total = len(arrival_ids)
    while nxt < total or len(events):
        if len(events) and (nxt >= total or events[0][0] < arrivals[nxt]):
            now, kind, _, payload = heapq.heappop(events)
            if check_deadlines:
                while len(deadlines) and deadlines[0][0] < now:
                    _, r = heapq.heappop(deadlines)
                    if finish[r] == inf:
                        fail(r)
                if counts[_VIOLATIONS] > limit:
                    break
            if kind == _KICK:
                start_step(payload, now)
            elif kind == _STEP_DONE:
                lane = payload
                d = lane // lanes_per
                step = lane_step[lane] + 1
                lane_step[lane] = step
                b = lane_b[lane]
                lane_ctx[lane] += b
                if paged:
                    used[d] += b
                fin = finishing[lane]
                freed = False
                while len(fin) and fin[0][0] <= step:
                    _, r, ep = heapq.heappop(fin)
                    if ep != epoch[r]:
                        continue  # preempted since this entry was pushed
                    finish[r] = now
                    running[r] = False
                    lane_b[lane] -= 1
                    lane_ctx[lane] -= ins[r] + outs[r] - 1
                    used[d] -= (ins[r] + outs[r] - 1 + slack) if paged else ins[r] + outs[r]
                    admitted[d] -= 1
                    freed = True
                    if not flagged[r]:
                        t0 = base[r] if has_base else kv_ready[r]
                        if (now - t0) / (outs[r] - 1) > tpot_limit_s:  # cluster.slo.tpot_s
                            counts[_VIOLATIONS] += 1
                            flagged[r] = True
                if counts[_VIOLATIONS] > limit:
                    break
                if paged and used[d] > cap:
                    preempt(lane, d)
                if freed:
                    admit(d, now)
                if len(pending[lane]) or lane_stall_ms[lane]:
                    start_step(lane, now)
                elif lane_b[lane]:  # start_step without joins, shortened
                    ms = own_ms(lane)
                    if lanes_per > 1:  # lane_ms, with this lane busy and so in the turn
                        lane_own[lane] = ms
                        first = lane - lane % lanes_per
                        turn = 0.0
                        for other in range(first, first + lanes_per):
                            if lane_busy[other] and lane_b[other]:
                                turn += lane_own[other]
                        if turn > ms * lanes_per:
                            ms = turn / lanes_per
                    push(now + ms / 1000.0, _STEP_DONE, lane)
                else:
                    lane_busy[lane] = False
            else:  # transfer done (or a preempted request re-admitted)
                r, d = divmod(payload, k)
                if not generated[r]:
                    kv_ready[r] = now
                    if check_deadlines and not has_base and not flagged[r]:  # TPOT from KV-ready
                        heapq.heappush(deadlines, (now + tpot_limit_s * (outs[r] - 1), r))
                    if has_deadline and not flagged[r] and now > deadline[r]:
                        fail(r)
                        if counts[_VIOLATIONS] > limit:
                            break
                first = d * lanes_per
                lane = first
                for other in range(first + 1, first + lanes_per):  # the least loaded, first on ties
                    if lane_b[other] + len(pending[other]) < lane_b[lane] + len(pending[lane]):
                        lane = other
                pending[lane].append(r)
                if not lane_busy[lane]:
                    lane_busy[lane] = True  # until the kick starts the step
                    push(now, _KICK, lane)
        else:
            now = arrivals[nxt]
            r = arrival_ids[nxt]
            nxt += 1
            p = pids[r] if has_topology else 0
            # The router's "most free KV": capacity minus held KV and queued demand (the
            # first of the least loaded).
            d = cands[p, 0]
            load = used[d] + waiting_tokens[d]
            for j in cands[p, 1:]:
                if j < 0:
                    break
                if used[j] + waiting_tokens[j] < load:
                    d, load = j, used[j] + waiting_tokens[j]
            append_waiting(d, r)
            waiting_tokens[d] += ins[r] + outs[r]
            if check_deadlines and has_base and not flagged[r]:
                heapq.heappush(deadlines, (base[r] + tpot_limit_s * (outs[r] - 1), r))
            admit(d, now)
    return kv_ready, finish, xfer, counts
