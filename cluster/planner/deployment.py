"""Turn a chosen plan into the `ServeConfig` that `pdserve serve` accepts.

Only the pools, the SLO and the model are planner decisions; everything else comes from
an optional base config (router, Ray, transfer settings), or the schema's defaults.
`ServeConfig` has no placement field: the node layout the plan assumed is reported, and
the launcher's placement groups should follow it. A CPU plan (`cluster.device: cpu`) pins
each instance to one core of its node, in layout order (prefill instances first), reserves
no GPU, and sizes each instance's KV cache to `cluster.gpu_memory_gib`; a plan with a
reserved front end (`front_end.layout: reserved`) starts the engines after the front end's
cores and pins the front end to them (`ray.front_end_cores`); a front end with the prefill
instances (`with_prefill`) is pinned to the prefill instances' cores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cluster.config import ServeConfig, load_config

from .inputs import PlanRequest
from .placement import layout_plan
from .plans import ParallelConfig, Plan


def _pool(config: ParallelConfig, num_instances: int, request: PlanRequest, prefill: bool) -> dict[str, Any]:
    e = request.engine
    pool: dict[str, Any] = {
        "num_instances": num_instances,
        "tensor_parallel_size": config.tp,
        "pipeline_parallel_size": config.pp,
        "num_gpus": float(config.num_gpus),
        "gpu_memory_utilization": request.cluster.gpu_memory_utilization,
        "max_num_seqs": e.max_num_seqs,
    }
    if prefill:
        pool["max_num_batched_tokens"] = e.prefill_token_budget
    return pool


def _reserved_front_end_cores(request: PlanRequest) -> int:
    """Cores a reserved front end takes: the node's first ones (`front_end.py`)."""
    fe = request.front_end
    return fe.reserved_cores if fe.modelled and fe.layout == "reserved" else 0


def _pin_front_end(data: dict[str, Any], request: PlanRequest,
                   prefill_cores: list[list[int]] | None = None) -> None:
    """Pin the front end where its layout puts it: a reserved front end on the node's first
    cores, a with_prefill one on the prefill instances' cores."""
    fe = request.front_end
    if fe.modelled and fe.layout == "with_prefill" and prefill_cores:
        cores = sorted({c for inst in prefill_cores for c in inst})
    else:
        cores = list(range(_reserved_front_end_cores(request)))
    if cores:
        data["ray"] = {**data["ray"], "front_end_cores": cores}


def _cpu_cores(plan: Plan, request: PlanRequest) -> tuple[list[list[int]], list[list[int]]]:
    """(prefill, decode) core of each instance: the next free core of its node, by layout,
    after a reserved front end's cores."""
    c = request.cluster
    layout = layout_plan(plan, c.num_nodes, c.gpus_per_node)
    if layout is None:
        raise ValueError(f"plan {plan.label} does not fit the cluster")
    first = _reserved_front_end_cores(request)
    next_core: dict[int, int] = {}

    def take(nodes: tuple[int, ...]) -> list[int]:
        node = nodes[0]  # CPU instances have one stage
        next_core[node] = next_core.get(node, first) + 1
        return [next_core[node] - 1]

    return [take(n) for n in layout.prefill_nodes], [take(n) for n in layout.decode_nodes]


def plan_to_serve_config(plan: Plan, request: PlanRequest, base: ServeConfig | None = None) -> ServeConfig:
    """A validated disaggregated `ServeConfig` running `plan`."""
    data = (base or ServeConfig()).model_dump(mode="python")
    data["mode"] = "disaggregated"
    is_cpu = request.cluster.device == "cpu"
    cores = _cpu_cores(plan, request) if is_cpu else (None, None)
    for (role, config, n), role_cores in zip((("prefill", plan.prefill, plan.num_prefill),
                                              ("decode", plan.decode, plan.num_decode)), cores):
        pool = dict(data[role])
        pool.update(_pool(config, n, request, role == "prefill"))
        if is_cpu:
            pool.update(num_gpus=0.0, num_cpus=1.0, kv_cache_gib=int(request.cluster.gpu_memory_gib))
        # A GPU plan drops any CPU-backend binding of the base config.
        pool["cpu_cores"] = role_cores
        data[role] = pool
    model = dict(data["model"])
    model_path = Path(request.model)
    # A reference name stays a name: serving fails loudly until it points at real weights,
    # rather than silently serving the embedded tiny model (what an unset path means).
    model["path"] = model_path.resolve() if model_path.is_dir() else model_path
    if model.get("served_model_name") is None and not model_path.is_dir():
        model["served_model_name"] = request.model
    data["model"] = model
    data["slo"] = request.slo.model_dump()
    if is_cpu:
        _pin_front_end(data, request, cores[0])
    return ServeConfig.model_validate(data)


def colocated_to_serve_config(config: ParallelConfig, num_instances: int, request: PlanRequest,
                              base: ServeConfig | None = None) -> ServeConfig:
    """A validated colocated `ServeConfig`: `num_instances` instances of `config`."""
    data = (base or ServeConfig()).model_dump(mode="python")
    data["mode"] = "colocated"
    pool = dict(data["colocated"])
    pool.update(_pool(config, num_instances, request, prefill=True))
    if request.cluster.device == "cpu":
        first = _reserved_front_end_cores(request)
        pool.update(num_gpus=0.0, num_cpus=1.0, kv_cache_gib=int(request.cluster.gpu_memory_gib),
                    cpu_cores=[[first + i % request.cluster.gpus_per_node]
                               for i in range(num_instances)])
        _pin_front_end(data, request)
    else:
        pool["cpu_cores"] = None
    data["colocated"] = pool
    model = dict(data["model"])
    model_path = Path(request.model)
    model["path"] = model_path.resolve() if model_path.is_dir() else model_path
    if model.get("served_model_name") is None and not model_path.is_dir():
        model["served_model_name"] = request.model
    data["model"] = model
    data["slo"] = request.slo.model_dump()
    return ServeConfig.model_validate(data)


def load_base_config(path: Path | None) -> ServeConfig | None:
    return load_config(path) if path is not None else None
