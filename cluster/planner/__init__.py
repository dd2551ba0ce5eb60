"""SLO-driven placement planner: a functional core (no Ray, torch, vLLM or HTTP).

    request = PlanRequest(...)                  # inputs (inputs.py)
    problem = build_problem(request)            # the only file reads (problem.py)
    outcome = search(problem)                   # pure, deterministic by seed (search.py)
    config  = plan_to_serve_config(outcome.best.plan, request)   # a ServeConfig

Modules: latency_model (profile format, iteration times), profile_fit (least squares),
model_shape (KV bytes, memory fit), workload (lengths, arrivals, traces), prefill_pool /
decode_pool / colocated (discrete-event pools), simulator (library API), placement (node
layout, transfer links), goodput (attainment, bisection), phase_goodput (per-phase
pruning), search, deployment, report, cli. Design notes: docs/planner.md.
"""

from .deployment import plan_to_serve_config
from .inputs import ClusterSpec, EngineModelSpec, PlanRequest, SearchSpec, WorkloadSpec
from .latency_model import EngineTiming, LatencyProfile, ProfileTable, load_profiles
from .problem import PlanningProblem, build_problem
from .profile_fit import DecodeSample, PrefillSample, fit_profile, profile_document
from .search import PlanOutcome, search
from .simulator import (DisaggregatedSystem, SimResult, simulate_colocated,
                        simulate_decode_only, simulate_disaggregated, simulate_prefill_only)

__all__ = [
    "ClusterSpec", "DecodeSample", "DisaggregatedSystem", "EngineModelSpec", "EngineTiming",
    "LatencyProfile", "PlanOutcome", "PlanRequest", "PlanningProblem", "PrefillSample",
    "ProfileTable", "SearchSpec", "SimResult", "WorkloadSpec", "build_problem", "fit_profile",
    "load_profiles", "plan_to_serve_config", "profile_document", "search",
    "simulate_colocated", "simulate_decode_only", "simulate_disaggregated",
    "simulate_prefill_only",
]
