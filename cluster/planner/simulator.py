"""Library API of the serving simulator: a trace in, per-request TTFT / TPOT / e2e out.

    simulate_disaggregated(system, arrival_s, input_lens, output_lens)  -> SimResult
    simulate_prefill_only(pool, ...)   prefill pool alone (TTFT; DistServe's per-phase step)
    simulate_decode_only(pool, ...)    decode pool fed directly at arrival (TPOT)
    simulate_colocated(pool, ...)      colocated baseline (prefill-priority or chunked)

A disaggregated run is two passes: prefill never waits on decode (see `prefill_pool`), so
its completion times are computed first and become the decode side's arrivals, which then
model routing, KV-capacity admission, link queueing, transfer and continuous batching.

Definitions (`cluster.slo`, shared with the router and the benchmark): TTFT = first token
time - arrival; TPOT = (last token - first token) / (output_len - 1), 0 for one-token
outputs; a request meets the SLO when both hold.
With `slo` given and `stop_when_lost`, a run stops once too many requests have missed it
for the attainment target to be reachable (unfinished requests then read as inf): the
goodput search only needs the verdict, and overloaded runs are the slowest ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from cluster import slo as slo_math
from cluster.config import SLOConfig

from .colocated import ColocatedPool, simulate_colocated_pool
from .decode_pool import DecodePool, TransferTopology, simulate_decode_pool
from .prefill_pool import PrefillOutcome, PrefillPool, simulate_prefill_pool


@dataclass(frozen=True)
class SimResult:
    ttft_s: np.ndarray  # [N]
    tpot_s: np.ndarray  # [N]
    e2e_s: np.ndarray  # [N]
    transfer_s: np.ndarray  # [N] KV transfer duration (0 where none)
    stopped_early: bool

    def meets(self, slo: SLOConfig) -> np.ndarray:
        return slo_math.meets_slo_array(self.ttft_s, self.tpot_s, slo)

    def attainment(self, slo: SLOConfig) -> float:
        """Share of requests meeting both TTFT and TPOT (`cluster.slo`)."""
        return slo_math.attainment(self.meets(slo))


@dataclass(frozen=True)
class DisaggregatedSystem:
    prefill: PrefillPool
    decode: DecodePool
    topology: TransferTopology | None = None  # None: instant transfer, any decode instance
    first_token_source: Literal["prefill", "decode"] = "prefill"


def violation_budget(num_requests: int, attainment: float) -> int:
    """Most requests that may miss the SLO while `attainment` is still met."""
    return num_requests - math.ceil(attainment * num_requests - 1e-9)


def _check_trace(arrival_s: np.ndarray, input_lens: np.ndarray, output_lens: np.ndarray) -> None:
    if not (len(arrival_s) == len(input_lens) == len(output_lens)):
        raise ValueError("arrival_s, input_lens and output_lens must have the same length")
    if len(input_lens) and (input_lens.min() < 1 or output_lens.min() < 1):
        raise ValueError("input and output lengths must be >= 1")


def _limits(slo: SLOConfig | None, n: int, stop_when_lost: bool) -> tuple[float, float, int | None]:
    if slo is None:
        return math.inf, math.inf, None
    return slo.ttft_s, slo.tpot_s, violation_budget(n, slo.attainment) if stop_when_lost else None


def simulate_disaggregated(
    system: DisaggregatedSystem,
    arrival_s: np.ndarray,
    input_lens: np.ndarray,
    output_lens: np.ndarray,
    slo: SLOConfig | None = None,
    stop_when_lost: bool = False,
    prefill: PrefillOutcome | None = None,
) -> SimResult:
    """`prefill`: the prefill pool's outcome on this same trace, rate, SLO and stop flag
    (`simulate_prefill_pool`), when the caller already has it: prefill never waits on
    decode, so plans sharing a prefill pool share this pass (the search caches it)."""
    _check_trace(arrival_s, input_lens, output_lens)
    n = len(arrival_s)
    ttft_limit, tpot_limit, budget = _limits(slo, n, stop_when_lost)
    pre = prefill if prefill is not None else simulate_prefill_pool(
        arrival_s, input_lens, system.prefill, ttft_limit, budget)
    if pre.stopped_early:
        inf = np.full(n, np.inf)
        return SimResult(inf, inf, inf, np.zeros(n), True)
    prefill_ttft = pre.done_s - arrival_s
    late = prefill_ttft > ttft_limit
    from_decode = system.first_token_source == "decode"
    dec = simulate_decode_pool(
        pre.done_s, input_lens, output_lens, system.decode, system.topology, pre.instance_ids,
        tpot_base_s=None if from_decode else pre.done_s,
        tpot_limit_s=tpot_limit,
        ttft_deadline_s=arrival_s + ttft_limit if from_decode else None,
        already_violating=late,
        max_violations=None if budget is None else budget - int(late.sum()),
    )
    multi = output_lens >= 2
    first_token = np.where(multi & from_decode, dec.kv_ready_s, pre.done_s)
    last_token = np.where(multi, dec.finish_s, pre.done_s)
    tpot = slo_math.tpot_s_array(first_token, last_token, output_lens)
    return SimResult(first_token - arrival_s, tpot, last_token - arrival_s, dec.transfer_s,
                     dec.stopped_early)


def prefill_pass(
    pool: PrefillPool,
    arrival_s: np.ndarray,
    input_lens: np.ndarray,
    slo: SLOConfig | None = None,
    stop_when_lost: bool = False,
) -> PrefillOutcome:
    """The prefill pass `simulate_disaggregated` would run for the same arguments (its
    `prefill=` input): the same TTFT limit and violation budget."""
    ttft_limit, _, budget = _limits(slo, len(arrival_s), stop_when_lost)
    return simulate_prefill_pool(arrival_s, input_lens, pool, ttft_limit, budget)


def simulate_prefill_only(
    pool: PrefillPool,
    arrival_s: np.ndarray,
    input_lens: np.ndarray,
    output_lens: np.ndarray,
    slo: SLOConfig | None = None,
    stop_when_lost: bool = False,
) -> SimResult:
    """TTFT of the prefill pool alone; TPOT reads 0 (the decode side is not simulated)."""
    _check_trace(arrival_s, input_lens, output_lens)
    n = len(arrival_s)
    ttft_limit, _, budget = _limits(slo, n, stop_when_lost)
    pre = simulate_prefill_pool(arrival_s, input_lens, pool, ttft_limit, budget)
    ttft = pre.done_s - arrival_s
    return SimResult(ttft, np.zeros(n), ttft, np.zeros(n), pre.stopped_early)


def simulate_decode_only(
    pool: DecodePool,
    arrival_s: np.ndarray,
    input_lens: np.ndarray,
    output_lens: np.ndarray,
    slo: SLOConfig | None = None,
    stop_when_lost: bool = False,
) -> SimResult:
    """Requests reach the decode pool with their first token at arrival (instant prefill and
    transfer); TPOT includes waiting for KV space. TTFT reads 0."""
    _check_trace(arrival_s, input_lens, output_lens)
    n = len(arrival_s)
    _, tpot_limit, budget = _limits(slo, n, stop_when_lost)
    dec = simulate_decode_pool(arrival_s, input_lens, output_lens, pool, tpot_base_s=arrival_s,
                               tpot_limit_s=tpot_limit, max_violations=budget)
    multi = output_lens >= 2
    tpot = slo_math.tpot_s_array(arrival_s, dec.finish_s, output_lens)
    e2e = np.where(multi, dec.finish_s - arrival_s, 0.0)
    return SimResult(np.zeros(n), tpot, e2e, np.zeros(n), dec.stopped_early)


def simulate_colocated(
    pool: ColocatedPool,
    arrival_s: np.ndarray,
    input_lens: np.ndarray,
    output_lens: np.ndarray,
    slo: SLOConfig | None = None,
    stop_when_lost: bool = False,
) -> SimResult:
    _check_trace(arrival_s, input_lens, output_lens)
    n = len(arrival_s)
    ttft_limit, tpot_limit, budget = _limits(slo, n, stop_when_lost)
    out = simulate_colocated_pool(arrival_s, input_lens, output_lens, pool, ttft_limit,
                                  tpot_limit, budget)
    tpot = slo_math.tpot_s_array(out.first_token_s, out.finish_s, output_lens)
    return SimResult(out.first_token_s - arrival_s, tpot, out.finish_s - arrival_s,
                     np.zeros(n), out.stopped_early)
