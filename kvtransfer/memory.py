"""GPU memory accounting for the device staging arena: engine KV plus transfer buffers fit in
`gpu_memory_utilization`.

vLLM sizes its KV cache from `gpu_memory_utilization x total device memory`, minus weights
and activations. The device staging arena (`KVTransferSettings.device_staging_gib`) is
allocated by the connector outside vLLM's accounting, so the engine must be given a
utilization reduced by the arena's share; the KV capacity the planner counts on is then
what vLLM reports with that reduced share (or, estimated beforehand, the KV bytes minus
the arena). Pure functions: no torch, no CUDA.

Where it is applied: `cluster.engine_args.engine_memory_utilization` (defined there, since
`cluster` sits below `kvtransfer`; re-exported here) reduces a prefill engine's
gpu_memory_utilization by its arena (`cluster/engine_host.py`, with the arena size from
`device_path.engine_arena_bytes` through `ProducerService.engine_arena_bytes`); the
planner's computed KV capacity subtracts `ClusterSpec.device_staging_gib`
(`cluster/planner/problem.py`).
"""

from __future__ import annotations

from cluster.engine_args import GIB, engine_memory_utilization

__all__ = ["GIB", "arena_bytes", "engine_memory_utilization", "kv_capacity_bytes"]


def arena_bytes(device_staging_gib: float) -> int:
    return int(device_staging_gib * GIB)


def kv_capacity_bytes(kv_bytes_without_arena: int, arena_nbytes: int) -> int:
    """The engine's KV bytes once the arena is carved out of the same share."""
    return max(0, kv_bytes_without_arena - arena_nbytes)
