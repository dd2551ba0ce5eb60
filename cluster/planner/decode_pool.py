"""Discrete-event simulation of KV transfer and a pool of decode instances.

Request lifecycle on the decode side (push model: decode reserves KV, then prefill writes):

    PREFILLED --route(most free KV among allowed instances)--> WAITING (FCFS, per instance)
      --KV for prompt+output fits and a sequence slot is free: reserve--> TRANSFERRING
      --link free (FCFS per link), bytes/bandwidth + latency--> READY
      --next step boundary of the least-loaded lane--> RUNNING (one token per step)
      --last token--> FINISHED (reservation released; waiting requests re-checked)

Admission reserves the request's final footprint (prompt + output tokens), so a running
request is never preempted; a request larger than the whole cache fails (finish = inf).
A decode instance with p pipeline stages runs p interleaved micro-batches ("lanes"); each
lane's step takes the unpipelined step time of its own batch (see `EngineTiming`).
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass

import numpy as np

from .latency_model import EngineTiming

# Event kinds in the order they are handled at equal times: a transfer landing at the end
# of a step joins the next step; an idle lane starts in a KICK event after every arrival and
# transfer at that instant, so requests landing together share a step.
_TRANSFER_DONE, _STEP_DONE, _KICK = 0, 1, 2


@dataclass(frozen=True)
class DecodePool:
    num_instances: int
    timing: EngineTiming
    kv_capacity_tokens: int
    max_num_seqs: int = 128

    def __post_init__(self) -> None:
        if self.num_instances < 1 or self.max_num_seqs < 1 or self.kv_capacity_tokens < 0:
            raise ValueError("a decode pool needs >= 1 instance, max_num_seqs >= 1, capacity >= 0")

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

    k, lanes_per = pool.num_instances, pool.num_lanes
    cap, max_seqs = pool.kv_capacity_tokens, pool.max_num_seqs
    thr, small, large, oa, ob = pool.timing.decode_coefficients_ms()
    all_ids = tuple(range(k))
    if topology is not None:
        cands, link_ids, spt = topology.decode_candidates, topology.link_ids, topology.seconds_per_token
        link_free = [0.0] * topology.num_links
        lat = topology.latency_s

    reserved = [0] * k
    admitted = [0] * k
    waiting: list[deque[int]] = [deque() for _ in range(k)]
    waiting_tokens = [0] * k
    # Lane state, flat index = instance * lanes_per + lane.
    num_lanes = k * lanes_per
    lane_b = [0] * num_lanes  # running batch size
    lane_ctx = [0] * num_lanes  # sum of context lengths of running requests
    lane_step = [0] * num_lanes  # steps completed
    lane_busy = [False] * num_lanes
    lane_pending: list[list[int]] = [[] for _ in range(num_lanes)]
    lane_finish: list[list[tuple[int, int]]] = [[] for _ in range(num_lanes)]  # heap (step, req)
    events: list[tuple[float, int, int, int]] = []
    seq = 0

    order = sorted((t, r) for r, t in enumerate(ready_s.tolist()) if outs[r] >= 2)
    arrivals = [t for t, _ in order]
    arrival_ids = [r for _, r in order]

    def start_step(lane: int, now: float) -> None:
        nonlocal seq
        pend = lane_pending[lane]
        if pend:
            b, ctx, step, fin = lane_b[lane], lane_ctx[lane], lane_step[lane], lane_finish[lane]
            for r in pend:
                b += 1
                ctx += ins[r]
                heapq.heappush(fin, (step + outs[r] - 1, r))
            lane_b[lane], lane_ctx[lane] = b, ctx
            pend.clear()
        b, ctx = lane_b[lane], lane_ctx[lane]
        a, bb, c = small if b < thr else large
        dt = (a + bb * (ctx + b) + c * b + oa + ob * ctx) / 1000.0
        lane_busy[lane] = True
        heapq.heappush(events, (now + dt, _STEP_DONE, seq, lane))
        seq += 1

    def admit(d: int, now: float) -> None:
        nonlocal seq, violations
        q = waiting[d]
        while q:
            r = q[0]
            need = ins[r] + outs[r]
            if need > cap:  # can never run here: fail it rather than block the queue forever
                q.popleft()
                waiting_tokens[d] -= need
                if not flagged[r]:
                    violations += 1
                    flagged[r] = True
                continue
            if reserved[d] + need > cap or admitted[d] >= max_seqs:
                return
            q.popleft()
            waiting_tokens[d] -= need
            reserved[d] += need
            admitted[d] += 1
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

    nxt = 0
    total = len(arrivals)
    while nxt < total or events:
        if events and (nxt >= total or events[0][0] < arrivals[nxt]):
            now, kind, _, payload = heapq.heappop(events)
            if kind == _KICK:
                start_step(payload, now)
            elif kind == _STEP_DONE:
                lane = payload
                d = lane // lanes_per
                step = lane_step[lane] + 1
                lane_step[lane] = step
                lane_ctx[lane] += lane_b[lane]
                fin = lane_finish[lane]
                freed = False
                while fin and fin[0][0] == step:
                    _, r = heapq.heappop(fin)
                    finish[r] = now
                    lane_b[lane] -= 1
                    lane_ctx[lane] -= ins[r] + outs[r] - 1
                    reserved[d] -= ins[r] + outs[r]
                    admitted[d] -= 1
                    freed = True
                    if not flagged[r]:
                        t0 = base[r] if base is not None else kv_ready[r]
                        if (now - t0) / (outs[r] - 1) > tpot_limit_s:
                            violations += 1
                            flagged[r] = True
                if violations > limit:
                    break
                if freed:
                    admit(d, now)
                if lane_b[lane] or lane_pending[lane]:
                    start_step(lane, now)
                else:
                    lane_busy[lane] = False
            else:  # transfer done
                r, d = divmod(payload, k)
                kv_ready[r] = now
                if deadline is not None and not flagged[r] and now > deadline[r]:
                    violations += 1
                    flagged[r] = True
                    if violations > limit:
                        break
                first = d * lanes_per
                lane = min(range(first, first + lanes_per),
                           key=lambda l: lane_b[l] + len(lane_pending[l]))
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
            # The router's "most free KV": capacity minus reservations and queued demand.
            d = max(allowed, key=lambda j: cap - reserved[j] - waiting_tokens[j]) \
                if len(allowed) > 1 else allowed[0]
            waiting[d].append(r)
            waiting_tokens[d] += ins[r] + outs[r]
            admit(d, now)
    stopped = violations > limit
    return DecodeOutcome(np.array(kv_ready), np.array(finish), np.array(xfer), violations, stopped)
