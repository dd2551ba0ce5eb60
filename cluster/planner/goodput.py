"""Goodput: the highest request rate at which a system still meets its SLO attainment.

A system is judged on several independent traces (seeds) that are rescaled to each rate
tried (common random numbers). A rate is feasible only if *every* trace meets the target
attainment, which guards against one lucky trace. The search brackets the boundary by
doubling or halving from a guess, then bisects geometrically to a relative tolerance.
Verdicts are cached per rate, so re-asking costs nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from cluster import slo as slo_math
from cluster.config import SLOConfig

from .front_end import EffectAt, FrontEndEffect
from .simulator import SimResult
from .workload import SyntheticTrace

# simulate(arrival_s, trace, stop_when_lost, slo) -> SimResult. A judge whose front end
# slows the prefill instances alone (`FrontEndEffect.prefill_scale`) also passes
# `prefill_scale=s`: the simulator stretches its prefill iterations by `s`.
Simulate = Callable[..., SimResult]


def _stretched(result: SimResult, effect: FrontEndEffect) -> SimResult:
    """A run simulated at profiled speed, read back at the front end's slow-down."""
    s = effect.scale
    return SimResult(result.ttft_s * s + effect.ttft_add_s, result.tpot_s * s,
                     result.e2e_s * s + effect.ttft_add_s, result.transfer_s * s,
                     result.stopped_early)


@dataclass(frozen=True)
class RateMeasurement:
    """Full (never stopped early) runs of one system at one rate, pooled over traces."""

    rate: float
    attainment: float  # share meeting both SLOs, all traces pooled
    min_attainment: float  # worst single trace
    ttft_miss: float  # share missing TTFT
    tpot_miss: float  # share missing TPOT
    mean_ttft_s: float
    mean_tpot_s: float
    mean_transfer_s: float


@dataclass
class RateJudge:
    """Feasibility of one system at any rate, memoised.

    `front_end`: the effect of a CPU host's front end at each rate (`front_end.py`), or
    None where it is not modelled. A rate it slows by `s` is simulated at profiled speed on
    arrivals compressed by `s`, against the SLO shrunk to match, and stretched back."""

    simulate: Simulate
    traces: list[SyntheticTrace]
    slo: SLOConfig
    front_end: EffectAt | None = None
    verdicts: dict[float, bool] = field(default_factory=dict)
    num_runs: int = 0

    def _effect(self, rate: float) -> FrontEndEffect | None:
        return FrontEndEffect(1.0, 0.0) if self.front_end is None else self.front_end(rate)

    def _run(self, trace: SyntheticTrace, rate: float, effect: FrontEndEffect, stop: bool) -> SimResult:
        arrivals = trace.arrivals_at(rate)
        if effect.prefill_scale != 1.0:  # only prefill slows: no uniform clock to stretch
            slo = self.slo.model_copy(update={"ttft_s": max(self.slo.ttft_s - effect.ttft_add_s, 0.0)})
            r = self.simulate(arrivals, trace, stop, slo, prefill_scale=effect.prefill_scale)
            return SimResult(r.ttft_s + effect.ttft_add_s, r.tpot_s, r.e2e_s + effect.ttft_add_s,
                             r.transfer_s, r.stopped_early)
        if effect.scale == 1.0 and effect.ttft_add_s == 0.0:
            return self.simulate(arrivals, trace, stop, self.slo)
        slo = self.slo.model_copy(update={
            "ttft_s": max(self.slo.ttft_s - effect.ttft_add_s, 0.0) / effect.scale,
            "tpot_s": self.slo.tpot_s / effect.scale})
        return _stretched(self.simulate(arrivals / effect.scale, trace, stop, slo), effect)

    def feasible(self, rate: float) -> bool:
        if rate not in self.verdicts:
            effect = self._effect(rate)
            ok = effect is not None
            for trace in self.traces if ok else ():
                self.num_runs += 1
                result = self._run(trace, rate, effect, True)
                if result.stopped_early or result.attainment(self.slo) < self.slo.attainment:
                    ok = False
                    break
            self.verdicts[rate] = ok
        return self.verdicts[rate]

    def measure(self, rate: float) -> RateMeasurement:
        effect = self._effect(rate)
        if effect is None:  # the front end cannot keep up: nothing is served
            n = sum(len(t.input_lens) for t in self.traces)
            inf = np.full(n, np.inf)
            results = [SimResult(inf, inf, inf, np.zeros(n), False)]
        else:
            results = [self._run(t, rate, effect, False) for t in self.traces]
            self.num_runs += len(results)
        ttft = np.concatenate([r.ttft_s for r in results])
        tpot = np.concatenate([r.tpot_s for r in results])
        xfer = np.concatenate([r.transfer_s for r in results])
        meets = slo_math.meets_slo_array(ttft, tpot, self.slo)
        finite = np.isfinite(ttft) & np.isfinite(tpot)
        return RateMeasurement(
            rate=rate,
            attainment=float(meets.mean()),
            min_attainment=min(r.attainment(self.slo) for r in results),
            ttft_miss=float((ttft > self.slo.ttft_s).mean()),
            tpot_miss=float((tpot > self.slo.tpot_s).mean()),
            mean_ttft_s=float(ttft[finite].mean()) if finite.any() else math.inf,
            mean_tpot_s=float(tpot[finite].mean()) if finite.any() else math.inf,
            mean_transfer_s=float(xfer[xfer > 0].mean()) if (xfer > 0).any() else 0.0,
        )


MAX_RATE = 1e5  # req/s: the bisection's ceiling; a goodput at the ceiling means "unbounded"


def max_feasible_rate(
    feasible: Callable[[float], bool],
    guess: float,
    rel_tol: float = 0.03,
    min_rate: float = 1e-3,
    max_rate: float = MAX_RATE,
    growth: float = 2.0,
) -> float:
    """Largest rate (within `rel_tol`) for which `feasible` holds; 0 if not even `min_rate`.

    Assumes feasibility is monotone in rate (true up to simulation noise). Returns a value
    >= max_rate / 2 when even the ceiling is feasible: the SLO does not bind. `growth`: the
    first step up from a feasible guess (then doubling); a guess known to sit just under
    the goodput brackets it in fewer (passing, hence full-length) runs with a small step.
    """
    guess = min(max(guess, min_rate), max_rate)
    if feasible(guess):
        lo, hi = guess, guess * growth
        while hi < max_rate and feasible(hi):
            lo, hi = hi, hi * 2
        if hi >= max_rate:
            return lo
    else:
        lo, hi = guess / 2, guess
        while lo >= min_rate and not feasible(lo):
            lo, hi = lo / 2, lo
        if lo < min_rate:
            return 0.0
    while hi / lo > 1 + rel_tol:
        mid = math.sqrt(lo * hi)
        if feasible(mid):
            lo = mid
        else:
            hi = mid
    return lo
