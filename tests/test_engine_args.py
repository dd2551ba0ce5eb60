"""cluster.engine_args: the one builder of vLLM engine arguments (serving host and profiler)."""

from pathlib import Path

from cluster.config import ModelConfig, PoolConfig
from cluster.engine_args import engine_kwargs, pool_engine_kwargs


def test_pool_kwargs_carry_the_pool_and_model_settings():
    model = ModelConfig(dtype="float32", seed=3, max_model_len=512, block_size=32)
    pool = PoolConfig(num_instances=1, tensor_parallel_size=1, max_num_seqs=7,
                      max_num_batched_tokens=1024, enable_prefix_caching=False)
    kw = pool_engine_kwargs(Path("/m"), model, pool, on_gpu=False)
    assert kw["model"] == "/m" and kw["dtype"] == "float32" and kw["seed"] == 3
    assert (kw["max_model_len"], kw["block_size"], kw["max_num_seqs"]) == (512, 32, 7)
    assert kw["max_num_batched_tokens"] == 1024 and kw["enable_prefix_caching"] is False
    assert "gpu_memory_utilization" not in kw  # the CPU backend sizes KV by kv_cache_gib
    assert pool_engine_kwargs(Path("/m"), model, pool, on_gpu=True)["gpu_memory_utilization"] == \
        pool.gpu_memory_utilization


def test_unset_options_are_left_to_vllm():
    kw = engine_kwargs("/m")
    assert not {"block_size", "max_num_batched_tokens", "served_model_name",
                "gpu_memory_utilization"} & set(kw)


def test_host_and_profiler_share_it():
    import cluster.engine_host
    import cluster.profile_engine  # the profiler's engine (cluster/profiler.py drives it)
    assert cluster.engine_host.pool_engine_kwargs is pool_engine_kwargs
    assert cluster.profile_engine.engine_kwargs is engine_kwargs
