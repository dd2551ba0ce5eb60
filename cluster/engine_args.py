"""The one place that turns pdserve settings into vLLM engine arguments.

`engine_kwargs` returns the keyword arguments of vLLM's `EngineArgs` / `AsyncEngineArgs`
(both take the same fields); the serving host (`cluster.engine_host`) and the profiler
(`cluster.profiler`) build their engines from it, so a profile is measured on an engine
configured the way the serving pools run it. Pure: no vLLM import here (callers wrap the
dict in the class they need).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def engine_kwargs(
    model_path: Path | str,
    *,
    dtype: str = "auto",
    seed: int = 0,
    served_model_name: str | None = None,
    max_model_len: int | None = None,
    block_size: int | None = None,
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    max_num_seqs: int = 128,
    max_num_batched_tokens: int | None = None,
    enable_prefix_caching: bool = True,
    gpu_memory_utilization: float | None = None,
    disable_log_stats: bool = False,
) -> dict[str, Any]:
    """Unset optional settings are left out, so vLLM's own defaults apply."""
    kwargs: dict[str, Any] = dict(
        model=str(model_path), dtype=dtype, seed=seed, max_model_len=max_model_len,
        tensor_parallel_size=tensor_parallel_size, pipeline_parallel_size=pipeline_parallel_size,
        max_num_seqs=max_num_seqs, enable_prefix_caching=enable_prefix_caching,
        disable_log_stats=disable_log_stats)
    if served_model_name is not None:
        kwargs["served_model_name"] = served_model_name
    if block_size is not None:
        kwargs["block_size"] = block_size
    if max_num_batched_tokens is not None:
        kwargs["max_num_batched_tokens"] = max_num_batched_tokens
    if gpu_memory_utilization is not None:
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
    return kwargs


GIB = 1 << 30


def engine_memory_utilization(requested: float, arena_nbytes: int, device_total_bytes: int) -> float:
    """The `gpu_memory_utilization` to hand vLLM so that the engine's share plus a buffer of
    `arena_nbytes` that vLLM does not count (the KV transfer's device staging arena,
    `kvtransfer/memory.py`) stay within `requested` of the device. Raises ValueError when
    the arena alone takes the whole share."""
    if not 0 < requested <= 1:
        raise ValueError(f"gpu_memory_utilization {requested} is outside (0, 1]")
    if device_total_bytes <= 0:
        raise ValueError("device_total_bytes must be positive")
    engine = requested - arena_nbytes / device_total_bytes
    if engine <= 0:
        raise ValueError(f"the device staging arena ({arena_nbytes / GIB:.2f} GiB) takes the whole "
                         f"gpu_memory_utilization share ({requested:.2f} of "
                         f"{device_total_bytes / GIB:.1f} GiB)")
    return engine


def pool_engine_kwargs(model_path: Path | str, model, pool, *, on_gpu: bool,
                       device_arena_bytes: int = 0, device_total_bytes: int | None = None
                       ) -> dict[str, Any]:
    """`engine_kwargs` of one serving instance: a `ModelConfig` and its `PoolConfig`
    (GPU memory utilisation only applies on a GPU; the CPU backend sizes KV by kv_cache_gib).
    On a GPU, a connector's device arena of `device_arena_bytes` (on a device of
    `device_total_bytes`) comes out of the pool's gpu_memory_utilization share."""
    utilization = pool.gpu_memory_utilization if on_gpu else None
    if utilization is not None and device_arena_bytes > 0:
        if device_total_bytes is None:
            raise ValueError("device_total_bytes is needed to account for a device arena")
        utilization = engine_memory_utilization(utilization, device_arena_bytes, device_total_bytes)
    return engine_kwargs(
        model_path, dtype=model.dtype, seed=model.seed, served_model_name=model.served_model_name,
        max_model_len=model.max_model_len, block_size=model.block_size,
        tensor_parallel_size=pool.tensor_parallel_size, pipeline_parallel_size=pool.pipeline_parallel_size,
        max_num_seqs=pool.max_num_seqs, max_num_batched_tokens=pool.max_num_batched_tokens,
        enable_prefix_caching=pool.enable_prefix_caching,
        gpu_memory_utilization=utilization)
