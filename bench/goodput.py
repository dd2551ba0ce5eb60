"""Goodput: the highest request rate whose SLO attainment meets the target.

The search is a pure state machine over observed probes (rate -> attainment); the
caller measures (`bench.experiment`), the search only decides the next rate:

    SWEEP ──a rate misses─┬─ a lower rate passed ─────────────────▶ BISECT ──▶ DONE
      │                   └─ none passed ─▶ STEP_DOWN ──a rate passes──▶ BISECT
      │                                        └──below min rate──▶ DONE (goodput 0)
      └──every rate passes (list exhausted or above max rate)──▶ DONE (a lower bound)

- SWEEP probes the user's rates in increasing order, or, without a list, start_rate,
  start_rate*growth, ... up to max_rate; it stops at the first rate below target
  (unless `full_sweep`, which probes the whole list, e.g. for an attainment-vs-rate plot).
- STEP_DOWN divides the lowest probed rate by the growth factor until a rate passes or
  the rate would fall below min_rate (goodput 0).
- BISECT halves [lo, hi] `num_bisect_steps` times or until (hi - lo) / lo <= rel_tolerance,
  where hi is the lowest failing rate and lo the highest passing rate below it.

Attainment is assumed to fall with rate. Measurements are noisy, so a passing rate above
a failing one can happen; goodput is then the conservative `lo` (rates above the lowest
failing rate never count).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

from bench.errors import BenchError
from cluster.config import ServeConfig

Phase = Literal["sweep", "step_down", "bisect"]


@dataclass(frozen=True)
class SearchSettings:
    attainment_target: float = 0.9
    rates_rps: tuple[float, ...] | None = None  # explicit sweep; None: geometric from start
    start_rate_rps: float = 1.0
    growth_factor: float = 2.0
    min_rate_rps: float = 0.01
    max_rate_rps: float = 1000.0
    num_bisect_steps: int = 4
    rel_tolerance: float = 0.05
    full_sweep: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.attainment_target <= 1:
            raise BenchError(f"attainment target must be in (0, 1], got {self.attainment_target}")
        if self.rates_rps is not None and (
            not self.rates_rps or any(not (math.isfinite(r) and r > 0) for r in self.rates_rps)
        ):
            raise BenchError(f"sweep rates must be positive numbers, got {self.rates_rps}")
        if self.growth_factor <= 1:
            raise BenchError(f"growth factor must be > 1, got {self.growth_factor}")
        if not 0 < self.min_rate_rps <= self.start_rate_rps <= self.max_rate_rps:
            raise BenchError("need 0 < min rate <= start rate <= max rate")
        if self.num_bisect_steps < 0:
            raise BenchError("the number of bisection steps cannot be negative")


@dataclass(frozen=True)
class Probe:
    rate_rps: float
    attainment: float
    meets_target: bool
    phase: Phase


@dataclass(frozen=True)
class GoodputResult:
    goodput_rps: float  # 0.0 when no probed rate met the target
    lowest_failing_rate_rps: float | None  # None: every probe passed, goodput is a lower bound
    probes: tuple[Probe, ...]

    @property
    def is_upper_bounded(self) -> bool:
        return self.lowest_failing_rate_rps is not None


class GoodputSearch:
    """Decides which rate to probe next; `observe` feeds back each measurement."""

    def __init__(self, settings: SearchSettings) -> None:
        self.settings = settings
        self._probes: list[Probe] = []
        self._pending: tuple[float, Phase] | None = None

    @property
    def probes(self) -> tuple[Probe, ...]:
        return tuple(self._probes)

    def _bracket(self) -> tuple[float | None, float | None]:
        """(lo, hi): highest passing rate below hi, lowest failing rate."""
        hi = min((p.rate_rps for p in self._probes if not p.meets_target), default=None)
        lo = max(
            (p.rate_rps for p in self._probes
             if p.meets_target and (hi is None or p.rate_rps < hi)),
            default=None,
        )
        return lo, hi

    def _decide(self) -> tuple[float, Phase] | None:
        s = self.settings
        lo, hi = self._bracket()
        probed = {p.rate_rps for p in self._probes}
        if s.rates_rps is not None:
            remaining = [r for r in sorted(s.rates_rps) if r not in probed]
            if remaining and (hi is None or s.full_sweep):
                return remaining[0], "sweep"
        elif hi is None:
            passing = [p.rate_rps for p in self._probes if p.meets_target]
            rate = max(passing) * s.growth_factor if passing else s.start_rate_rps
            return (rate, "sweep") if rate <= s.max_rate_rps * (1 + 1e-9) else None
        if hi is None:
            return None  # the whole list passed
        if lo is None:
            rate = min(probed) / s.growth_factor
            return (rate, "step_down") if rate >= s.min_rate_rps * (1 - 1e-9) else None
        num_bisections = sum(1 for p in self._probes if p.phase == "bisect")
        if num_bisections >= s.num_bisect_steps or (hi - lo) / lo <= s.rel_tolerance:
            return None
        return (lo + hi) / 2, "bisect"

    def next_rate(self) -> float | None:
        """The rate to measure next, or None when the search is over."""
        self._pending = self._decide()
        return None if self._pending is None else self._pending[0]

    def observe(self, rate_rps: float, attainment: float) -> None:
        phase: Phase = "sweep"
        if self._pending is not None and self._pending[0] == rate_rps:
            phase = self._pending[1]
        self._pending = None
        self._probes.append(Probe(rate_rps, attainment,
                                  attainment >= self.settings.attainment_target, phase))

    def result(self) -> GoodputResult:
        lo, hi = self._bracket()
        return GoodputResult(goodput_rps=lo or 0.0, lowest_failing_rate_rps=hi,
                             probes=self.probes)


def search_goodput(
    attainment_at: Callable[[float], float], settings: SearchSettings
) -> GoodputResult:
    """Run a whole search against a synchronous measurement function."""
    search = GoodputSearch(settings)
    while (rate := search.next_rate()) is not None:
        search.observe(rate, attainment_at(rate))
    return search.result()


@dataclass(frozen=True)
class Units:
    """What goodput is normalised by: GPUs of a GPU deployment, cores of a CPU one."""

    count: float
    name: str  # "GPU" or "core"

    def __str__(self) -> str:
        return f"{self.count:g} {self.name}{'' if self.count == 1 else 's'}"


def units_from_config(config: ServeConfig, host_cores: int | None = None) -> Units:
    """GPUs (one per tensor/pipeline rank) when any pool reserves GPUs, else CPU cores.

    CPU cores are the pinned `cpu_cores` of each instance, or its `num_cpus` reservation
    when no cores are pinned. With `host_cores` (a deployment started on this host), the
    core `pdserve serve` keeps for the front end when it places unpinned instances on a host
    with more cores than instances (pdserve.launcher.with_default_cpu_cores, as vLLM's CPU
    server keeps one for its API server) counts too: that deployment occupies it, and a
    per-core comparison with a server given the same cores must say so. Likewise the
    cores the front end is pinned to, which no engine uses.
    """
    pools = config.pools().values()
    if any(pool.num_gpus > 0 for pool in pools):
        gpus = sum(p.num_instances * p.tensor_parallel_size * p.pipeline_parallel_size
                   for p in pools)
        return Units(float(gpus), "GPU")
    cores = 0.0
    for pool in pools:
        if pool.cpu_cores is not None:
            cores += sum(len(instance_cores) for instance_cores in pool.cpu_cores)
        else:
            cores += pool.num_instances * pool.num_cpus
    num_instances = sum(p.num_instances for p in pools)
    engine = config.pinned_engine_cores()
    if engine is None:
        if host_cores is not None and num_instances < host_cores:
            cores += 1  # the front end's core
        return Units(cores, "core")
    # Every engine pinned: the front end's own cores count too, pinned by the config
    # (ray.front_end_cores) or, on this host, by pdserve serve's default, which gives the
    # front end every core the engines leave free (with_default_front_end_cores).
    if config.ray.front_end_cores is not None:
        cores += len(set(config.ray.front_end_cores) - engine)
    elif host_cores is not None and config.ray.address is None:
        cores += max(0, host_cores - len(engine))
    return Units(cores, "core")
