"""Per-phase pruning (DistServe's first step): the goodput of each parallel configuration
for each phase in isolation.

- prefill: prefill instances alone, TTFT only;
- decode: decode instances fed at arrival (instant prefill and transfer), TPOT only;
- colocated (baseline): a single colocated instance, both SLOs.

Each phase is measured twice: one instance, and the most instances a plan could hold,
routed together. Several instances sharing a router sustain more than that many times one
under a tight SLO (a queue's tail shrinks when it is pooled): on OPT-13B ShareGPT at TTFT
0.25 s, one TP1 prefill sustains 2.6 req/s and fifteen pooled 128 (8.5 each).
`PhaseGoodput.pooled_rps` interpolates between the two. These numbers rank configurations and size instance counts
cheaply; full plans are then co-simulated (`search`). Analytic capacity estimates only seed
the bisection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from .colocated import ColocatedScheduler
from .goodput import RateJudge, max_feasible_rate
from .plans import ParallelConfig
from .problem import PlanningProblem
from .simulator import simulate_colocated, simulate_decode_only, simulate_prefill_only
from .workload import SyntheticTrace

Phase = Literal["prefill", "decode"]
PHASE_TOL_FACTOR = 2.0


@dataclass(frozen=True)
class PhaseGoodput:
    phase: Phase
    config: ParallelConfig
    goodput_rps: float  # one instance
    kv_capacity_tokens: int
    num_pooled: int = 1  # the most instances of this phase a plan could hold
    pooled_goodput_rps: float = 0.0  # that many, routed together (0 with num_pooled 1)

    @property
    def goodput_per_gpu(self) -> float:
        return self.goodput_rps / self.config.num_gpus

    def pooled_rps(self, n: int) -> float:
        """Goodput of n instances routed together: n times a per-instance goodput that moves
        from one instance's to `num_pooled` instances' linearly in log n (measured at both
        ends; held beyond them)."""
        if n <= 1 or self.num_pooled <= 1:
            return n * self.goodput_rps
        each = self.pooled_goodput_rps / self.num_pooled
        share = min(1.0, math.log(n) / math.log(self.num_pooled))
        return n * (self.goodput_rps + (each - self.goodput_rps) * share)


@dataclass(frozen=True)
class ColocatedGoodput:
    tp: int
    scheduler: ColocatedScheduler
    goodput_rps: float  # one instance
    pp: int = 1
    num_instances: int = 1  # the whole-budget deployment `deployment_goodput_rps` is for
    deployment_goodput_rps: float = 0.0  # all instances co-simulated (pooled routing)

    @property
    def config(self) -> ParallelConfig:
        return ParallelConfig(self.tp, self.pp)

    @property
    def goodput_per_gpu(self) -> float:
        return self.goodput_rps / (self.tp * self.pp)

    @property
    def label(self) -> str:
        return f"{self.num_instances}x colocated {self.config.label} ({self.scheduler.replace('_', ' ')})"


def prefill_rate_guess(problem: PlanningProblem, config: ParallelConfig) -> float:
    """Requests/s a pipeline sustains when serving mean-length prompts one at a time."""
    mean_in = problem.lengths["input_mean"]
    latency = problem.timing(config).prefill_latency_s(mean_in, mean_in**2)
    return 0.8 * config.pp / latency


def decode_rate_guess(problem: PlanningProblem, config: ParallelConfig) -> float:
    """Requests/s of a full-enough batch whose step still meets TPOT."""
    timing = problem.timing(config)
    mean_in, mean_out = problem.lengths["input_mean"], problem.lengths["output_mean"]
    lanes = config.pp
    # Paged KV holds a request's prompt plus, on average, half its output.
    live = mean_in + (mean_out / 2 if problem.request.engine.decode_memory == "paged" else mean_out)
    batch = max(1, min(problem.request.engine.max_num_seqs,
                       int(problem.kv_capacity(config) / live / lanes)))
    while batch > 1 and timing.decode_step_s(batch, batch * (mean_in + mean_out / 2)) > \
            0.9 * problem.request.slo.tpot_s:
        batch //= 2
    step = timing.decode_step_s(batch, batch * (mean_in + mean_out / 2))
    return 0.8 * lanes * batch / step / max(mean_out - 1, 1)


def phase_goodput(
    problem: PlanningProblem, phase: Phase, config: ParallelConfig, traces: list[SyntheticTrace],
    num_pooled: int = 1, pooled_traces: list[SyntheticTrace] | None = None,
) -> tuple[PhaseGoodput, int]:
    """(goodput of one instance and of `num_pooled` routed together, simulations run).
    `pooled_traces`: longer traces for the pooled runs (default `traces`)."""
    one, runs = _pooled_goodput(problem, phase, config, traces, 1, None)
    pooled = 0.0
    if num_pooled > 1 and one > 0:
        pooled, more = _pooled_goodput(problem, phase, config, pooled_traces or traces,
                                       num_pooled, num_pooled * one)
        runs += more
    return PhaseGoodput(phase, config, one, problem.kv_capacity(config),
                        num_pooled if one > 0 else 1, pooled), runs


def _pooled_goodput(
    problem: PlanningProblem, phase: Phase, config: ParallelConfig, traces: list[SyntheticTrace],
    n: int, guess: float | None,
) -> tuple[float, int]:
    """(goodput of n instances of one phase routed together, simulations run)."""
    slo = problem.request.slo
    if phase == "prefill":
        guess = guess or prefill_rate_guess(problem, config)

        def simulate(arrival_s, trace, stop, slo, prefill_scale=1.0):
            return simulate_prefill_only(problem.prefill_pool(config, n, prefill_scale), arrival_s,
                                         trace.input_lens, trace.output_lens, slo, stop)
    else:
        pool = problem.decode_pool(config, n)
        guess = guess or decode_rate_guess(problem, config)

        def simulate(arrival_s, trace, stop, slo):
            return simulate_decode_only(pool, arrival_s, trace.input_lens, trace.output_lens, slo, stop)

    # A plan's front end serves every request in both phases: as if n instances of each.
    judge = RateJudge(simulate, traces, slo, problem.front_end_effect(
        2 * n * config.num_gpus, n * config.num_gpus if phase == "prefill" else 0))
    # Per-phase goodputs only order and size candidates (co-simulation decides), so they
    # are bisected twice as coarsely.
    rate = max_feasible_rate(judge.feasible, guess, PHASE_TOL_FACTOR * problem.request.search.rel_tol)
    return rate, judge.num_runs


def colocated_goodput(
    problem: PlanningProblem, config: ParallelConfig, scheduler: ColocatedScheduler,
    traces: list[SyntheticTrace], num_instances: int = 1, guess: float | None = None,
) -> tuple[float, int]:
    """(goodput of `num_instances` colocated instances of `config` routed together, runs)."""
    slo = problem.request.slo
    pool = problem.colocated_pool(config.tp, num_instances, scheduler, config.pp)
    if guess is None:
        guess = num_instances * min(prefill_rate_guess(problem, config), decode_rate_guess(problem, config))

    def simulate(arrival_s, trace, stop, slo):
        return simulate_colocated(pool, arrival_s, trace.input_lens, trace.output_lens, slo, stop)

    judge = RateJudge(simulate, traces, slo, problem.front_end_effect(num_instances * config.num_gpus))
    rate = max_feasible_rate(judge.feasible, guess, problem.request.search.rel_tol)
    return rate, judge.num_runs


def enumerate_configs(
    problem: PlanningProblem,
) -> tuple[list[ParallelConfig], list[tuple[ParallelConfig, str]]]:
    """(usable configurations, [(excluded configuration, reason)]) for either phase.

    Candidates: every profiled TP degree x every pipeline degree that divides the layers,
    up to `max_pipeline_parallel`, that at least one enabled placement could host.
    """
    req = problem.request
    c, placements = req.cluster, req.search.placements
    layers = problem.shape.num_layers
    pps = [p for p in range(1, req.search.max_pipeline_parallel + 1) if layers % p == 0]
    if c.device == "cpu":
        pps = [1]  # one core per instance: no pipeline stages to list as excluded
    usable, excluded = [], []
    for tp in sorted(problem.profiles):
        for pp in pps:
            config = ParallelConfig(tp, pp)
            if config.num_gpus > c.gpu_budget:
                excluded.append((config, f"needs {config.num_gpus} {c.unit_name}s, over the budget "
                                         f"of {c.gpu_budget}"))
                continue
            hostable = (("high_node_affinity" in placements and config.num_gpus <= c.gpus_per_node)
                        or ("low_node_affinity" in placements and pp <= c.num_nodes
                            and tp < c.gpus_per_node))
            reason = problem.exclusion(config) or (
                None if hostable else "no enabled placement can host an instance this large")
            if reason:
                excluded.append((config, reason))
            else:
                usable.append(config)
    return usable, excluded

