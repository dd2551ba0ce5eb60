"""Mode auto: `pdserve serve` asks the planner which deployment serves the config's SLO and
workload best on the CPU host it starts, and serves that.

The planner (cluster/planner) plans every front-end layout of a CPU host (docs/planner.md,
"The front end on a CPU host"): the front end on a core of its own with one engine per
other core (reserved), engines on every core with the front end among them (shared), or the
front end with the prefill instances and the decode instances alone (with_prefill), each
colocated or disaggregated where that applies. The deployment with the most goodput is
written as an ordinary config (`cluster/planner/deployment.py`, the cores mapped onto this
host's) and served; the log says what each layout was predicted to sustain.
`pdserve serve --mode auto --print-config` prints the result without serving it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pydantic import ValidationError

import cluster.planner
from cluster.config import ConfigError, PlannerConfig, ServeConfig
from cluster.planner.deployment import colocated_to_serve_config, plan_to_serve_config
from cluster.planner.inputs import PlanRequest
from cluster.planner.problem import build_problem
from cluster.planner.report import layout_summary
from cluster.planner.search import PlanOutcome, search
from cluster.workload_schema import WorkloadError, load_workload_file

log = logging.getLogger("pdserve.auto")

# Profiles of the embedded models, one engine on one core (`pdserve profile --embedded-model
# NAME --cpu-cores 1`), measured on a 2-core x86 host with AVX2.
PROFILES = Path(cluster.planner.__file__).parent / "profiles"
# vLLM's benchmark's defaults (`vllm bench serve --dataset-name random`).
DEFAULT_WORKLOAD: dict[str, Any] = {"lengths": {"kind": "fixed", "input_len": 1024, "output_len": 128}}
# Lighter than `pdserve plan`'s defaults (3 traces x 3,000 requests): a few seconds at start-up.
SEARCH: dict[str, Any] = {"num_requests": 1000, "num_seeds": 2, "compare_colocated": True}


def bundled_profile(config: ServeConfig) -> Path | None:
    """The shipped profile of the config's embedded model, or None for a model directory."""
    if config.model.path is not None:
        return None
    path = PROFILES / f"cpu-{config.model.embedded}-1core.json"
    return path if path.exists() else None


def planner_workload(config: ServeConfig) -> dict[str, Any]:
    """The workload mode auto plans for, read once (its `rate` included, if any)."""
    if config.planner.workload is None:
        return DEFAULT_WORKLOAD
    try:
        return load_workload_file(config.planner.workload).model_dump(mode="json", exclude_none=True)
    except WorkloadError as e:
        raise ConfigError(f"planner.workload: {e}") from None


def plan_request(config: ServeConfig, model_path: Path, num_cores: int,
                 workload: dict[str, Any]) -> PlanRequest:
    """The planner's question for this config and `workload` (`planner_workload`) on a host
    of `num_cores` cores."""
    p = config.planner
    profile = p.profile or bundled_profile(config)
    if profile is None:
        raise ConfigError("mode auto needs planner.profile for a model directory: measure one "
                          f"with `pdserve profile --model {model_path} --cpu-cores 1 -o FILE`")
    # The host is given: plan its most goodput (a rate would ask for the fewest cores and
    # leave the rest idle). `resolve_auto_mode` checks the plan against the rate instead.
    workload = {k: v for k, v in workload.items() if k != "rate"}
    front_end: dict[str, Any] = {
        "cpu_ms_per_request": p.front_end_cpu_ms,
        "cpu_ms_per_output_token": p.front_end_cpu_ms_per_token,
        # One core has no other for the front end: only the shared layout exists there.
        "layout": "auto" if num_cores > 1 else "shared",
        "shared_core_step_ms": p.shared_core_step_ms,
        "scheduler_poll_share": p.scheduler_poll_share,
    }
    try:
        return PlanRequest.model_validate({
            "model": str(model_path), "profile": str(profile), "slo": config.slo.model_dump(),
            "workload": workload, "front_end": front_end, "search": SEARCH,
            "cluster": {"device": "cpu", "num_nodes": 1, "gpus_per_node": num_cores,
                        "gpu_memory_gib": p.kv_cache_gib}})
    except ValidationError as e:
        first = e.errors()[0]
        raise ConfigError(f"mode auto: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None


def _on_host(config: ServeConfig, host_cores: list[int]) -> ServeConfig:
    """The plan's cores (0..n-1 of a node) as this host's cores."""
    def mapped(cores: list[list[int]] | None) -> list[list[int]] | None:
        return None if cores is None else [[host_cores[c] for c in inst] for inst in cores]

    update: dict[str, Any] = {role: pool.model_copy(update={"cpu_cores": mapped(pool.cpu_cores)})
                              for role, pool in config.pools().items()}
    fe = config.ray.front_end_cores
    if fe is not None:
        update["ray"] = config.ray.model_copy(update={"front_end_cores": [host_cores[c] for c in fe]})
    return config.model_copy(update=update)


def deployment_of(outcome: PlanOutcome, request: PlanRequest, config: ServeConfig) -> ServeConfig | None:
    """The config serving the outcome's choice, or None where no deployment meets the SLO."""
    if outcome.front_end_layout is not None:
        request = request.with_front_end_layout(outcome.front_end_layout)
    # The config's own sections stay (router, Ray, transfer, model); the plan writes the pools.
    base = config.model_copy(update={"mode": "disaggregated", "planner": PlannerConfig()})
    if outcome.serve_colocated:
        top = outcome.best_colocated
        planned = colocated_to_serve_config(top.config, top.num_instances, request, base)
    else:
        best = outcome.best or outcome.fallback
        if best is None or best.goodput_rps <= 0:
            return None
        planned = plan_to_serve_config(best.plan, request, base)
    # The model as the config names it (an embedded model keeps its served name).
    return planned.model_copy(update={"model": config.model})


def resolve_auto_mode(config: ServeConfig, model_path: Path, host_cores: list[int]) -> ServeConfig:
    """Plan mode auto on this host's cores and return the config to serve."""
    workload = planner_workload(config)
    request = plan_request(config, model_path, len(host_cores), workload)
    outcome = search(build_problem(request))
    planned = deployment_of(outcome, request, config)
    slo = config.slo
    what = f"TTFT {slo.ttft_s:g} s / TPOT {slo.tpot_s:g} s / {slo.attainment:.0%}"
    for i, o in enumerate((outcome, *outcome.other_layouts)):
        log.info("mode auto, %s: %s", "chosen" if i == 0 else "other ", layout_summary(o, "core"))
    if planned is None:
        log.warning("mode auto: the planner finds no deployment meeting %s on %d core(s) at any "
                    "rate; serving one colocated instance (the layout that met the most SLOs "
                    "measured on CPU hosts)", what, len(host_cores))
        return config.model_copy(update={
            "mode": "colocated", "planner": PlannerConfig(),
            "colocated": config.colocated.model_copy(update={"kv_cache_gib": config.planner.kv_cache_gib})})
    log.info("mode auto: serving %s mode for %s", planned.mode, what)
    rate = workload.get("rate")
    if rate is not None:
        goodput = outcome.deployment_goodput_rps
        (log.info if goodput >= rate else log.warning)(
            "mode auto: predicted goodput %.2f req/s %s the workload's rate of %g req/s",
            goodput, "covers" if goodput >= rate else "falls short of", rate)
    return _on_host(planned, host_cores)
