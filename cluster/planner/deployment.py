"""Turn a chosen plan into the `ServeConfig` that `pdserve serve` accepts.

Only the pools, the SLO and the model are planner decisions; everything else comes from
an optional base config (router, Ray, transfer settings), or the schema's defaults.
`ServeConfig` has no placement field: the node layout the plan assumed is reported, and
the launcher's placement groups should follow it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cluster.config import ServeConfig, load_config

from .inputs import PlanRequest
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


def plan_to_serve_config(plan: Plan, request: PlanRequest, base: ServeConfig | None = None) -> ServeConfig:
    """A validated disaggregated `ServeConfig` running `plan`."""
    data = (base or ServeConfig()).model_dump(mode="python")
    data["mode"] = "disaggregated"
    for role, config, n in (("prefill", plan.prefill, plan.num_prefill),
                            ("decode", plan.decode, plan.num_decode)):
        pool = dict(data[role])
        pool.update(_pool(config, n, request, role == "prefill"))
        pool["cpu_cores"] = None  # CPU-backend binding does not carry over to a GPU plan
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
    return ServeConfig.model_validate(data)


def load_base_config(path: Path | None) -> ServeConfig | None:
    return load_config(path) if path is not None else None
