"""GPU memory accounting for the device staging arena: engine KV plus transfer buffers fit in
`gpu_memory_utilization`.

vLLM sizes its KV cache from `gpu_memory_utilization x total device memory`, minus weights
and activations. The device staging arena (`KVTransferSettings.device_staging_gib`) is
allocated by the connector outside vLLM's accounting, so the engine must be given a
utilization reduced by the arena's share; the KV capacity the planner counts on is then
what vLLM reports with that reduced share (or, estimated beforehand, the KV bytes minus
the arena). Pure functions: no torch, no CUDA.
"""

from __future__ import annotations

GIB = 1 << 30


def arena_bytes(device_staging_gib: float) -> int:
    return int(device_staging_gib * GIB)


def engine_memory_utilization(requested: float, arena_nbytes: int, device_total_bytes: int) -> float:
    """The `gpu_memory_utilization` to hand vLLM so that the engine's share plus the arena
    stay within `requested` of the device. Raises ValueError when the arena alone takes it."""
    if not 0 < requested <= 1:
        raise ValueError(f"gpu_memory_utilization {requested} is outside (0, 1]")
    if device_total_bytes <= 0:
        raise ValueError("device_total_bytes must be positive")
    share = arena_nbytes / device_total_bytes
    engine = requested - share
    if engine <= 0:
        raise ValueError(f"the device staging arena ({arena_nbytes / GIB:.2f} GiB) takes the whole "
                         f"gpu_memory_utilization share ({requested:.2f} of "
                         f"{device_total_bytes / GIB:.1f} GiB)")
    return engine


def kv_capacity_bytes(kv_bytes_without_arena: int, arena_nbytes: int) -> int:
    """The engine's KV bytes once the arena is carved out of the same share."""
    return max(0, kv_bytes_without_arena - arena_nbytes)
