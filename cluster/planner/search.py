"""Placement search: which parallelism, how many instances of each phase, where.

    1. enumerate (TP, PP) per phase; drop what does not fit memory / nodes / profile;
    2. per-phase goodput of each (`phase_goodput`, DistServe's pruning), of one instance
       and of the most a plan could hold, routed together (pooling);
    3. per placement and (prefill config, decode config) pair, size instance counts from
       those goodputs: estimate(n_p, n_d) = min(G_p(n_p), G_d(n_d)), G the pooled per-phase
       goodput (`PhaseGoodput.pooled_rps`), within the GPU budget and the node layout
       (`placement.layout_plan`);
    4. co-simulate the most promising pairs in full (every instance, KV transfer over the
       links of the layout, decode memory, joint TTFT+TPOT attainment) and refine the
       instance counts locally with those co-simulations.

(Over ~400 lines on purpose: one search, its branch-and-bound state `_Search`, the
dominance rule it prunes by, and the jobs it hands to processes. The pure pieces it calls
live in their own modules: `phase_goodput`, `placement`, `goodput`, `simulator`, and the
process pool in `pool`.)

Objectives: `max_goodput` (no target rate): the highest goodput within the GPU budget;
goodputs within the bisection tolerance count as equal and then the higher goodput per
GPU wins. `min_gpus` (target rate): the fewest GPUs whose plan sustains the rate.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from typing import Iterator, Literal

from cluster.config import SLOConfig

from .colocated import ColocatedScheduler
from .goodput import MAX_RATE, RateMeasurement, RateJudge, max_feasible_rate
from .phase_goodput import (ColocatedGoodput, PhaseGoodput, colocated_goodput, enumerate_configs,
                            phase_goodput)
from .placement import layout_plan, transfer_topology
from .pool import job_pool, map_jobs
from .plans import ParallelConfig, Plan
from .problem import PlanningProblem, for_front_end_layout
from .prefill_pool import PrefillOutcome
from .simulator import DisaggregatedSystem, prefill_pass, simulate_disaggregated
from .workload import SyntheticTrace, make_trace

Objective = Literal["max_goodput", "min_gpus"]
MAX_TRACE_SCALE = 8  # co-simulation traces grow with instance count, up to this factor
MAX_LOCAL_STEPS = 8
# Default search: candidates whose per-phase estimate is below this share of the best
# estimate are not co-simulated (pooling and the joint SLO move goodput by tens of
# percent, not by 2x). The exhaustive search checks every candidate.
PRUNE_RATIO = 0.5
# A candidate that passed the bar sits just above the incumbent: its goodput is bracketed
# from the bar in steps of this factor (a doubling costs more passing, full-length runs).
BAR_GROWTH = 1.25
# Candidates whose bars are checked together (in parallel where the search has processes):
# each is judged against the bar as it stood when the batch began. Fixed, so the plan does
# not depend on how many processes run it.
BAR_BATCH = 4
PREFILL_PASS_CACHE = 256  # prefill passes kept (each a few hundred KB at most)


@dataclass(frozen=True)
class EvaluatedPlan:
    plan: Plan
    estimate_rps: float  # from per-phase goodputs
    goodput_rps: float  # co-simulated
    # Full runs (set by `_Search.measured` on the plans a report shows, else None):
    at_goodput: RateMeasurement | None  # at the goodput
    beyond: RateMeasurement | None  # just above it: what breaks first
    at_target: RateMeasurement | None = None  # at the target rate (min_gpus)

    @property
    def goodput_per_gpu(self) -> float:
        return self.goodput_rps / self.plan.num_gpus

    @property
    def is_capped(self) -> bool:
        """The SLO held at the search ceiling: the goodput is unbounded, not a number."""
        return self.goodput_rps >= MAX_RATE / 2

    @property
    def limited_by(self) -> str:
        m = self.beyond or self.at_goodput
        return "TTFT (prefill side)" if m.ttft_miss >= m.tpot_miss else "TPOT (decode side)"


@dataclass(frozen=True)
class PlanOutcome:
    objective: Objective
    target_rate: float | None
    best: EvaluatedPlan | None  # None: no plan meets the target rate within the budget
    runners_up: tuple[EvaluatedPlan, ...]
    phases: tuple[PhaseGoodput, ...]
    excluded: tuple[tuple[ParallelConfig, str], ...]
    colocated: tuple[ColocatedGoodput, ...]
    fallback: EvaluatedPlan | None  # min_gpus infeasible: the max-goodput plan instead
    num_simulations: int
    # Where a front end is modelled (`front_end.py`): the layout this outcome plans
    # ("shared", "reserved" or "with_prefill"), the cores a reserved front end takes, and
    # the other layouts' outcomes when `front_end.layout` is auto.
    front_end_layout: str | None = None
    front_end_cores: int = 0
    other_layouts: "tuple[PlanOutcome, ...]" = ()

    @property
    def units(self) -> int:
        """Units the chosen deployment occupies, a reserved front end's cores included."""
        if self.serve_colocated:
            top = self.best_colocated
            used = top.num_instances * top.config.num_gpus
        else:
            used = self.best.plan.num_gpus if self.best is not None else 0
        return used + self.front_end_cores

    @property
    def deployment_goodput_rps(self) -> float:
        """Goodput of what this outcome would deploy (colocated where it wins)."""
        if self.serve_colocated:
            return self.best_colocated.deployment_goodput_rps
        return self.best.goodput_rps if self.best is not None else 0.0

    @property
    def best_colocated(self) -> ColocatedGoodput | None:
        """The colocated deployment with the highest whole-budget goodput (if compared)."""
        top = max(self.colocated, key=lambda g: g.deployment_goodput_rps, default=None)
        return top if top is not None and top.deployment_goodput_rps > 0 else None

    @property
    def serve_colocated(self) -> bool:
        """Colocated wins: its whole-budget goodput beats the disaggregated plan's (max_goodput)."""
        top = self.best_colocated
        if top is None or self.objective != "max_goodput":
            return False
        best = self.best.goodput_rps if self.best is not None else 0.0
        return top.deployment_goodput_rps > best


class _Search:
    def __init__(self, problem: PlanningProblem):
        self.problem = problem
        self.req = problem.request
        self.cluster = self.req.cluster
        self.num_runs = 0
        self._traces: dict[int, list[SyntheticTrace]] = {}
        self._judges: dict[Plan, RateJudge] = {}
        self._evaluated: dict[Plan, EvaluatedPlan] = {}
        self.phase: dict[tuple[str, ParallelConfig], PhaseGoodput] = {}
        self._prefill_passes: OrderedDict[tuple, PrefillOutcome] = OrderedDict()

    # -- traces and co-simulation --------------------------------------------------------
    def traces(self, num_requests: int) -> list[SyntheticTrace]:
        if num_requests not in self._traces:
            s = self.req.search
            self._traces[num_requests] = [
                make_trace(self.req.workload.lengths, self.req.workload.arrival, num_requests,
                           s.seed * 1000 + i) for i in range(s.num_seeds)]
        return self._traces[num_requests]

    def feasible_layout(self, plan: Plan) -> bool:
        return (plan.num_gpus <= self.cluster.gpu_budget
                and layout_plan(plan, self.cluster.num_nodes, self.cluster.gpus_per_node) is not None)

    def system(self, plan: Plan) -> DisaggregatedSystem:
        p = self.problem
        layout = layout_plan(plan, self.cluster.num_nodes, self.cluster.gpus_per_node)
        intra, inter = self.req.bytes_per_s
        topology = transfer_topology(plan, layout, p.kv_bytes_per_token, intra, inter,
                                     self.cluster.transfer_latency_ms / 1000.0)
        return DisaggregatedSystem(p.prefill_pool(plan.prefill, plan.num_prefill),
                                   p.decode_pool(plan.decode, plan.num_decode), topology,
                                   self.req.engine.first_token_source)

    def judge(self, plan: Plan) -> RateJudge:
        if plan not in self._judges:
            system, slo = self.system(plan), self.req.slo
            traces = self.traces(self.trace_length(plan.num_prefill + plan.num_decode))

            def simulate(arrival_s, trace, stop, slo, prefill_scale=1.0):
                pre = self.prefill_pass(plan, arrival_s, trace, stop, slo, prefill_scale)
                return simulate_disaggregated(system, arrival_s, trace.input_lens,
                                              trace.output_lens, slo, stop, prefill=pre)

            self._judges[plan] = RateJudge(simulate, traces, slo, self.problem.front_end_effect(
                plan.num_gpus, plan.num_prefill * plan.prefill.num_gpus))
        return self._judges[plan]

    def prefill_pass(self, plan: Plan, arrival_s, trace: SyntheticTrace, stop: bool,
                     slo: SLOConfig, prefill_scale: float = 1.0) -> PrefillOutcome:
        """The prefill pass of a co-simulation, shared by every plan with the same prefill
        pool (prefill never waits on decode): candidates of one prefill pool differ only in
        their decode side, and the bar checks ask them all at the same rate."""
        # The trace's last arrival identifies the rate it was rescaled to (arrivals_at).
        # The SLO differs from the request's where a front end slows the run (RateJudge).
        key = (plan.prefill, plan.num_prefill, id(trace), float(arrival_s[-1]), stop,
               slo.ttft_s, slo.tpot_s, prefill_scale)
        out = self._prefill_passes.get(key)
        if out is None:
            out = prefill_pass(self.problem.prefill_pool(plan.prefill, plan.num_prefill, prefill_scale),
                               arrival_s, trace.input_lens, slo, stop)
            self._prefill_passes[key] = out
            if len(self._prefill_passes) > PREFILL_PASS_CACHE:
                self._prefill_passes.popitem(last=False)
        else:
            self._prefill_passes.move_to_end(key)
        return out

    def phase_goodputs(self, configs: list[ParallelConfig], pool: Executor | None) -> list[PhaseGoodput]:
        """Every configuration's per-phase goodput, of one instance and of the most instances
        a plan could hold (the budget less one instance of the smallest configuration),
        those on traces as long as a co-simulation of that many instances would use."""
        budget = self.cluster.gpu_budget
        smallest = min(c.num_gpus for c in configs)
        jobs = []
        for phase in ("prefill", "decode"):
            for config in configs:
                most = max(1, (budget - smallest) // config.num_gpus)
                jobs.append((self.problem, phase, config, self.traces(self.req.search.num_requests),
                             most, self.traces(self.trace_length(most))))
        out = []
        for (_, phase, config, *_), (g, runs) in zip(jobs, map_jobs(pool, _phase_job, jobs)):
            self.num_runs += runs
            self.phase[(phase, config)] = g
            out.append(g)
        return out

    def trace_length(self, num_instances: int) -> int:
        """Requests per trace for a run of `num_instances` instances in all."""
        scale = min(MAX_TRACE_SCALE, max(1.0, num_instances / 2))
        return int(self.req.search.num_requests * scale)

    def estimate(self, plan: Plan) -> float:
        return min(self.phase[("prefill", plan.prefill)].pooled_rps(plan.num_prefill),
                   self.phase[("decode", plan.decode)].pooled_rps(plan.num_decode))

    def evaluate(self, plan: Plan, passed: float | None = None) -> EvaluatedPlan:
        """Co-simulated goodput of a plan (bisection). Measurements around it are taken
        only for the plans a report shows (`measured`): full, never-stopped runs in
        overload are the slowest simulations of a search. `passed`: a rate the plan is
        known to sustain (the bar it passed), which brackets its goodput from below."""
        if plan not in self._evaluated:
            judge, tol = self.judge(plan), self.req.search.rel_tol
            before = judge.num_runs
            if passed is not None:
                # Failing just above the bar, the plan ties with the bar within the bisection's
                # precision: its goodput is the bar (no bisection to pin it closer).
                tie = passed * (1 + tol)
                rate = max_feasible_rate(judge.feasible, tie, tol, growth=BAR_GROWTH) if judge.feasible(tie) else passed
            else:
                rate = max_feasible_rate(judge.feasible, max(self.estimate(plan), 1e-3), tol)
            self.num_runs += judge.num_runs - before
            self._evaluated[plan] = EvaluatedPlan(plan, self.estimate(plan), rate, None, None, None)
        return self._evaluated[plan]

    def evaluate_all(self, plans: list[Plan], passed: float, pool: Executor | None) -> list[EvaluatedPlan]:
        """`evaluate(plan, passed)` of each plan, in the pool's processes when there is one."""
        if pool is None or len(plans) < 2:
            return [self.evaluate(plan, passed) for plan in plans]
        out = []
        jobs = [(self.problem, self.phase, p, passed) for p in plans]
        for e, runs in map_jobs(pool, _evaluate_job, jobs):
            self.num_runs += runs
            self._evaluated[e.plan] = e
            out.append(e)
        return out

    def measured(self, e: EvaluatedPlan) -> EvaluatedPlan:
        """`e` with full runs at its goodput, just above it, and at the target rate."""
        if e.at_goodput is not None:
            return e
        judge, tol, rate = self.judge(e.plan), self.req.search.rel_tol, e.goodput_rps
        before = judge.num_runs
        # A plan with no goodput is shown at its estimated rate: what fails there.
        at = judge.measure(rate if rate > 0 else max(e.estimate_rps, 1e-2))
        beyond = judge.measure(rate * (1 + 2 * tol)) if rate > 0 else None
        target = self.req.workload.rate
        at_target = judge.measure(target) if target is not None else None
        self.num_runs += judge.num_runs - before
        out = replace(e, at_goodput=at, beyond=beyond, at_target=at_target)
        self._evaluated[e.plan] = out
        return out

    def passes(self, plan: Plan, rate: float) -> bool:
        judge = self.judge(plan)
        before = judge.num_runs
        ok = judge.feasible(rate)
        self.num_runs += judge.num_runs - before
        return ok

    def bars(self, plans: list[Plan], bar: float, pool: Executor | None) -> list[bool]:
        """`passes(plan, bar)` of each plan, in the pool's processes when there is one (the
        verdicts are kept here, so an evaluation from the bar does not run it again)."""
        if pool is None or len(plans) < 2:
            return [self.passes(plan, bar) for plan in plans]
        verdicts = []
        for plan, (ok, runs) in zip(plans, map_jobs(pool, _bar_job, [(self.problem, p, bar) for p in plans])):
            self.judge(plan).verdicts[bar] = ok
            self.num_runs += runs
            verdicts.append(ok)
        return verdicts

    # -- candidate instance counts -------------------------------------------------------
    def pairs(self, configs: list[ParallelConfig]) -> Iterator[tuple[str, ParallelConfig, ParallelConfig]]:
        for placement in self.req.search.placements:
            if (placement == "low_node_affinity" and self.cluster.num_nodes == 1
                    and "high_node_affinity" in self.req.search.placements):
                continue  # one node: high node affinity already keeps every transfer on NVLink
            for cp in configs:
                if self.phase[("prefill", cp)].goodput_rps <= 0:
                    continue
                for cd in configs:
                    if self.phase[("decode", cd)].goodput_rps <= 0:
                        continue
                    if placement == "low_node_affinity" and cp.pp != cd.pp:
                        continue
                    yield placement, cp, cd

    def count_options(self, placement: str, cp: ParallelConfig, cd: ParallelConfig) -> Iterator[Plan]:
        """Every sensible (n_p, n_d) of a pair that fits the budget and the nodes."""
        budget, m = self.cluster.gpu_budget, self.cluster.gpus_per_node
        if placement == "low_node_affinity":
            for units in range(1, self.cluster.num_nodes // cp.pp + 1):
                for k_p in range(1, m // cp.tp + 1):
                    for k_d in range(1, (m - k_p * cp.tp) // cd.tp + 1):
                        plan = Plan("low_node_affinity", cp, units * k_p, cd, units * k_d, units)
                        if plan.num_gpus <= budget:
                            yield plan
            return
        gp, gd = self.phase[("prefill", cp)], self.phase[("decode", cd)]
        for n_p in range(1, budget // cp.num_gpus + 1):
            room = (budget - n_p * cp.num_gpus) // cd.num_gpus
            # The fewest decode instances that keep up with n_p prefills (room + 1: none fit).
            target = gp.pooled_rps(n_p)
            balance = next((n for n in range(1, room + 1) if gd.pooled_rps(n) >= target), room + 1)
            # More decode than balance adds nothing to the estimate, so offer the largest
            # layout-feasible count up to balance, and balance + 1 as a hedge.
            for n_d in range(min(room, balance), 0, -1):
                plan = Plan("high_node_affinity", cp, n_p, cd, n_d)
                if self.feasible_layout(plan):
                    yield plan
                    break
            hedge = Plan("high_node_affinity", cp, n_p, cd, balance + 1)
            if balance + 1 <= room and self.feasible_layout(hedge):
                yield hedge

    def neighbours(self, plan: Plan) -> list[Plan]:
        """Plans one instance away (shift one between phases, add one, remove one)."""
        out = []
        if plan.placement == "low_node_affinity":
            u = plan.num_units
            k_p, k_d = plan.num_prefill // u, plan.num_decode // u
            moves = [(k_p + 1, k_d - 1, u), (k_p - 1, k_d + 1, u), (k_p + 1, k_d, u),
                     (k_p, k_d + 1, u), (k_p, k_d, u + 1), (k_p, k_d, u - 1)]
            for a, b, units in moves:
                if a >= 1 and b >= 1 and units >= 1:
                    out.append(replace(plan, num_prefill=a * units, num_decode=b * units, num_units=units))
        else:
            n_p, n_d = plan.num_prefill, plan.num_decode
            for a, b in [(n_p + 1, n_d - 1), (n_p - 1, n_d + 1), (n_p + 1, n_d), (n_p, n_d + 1),
                         (n_p - 1, n_d), (n_p, n_d - 1)]:
                if a >= 1 and b >= 1:
                    out.append(replace(plan, num_prefill=a, num_decode=b))
        return [p for p in out if self.feasible_layout(p)]

    # -- colocated baseline --------------------------------------------------------------
    def colocated_baselines(self, configs: list[ParallelConfig], pool: Executor | None) -> list[ColocatedGoodput]:
        """Every colocated TP x PP (inside one node) and scheduler: one instance's goodput,
        then the whole budget of such instances co-simulated (pooled routing), so the
        verdict compares deployments of equal cost."""
        tps = set(self.problem.colocated_tps())
        jobs = [(self.problem, config, scheduler)
                for config in configs if config.tp in tps and config.num_gpus <= self.cluster.gpus_per_node
                for scheduler in ("prefill_priority", "chunked_prefill")]
        out = []
        for baseline, runs in map_jobs(pool, _colocated_job, jobs):
            self.num_runs += runs
            out.append(baseline)
        return out

    def colocated_baseline(self, config: ParallelConfig, scheduler: ColocatedScheduler) -> ColocatedGoodput:
        c = self.cluster
        count = min((c.gpus_per_node // config.num_gpus) * c.num_nodes, c.gpu_budget // config.num_gpus)
        one, runs = colocated_goodput(self.problem, config, scheduler, self.traces(self.req.search.num_requests))
        self.num_runs += runs
        total = 0.0
        if one > 0 and count >= 1:
            traces = self.traces(self.trace_length(count))
            total, runs = colocated_goodput(self.problem, config, scheduler, traces, count, one * count)
            self.num_runs += runs
        return ColocatedGoodput(config.tp, scheduler, one, config.pp, count, total)

    # -- objectives ----------------------------------------------------------------------
    def better(self, a: EvaluatedPlan, b: EvaluatedPlan) -> bool:
        """max_goodput order: clearly higher goodput, else (a tie) higher goodput per GPU."""
        tol = self.req.search.rel_tol
        if a.goodput_rps > b.goodput_rps * (1 + tol):
            return True
        if b.goodput_rps > a.goodput_rps * (1 + tol):
            return False
        return (a.goodput_per_gpu, -a.plan.num_gpus) > (b.goodput_per_gpu, -b.plan.num_gpus)

    def shortlist(self, scored: list[tuple[tuple, Plan]]) -> list[Plan]:
        """Top `num_verify` pairs by score, plus the best of every placement."""
        scored.sort(key=lambda sp: sp[0], reverse=True)
        chosen = [plan for _, plan in scored[: self.req.search.num_verify]]
        for placement in self.req.search.placements:
            best = next((plan for _, plan in scored if plan.placement == placement), None)
            if best is not None and best not in chosen:
                chosen.append(best)
        return chosen

    def candidates(self, configs: list[ParallelConfig], exhaustive: bool) -> list[Plan]:
        """Plans worth a co-simulation, best estimate first.

        Default: every pair's sensible instance counts (`count_options`). Exhaustive: every
        instance count of every pair that fits the budget and the nodes.
        """
        plans: dict[Plan, None] = {}
        for pair in self.pairs(configs):
            for plan in (self.all_counts(*pair) if exhaustive else self.count_options(*pair)):
                plans[plan] = None
        return sorted(plans, key=lambda p: (-self.estimate(p), p.num_gpus, p))

    def all_counts(self, placement: str, cp: ParallelConfig, cd: ParallelConfig) -> Iterator[Plan]:
        if placement == "low_node_affinity":
            yield from self.count_options(placement, cp, cd)  # already every (units, k_p, k_d)
            return
        budget = self.cluster.gpu_budget
        for n_p in range(1, budget // cp.num_gpus + 1):
            for n_d in range(1, (budget - n_p * cp.num_gpus) // cd.num_gpus + 1):
                plan = Plan("high_node_affinity", cp, n_p, cd, n_d)
                if self.feasible_layout(plan):
                    yield plan

    def max_goodput(self, configs: list[ParallelConfig], pool: Executor | None = None) -> list[EvaluatedPlan]:
        """Branch and bound on co-simulated goodput.

        1. Co-simulate the `num_verify` plans with the best per-phase estimates, plus the
           best of each placement: the incumbent is the best of them.
        2. Every other candidate must pass a co-simulation at just above the incumbent's
           goodput (`bar`) to be evaluated in full. Feasibility is monotone in the rate, so
           a candidate failing the bar cannot beat the incumbent by more than the bisection
           tolerance; and failing runs are cheap (a run stops at the first seed that loses
           the SLO, as soon as too many requests missed it). A candidate that passes is
           bisected and may become the incumbent, raising the bar.
        3. Local moves (shift, add or remove one instance) refine the winner.

        Candidates are ranked by estimate only to order the checks; the ranking that decides
        is always the co-simulated one, so pooling (n instances sharing queues sustain more
        than n times one under a tight TTFT) and the joint SLO are accounted for.
        Default candidates: `count_options` of every pair whose estimate is within
        `PRUNE_RATIO` of the best; exhaustive: every instance count of every pair.
        """
        exhaustive = self.req.search.exhaustive
        plans = self.candidates(configs, exhaustive)
        if not plans:
            return []
        scored = [((self.estimate(p), -p.num_gpus), p) for p in plans]
        shortlist = self.shortlist(scored)
        incumbent = self.evaluate(shortlist[0])
        floor = 0.0 if exhaustive else PRUNE_RATIO * self.estimate(plans[0])
        first = set(shortlist)
        failed: list[Plan] = []  # plans that failed a bar (bars only rise)
        queue = deque(shortlist[1:] + [p for p in plans if p not in first])
        while queue:
            batch: list[Plan] = []
            while queue and len(batch) < BAR_BATCH:
                plan = queue.popleft()
                if plan in self._evaluated or (plan not in first and self.estimate(plan) < floor):
                    continue
                if not exhaustive and any(_dominated(plan, f) for f in failed):
                    continue
                batch.append(plan)
            bar = max(incumbent.goodput_rps, 1e-3)
            verdicts = self.bars(batch, bar, pool)
            failed += [plan for plan, ok in zip(batch, verdicts) if not ok]
            for e in self.evaluate_all([plan for plan, ok in zip(batch, verdicts) if ok], bar, pool):
                if self.better(e, incumbent):
                    incumbent = e
        current = incumbent
        for _ in range(MAX_LOCAL_STEPS):
            challengers = [self.evaluate(p) for p in self.neighbours(current.plan)]
            best = current
            for c in challengers:
                if self.better(c, best):
                    best = c
            if best is current:
                break
            current = best
        return self.rank(list(self._evaluated.values()))

    def rank(self, results: list[EvaluatedPlan]) -> list[EvaluatedPlan]:
        ordered = sorted(results, key=lambda e: (-e.goodput_rps, -e.goodput_per_gpu, e.plan))
        if not ordered:
            return []
        winner = ordered[0]
        for e in ordered[1:]:
            if self.better(e, winner):
                winner = e
        return [winner] + [e for e in ordered if e is not winner]

    def min_gpus(self, configs: list[ParallelConfig], rate: float) -> list[EvaluatedPlan]:
        scored = []
        for pair in self.pairs(configs):
            options = [p for p in self.count_options(*pair) if self.estimate(p) >= rate]
            if options:
                best = min(options, key=lambda p: (p.num_gpus, -self.estimate(p)))
                scored.append(((-best.num_gpus, self.estimate(best)), best))
        passing: dict[Plan, None] = {}
        for start in self.shortlist(scored):
            found = self.fit_to_rate(start, rate)
            if found is not None:
                passing[found] = None
        evaluated = [self.evaluate(p) for p in passing]
        return sorted(evaluated, key=lambda e: (e.plan.num_gpus, -e.goodput_rps, e.plan))

    def fit_to_rate(self, plan: Plan, rate: float) -> Plan | None:
        """Local search from an estimated plan to the cheapest neighbour sustaining `rate`:
        grow the phase whose SLO fails more until it passes, then shrink while it passes."""
        for _ in range(MAX_LOCAL_STEPS):
            if self.passes(plan, rate):
                break
            m = self.judge(plan).measure(rate)
            self.num_runs += len(self.judge(plan).traces)
            grow_prefill = m.ttft_miss >= m.tpot_miss
            if plan.placement == "low_node_affinity":
                k_p = plan.num_prefill // plan.num_units + (1 if grow_prefill else 0)
                k_d = plan.num_decode // plan.num_units + (0 if grow_prefill else 1)
                nxt = replace(plan, num_prefill=k_p * plan.num_units, num_decode=k_d * plan.num_units)
                if not self.feasible_layout(nxt):
                    nxt = replace(plan, num_units=plan.num_units + 1,
                                  num_prefill=plan.num_prefill // plan.num_units * (plan.num_units + 1),
                                  num_decode=plan.num_decode // plan.num_units * (plan.num_units + 1))
            else:
                nxt = replace(plan, num_prefill=plan.num_prefill + grow_prefill,
                              num_decode=plan.num_decode + (not grow_prefill))
            if not self.feasible_layout(nxt):
                return None
            plan = nxt
        else:
            return None
        for _ in range(MAX_LOCAL_STEPS):
            cheaper = sorted((p for p in self.neighbours(plan) if p.num_gpus < plan.num_gpus),
                             key=lambda p: (p.num_gpus, -self.estimate(p)))
            nxt = next((p for p in cheaper if self.passes(p, rate)), None)
            if nxt is None:
                break
            plan = nxt
        return plan


def _dominated(plan: Plan, failed: Plan) -> bool:
    """`plan` has no more instances of either phase than `failed`, in the same
    configurations and placement: it cannot sustain a rate that `failed` did not (fewer
    instances on the same links only add queueing), so the default search skips its bar
    check. The exhaustive search checks every plan (it is the reference)."""
    return (plan.placement == failed.placement and plan.prefill == failed.prefill
            and plan.decode == failed.decode and plan.num_units == failed.num_units
            and plan.num_prefill <= failed.num_prefill
            and plan.num_decode <= failed.num_decode)


# In the order ties go: the measured goodput of a shared layout has always come out below
# its prediction (docs/planner.md, "The front end on a CPU host"), so a layout that keeps
# the front end off the engines (or off the decode engines) wins a tie.
FRONT_END_LAYOUTS = ("reserved", "with_prefill", "shared")


def search(problem: PlanningProblem) -> PlanOutcome:
    """Pure and deterministic: the same problem gives the same outcome. With a modelled
    front end of layout auto, every layout is planned and the best one is returned, the
    others attached as `other_layouts` (`_better_layout`)."""
    req = problem.request
    if not req.front_end.modelled:
        return _search_layout(problem)
    if req.front_end.layout != "auto":
        return _plan_layout(problem, req.front_end.layout)
    outcomes = [_plan_layout(problem, layout) for layout in FRONT_END_LAYOUTS]
    chosen = outcomes[0]
    for o in outcomes[1:]:
        if _better_layout(o, chosen, req.workload.rate is None, req.search.rel_tol):
            chosen = o
    return replace(chosen, other_layouts=tuple(o for o in outcomes if o is not chosen),
                   num_simulations=sum(o.num_simulations for o in outcomes))


def _better_layout(a: PlanOutcome, b: PlanOutcome, max_goodput: bool, tol: float) -> bool:
    """Whether layout outcome `a` beats `b`. Max goodput: more goodput beyond the bisection's
    tolerance, or (a tie) fewer units. A target rate: sustaining it on fewer units."""
    if not max_goodput:
        return a.best is not None and (b.best is None or a.units < b.units)
    g_a, g_b = a.deployment_goodput_rps, b.deployment_goodput_rps
    return g_a > g_b * (1 + tol) or (g_a >= g_b / (1 + tol) and g_a > 0 and a.units < b.units)


def _plan_layout(problem: PlanningProblem, layout: str) -> PlanOutcome:
    """The search with the front end in one layout, the outcome labelled with it."""
    fe = problem.request.front_end
    return replace(_search_layout(for_front_end_layout(problem, layout)), front_end_layout=layout,
                   front_end_cores=fe.reserved_cores if layout == "reserved" else 0)


_worker_search: list[_Search] = []  # in a pool's process: the last problem's search state


def _search_for(problem: PlanningProblem) -> _Search:
    """A search of `problem` that keeps its traces, judges and prefill passes across the
    jobs a pool's process runs for it (each job's runs are counted from zero)."""
    if not _worker_search or _worker_search[0].problem != problem:
        _worker_search[:] = [_Search(problem)]
    s = _worker_search[0]
    s.num_runs = 0
    return s


def _phase_job(job: tuple) -> tuple[PhaseGoodput, int]:
    return phase_goodput(*job)


def _colocated_job(job: tuple) -> tuple[ColocatedGoodput, int]:
    problem, config, scheduler = job
    s = _search_for(problem)
    return s.colocated_baseline(config, scheduler), s.num_runs


def _bar_job(job: tuple[PlanningProblem, Plan, float]) -> tuple[bool, int]:
    problem, plan, bar = job
    s = _search_for(problem)
    return s.passes(plan, bar), s.num_runs


def _evaluate_job(job: tuple) -> tuple[EvaluatedPlan, int]:
    problem, phases, plan, passed = job
    s = _search_for(problem)
    s.phase.update(phases)  # the per-phase goodputs the estimate reads
    s.judge(plan).verdicts[passed] = True  # the bar it passed in the parent
    return s.evaluate(plan, passed), s.num_runs


def _measure_job(job: tuple[PlanningProblem, EvaluatedPlan]) -> tuple[EvaluatedPlan, int]:
    problem, e = job
    s = _search_for(problem)
    return s.measured(e), s.num_runs


def _search_layout(problem: PlanningProblem) -> PlanOutcome:
    with job_pool(problem.request.search.workers) as pool:
        return _search_layout_in(problem, pool)


def _search_layout_in(problem: PlanningProblem, pool: Executor | None) -> PlanOutcome:
    s = _Search(problem)
    req = problem.request
    configs, excluded = enumerate_configs(problem)
    phases = s.phase_goodputs(configs, pool) if configs else []

    colocated = []
    if req.search.compare_colocated:
        colocated = s.colocated_baselines(configs, pool)

    rate = req.workload.rate
    fallback = None
    if rate is None:
        ranked = s.max_goodput(configs, pool)
    else:
        ranked = s.min_gpus(configs, rate)
        if not ranked:
            alternatives = s.max_goodput(configs, pool)
            fallback = alternatives[0] if alternatives else None
    # The report's full runs: one job per plan it shows.
    runners_up = [e for e in ranked[1:] if e.goodput_rps > 0][:3]
    shown = ranked[:1] + runners_up + ([fallback] if fallback is not None else [])
    measured: dict[Plan, EvaluatedPlan] = {}
    for e, runs in map_jobs(pool, _measure_job, [(problem, e) for e in {e.plan: e for e in shown}.values()]):
        s.num_runs += runs
        measured[e.plan] = e
    best = measured[ranked[0].plan] if ranked else None
    runners = tuple(measured[e.plan] for e in runners_up)
    if fallback is not None:
        fallback = measured[fallback.plan]
    return PlanOutcome(
        objective="max_goodput" if rate is None else "min_gpus", target_rate=rate, best=best,
        runners_up=runners, phases=tuple(phases), excluded=tuple(excluded),
        colocated=tuple(colocated), fallback=fallback, num_simulations=s.num_runs,
    )
