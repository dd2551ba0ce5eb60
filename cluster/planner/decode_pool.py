"""Discrete-event simulation of KV transfer and a pool of decode instances.

(Over ~400 lines on purpose: one event loop. Its events (arrival, transfer done, step
boundary, preemption) mutate the same per-lane state, and the loop is the planner's hot
path, inlined for speed; split, the lifecycle below would have no single place to read.)

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
from collections import deque
from dataclasses import dataclass
from typing import Literal

import numpy as np

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
    ins, outs = input_lens.tolist(), output_lens.tolist()
    kv_ready = [float("inf")] * n
    finish = [float("inf")] * n
    xfer = [0.0] * n
    base = tpot_base_s.tolist() if tpot_base_s is not None else None
    deadline = ttft_deadline_s.tolist() if ttft_deadline_s is not None else None
    flagged = already_violating.tolist() if already_violating is not None else [False] * n
    pids = prefill_ids.tolist() if prefill_ids is not None else [0] * n
    limit = max_violations if max_violations is not None else n + 1
    violations = 0
    preemptions = 0

    k, lanes_per = pool.num_instances, pool.num_lanes
    cap, max_seqs = pool.kv_capacity_tokens, pool.max_num_seqs
    paged = pool.memory == "paged"
    slack = pool.block_size // 2 if paged else 0  # unused slots of a request's last block
    admit_cap = cap * (1.0 - pool.admission_watermark)
    max_tokens = pool.max_num_batched_tokens if pool.max_num_batched_tokens is not None else max_seqs
    max_seqs = min(max_seqs, max_tokens)  # one token per sequence and step
    thr, small, large, oa, ob = pool.timing.decode_coefficients_ms()
    recompute_ms = pool.timing.profile.prefill_ms  # unpipelined prefill of the recomputed context
    load_ms_per_token = 1000.0 * pool.kv_load_s_per_token
    all_ids = tuple(range(k))
    if topology is not None:
        cands, link_ids, spt = topology.decode_candidates, topology.link_ids, topology.seconds_per_token
        link_free = [0.0] * topology.num_links
        lat = topology.latency_s

    used = [0] * k  # KV tokens held (paged: current contexts; reserve: final footprints)
    admitted = [0] * k
    waiting: list[deque[int]] = [deque() for _ in range(k)]
    waiting_tokens = [0] * k
    generated = [0] * n  # decode steps done before a preemption (recomputed on re-admission)
    epoch = [0] * n  # bumped on preemption: invalidates the request's finish-heap entry
    join_step = [0] * n
    # Lane state, flat index = instance * lanes_per + lane.
    num_lanes = k * lanes_per
    lane_b = [0] * num_lanes  # running batch size
    lane_ctx = [0] * num_lanes  # sum of context lengths of running requests
    lane_step = [0] * num_lanes  # steps completed
    lane_busy = [False] * num_lanes
    lane_own = [0.0] * num_lanes  # own_ms of the lane's current step (pipeline lanes only)
    # KV loads by other lanes of the same instance, not yet charged to this lane: the
    # instance's step loop awaits each load (DistServe's decode loop migrates between
    # steps), so every running lane's next step waits for it: a pipeline bubble.
    lane_stall_ms = [0.0] * num_lanes
    lane_pending: list[list[int]] = [[] for _ in range(num_lanes)]
    lane_finish: list[list[tuple[int, int, int]]] = [[] for _ in range(num_lanes)]  # (step, req, epoch)
    lane_order: list[list[int]] = [[] for _ in range(num_lanes)]  # join order, lazily pruned
    running = [False] * n
    events: list[tuple[float, int, int, int]] = []
    seq = 0
    # TPOT deadlines (base + limit x (output - 1)) of unfinished requests: once the clock
    # passes one, that request cannot meet TPOT any more, so it counts as a violation at
    # once instead of at its (late) finish. Overloaded runs then stop early.
    deadlines: list[tuple[float, int]] = []
    check_deadlines = tpot_limit_s != float("inf") and max_violations is not None

    order = sorted((t, r) for r, t in enumerate(ready_s.tolist()) if outs[r] >= 2)
    arrivals = [t for t, _ in order]
    arrival_ids = [r for _, r in order]

    def footprint(r: int) -> int:
        """KV tokens admission allocates for r."""
        return ins[r] + generated[r] + slack if paged else ins[r] + outs[r]

    def own_ms(lane: int) -> float:
        """The lane's batch through all stages, unpipelined."""
        b, ctx = lane_b[lane], lane_ctx[lane]
        a, bb, c = small if b < thr else large
        return a + bb * (ctx + b) + c * b + oa + ob * ctx

    def lane_ms(lane: int) -> float:
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

    def start_step(lane: int, now: float) -> None:
        nonlocal seq
        pend = lane_pending[lane]
        extra_ms = lane_stall_ms[lane]
        lane_stall_ms[lane] = 0.0
        if pend:
            load_ms = 0.0
            b, ctx, step, fin = lane_b[lane], lane_ctx[lane], lane_step[lane], lane_finish[lane]
            for r in pend:
                b += 1
                g = generated[r]
                ctx += ins[r] + g
                if g:
                    extra_ms += recompute_ms((ins[r] + g,))
                else:
                    load_ms += load_ms_per_token * ins[r]
                join_step[r] = step
                running[r] = True
                lane_order[lane].append(r)
                heapq.heappush(fin, (step + outs[r] - 1 - g, r, epoch[r]))
            lane_b[lane], lane_ctx[lane] = b, ctx
            pend.clear()
            if load_ms and lanes_per > 1:
                # The load waits for the micro-batches in flight to leave every stage (the
                # youngest has p - 1 stages to go), and the next launch waits for the load.
                first = lane - lane % lanes_per
                others = [o for o in range(first, first + lanes_per)
                          if o != lane and lane_busy[o] and lane_b[o]]
                if others:
                    load_ms += max(lane_own[o] for o in others) * (lanes_per - 1) / lanes_per
                for other in range(first, first + lanes_per):
                    if other != lane and lane_busy[other]:  # an idle lane has no step to delay
                        lane_stall_ms[other] += load_ms
            extra_ms += load_ms
        dt = (lane_ms(lane) + extra_ms) / 1000.0
        lane_busy[lane] = True
        heapq.heappush(events, (now + dt, _STEP_DONE, seq, lane))
        seq += 1

    def fail(r: int) -> None:
        nonlocal violations
        if not flagged[r]:
            violations += 1
            flagged[r] = True

    def admit(d: int, now: float) -> None:
        nonlocal seq
        q = waiting[d]
        while q:
            r = q[0]
            if ins[r] + outs[r] + slack > cap:  # can never finish here: fail, do not block the queue
                q.popleft()
                waiting_tokens[d] -= ins[r] + outs[r]
                fail(r)
                continue
            need = footprint(r)
            if admitted[d] >= max_seqs or (admitted[d] and used[d] + need > admit_cap):
                return
            q.popleft()
            waiting_tokens[d] -= ins[r] + outs[r]
            used[d] += need
            admitted[d] += 1
            if generated[r]:  # preempted earlier: recomputes locally, no transfer
                heapq.heappush(events, (now, _TRANSFER_DONE, seq, r * k + d))
                seq += 1
                continue
            if topology is None:
                done = now
            else:
                p = pids[r]
                link = link_ids[p][d]
                dur = lat + ins[r] * spt[p][d]
                start = link_free[link] if link_free[link] > now else now
                done = start + dur
                link_free[link] = done
                xfer[r] = dur
            heapq.heappush(events, (done, _TRANSFER_DONE, seq, r * k + d))
            seq += 1

    def preempt(lane: int, d: int) -> None:
        """Free KV by evicting the lane's newest requests until the instance fits."""
        nonlocal preemptions
        order_l = lane_order[lane]
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
            preemptions += 1
            waiting[d].appendleft(r)
            waiting_tokens[d] += ins[r] + outs[r]

    nxt = 0
    total = len(arrivals)
    while nxt < total or events:
        if events and (nxt >= total or events[0][0] < arrivals[nxt]):
            now, kind, _, payload = heapq.heappop(events)
            if check_deadlines:
                while deadlines and deadlines[0][0] < now:
                    _, r = heapq.heappop(deadlines)
                    if finish[r] == float("inf"):
                        fail(r)
                if violations > limit:
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
                fin = lane_finish[lane]
                freed = False
                while fin and fin[0][0] <= step:
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
                        t0 = base[r] if base is not None else kv_ready[r]
                        # cluster.slo.tpot_s, inlined: this is the simulator's hot loop
                        if (now - t0) / (outs[r] - 1) > tpot_limit_s:
                            violations += 1
                            flagged[r] = True
                if violations > limit:
                    break
                if paged and used[d] > cap:
                    preempt(lane, d)
                if freed:
                    admit(d, now)
                if lane_pending[lane] or lane_stall_ms[lane]:
                    start_step(lane, now)
                elif b := lane_b[lane]:  # start_step without joins, inlined (the hot path)
                    ctx = lane_ctx[lane]
                    a, bb, c = small if b < thr else large
                    ms = a + bb * (ctx + b) + c * b + oa + ob * ctx
                    if lanes_per > 1:  # lane_ms, inlined: this lane is busy, so in `total`
                        lane_own[lane] = ms
                        first = lane - lane % lanes_per
                        turn = 0.0
                        for other in range(first, first + lanes_per):
                            if lane_busy[other] and lane_b[other]:
                                turn += lane_own[other]
                        if turn > ms * lanes_per:
                            ms = turn / lanes_per
                    heapq.heappush(events, (now + ms / 1000.0, _STEP_DONE, seq, lane))
                    seq += 1
                else:
                    lane_busy[lane] = False
            else:  # transfer done (or a preempted request re-admitted)
                r, d = divmod(payload, k)
                if not generated[r]:
                    kv_ready[r] = now
                    if check_deadlines and base is None and not flagged[r]:  # TPOT from KV-ready
                        heapq.heappush(deadlines, (now + tpot_limit_s * (outs[r] - 1), r))
                    if deadline is not None and not flagged[r] and now > deadline[r]:
                        fail(r)
                        if violations > limit:
                            break
                first = d * lanes_per
                lane = first if lanes_per == 1 else min(
                    range(first, first + lanes_per), key=lambda l: lane_b[l] + len(lane_pending[l]))
                lane_pending[lane].append(r)
                if not lane_busy[lane]:
                    lane_busy[lane] = True  # until the kick starts the step
                    heapq.heappush(events, (now, _KICK, seq, lane))
                    seq += 1
        else:
            now = arrivals[nxt]
            r = arrival_ids[nxt]
            nxt += 1
            allowed = cands[pids[r]] if topology is not None else all_ids
            # The router's "most free KV": capacity minus held KV and queued demand.
            # (The first of the least-loaded, written out: this loop is hot.)
            d = allowed[0]
            load = used[d] + waiting_tokens[d]
            for j in allowed[1:]:
                if used[j] + waiting_tokens[j] < load:
                    d, load = j, used[j] + waiting_tokens[j]
            waiting[d].append(r)
            waiting_tokens[d] += ins[r] + outs[r]
            if check_deadlines and base is not None and not flagged[r]:
                heapq.heappush(deadlines, (base[r] + tpot_limit_s * (outs[r] - 1), r))
            admit(d, now)
    stopped = violations > limit
    return DecodeOutcome(np.array(kv_ready), np.array(finish), np.array(xfer), violations, stopped,
                         preemptions)
