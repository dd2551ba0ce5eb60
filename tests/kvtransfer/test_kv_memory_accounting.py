"""GPU memory accounting of the device staging arena, applied (issue 15).

The arena is allocated by the connector outside vLLM's accounting: a prefill engine on the
device path gets a gpu_memory_utilization reduced by the arena's share (engine_args, through
EngineHost), and the planner's computed KV capacity is net of it. No GPU needed: the device's
total memory is a number here.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from cluster import engine_host
from cluster.config import KVTransferSettings, ModelConfig, PoolConfig
from cluster.engine_args import engine_memory_utilization, pool_engine_kwargs
from cluster.engine_host import EngineHost, EngineSpec
from cluster.planner.inputs import ClusterSpec
from cluster.planner.model_shape import ModelShape, kv_capacity_tokens
from cluster.planner.plans import ParallelConfig
from cluster.planner.problem import PlanningProblem
from kvtransfer import memory
from kvtransfer.service import ProducerService

GIB = 1 << 30


def test_the_engine_share_plus_the_arena_stay_within_the_utilization():
    assert engine_memory_utilization(0.9, 8 * GIB, 80 * GIB) == pytest.approx(0.8)
    assert memory.engine_memory_utilization is engine_memory_utilization  # one definition
    with pytest.raises(ValueError, match="takes the whole"):
        engine_memory_utilization(0.1, 8 * GIB, 80 * GIB)


def test_pool_engine_kwargs_reduce_the_utilization_on_a_gpu_only():
    pool = PoolConfig(gpu_memory_utilization=0.9)
    model = ModelConfig()
    on_gpu = pool_engine_kwargs("m", model, pool, on_gpu=True, device_arena_bytes=8 * GIB,
                                device_total_bytes=80 * GIB)
    assert on_gpu["gpu_memory_utilization"] == pytest.approx(0.8)
    assert pool_engine_kwargs("m", model, pool, on_gpu=True)["gpu_memory_utilization"] == 0.9
    assert "gpu_memory_utilization" not in pool_engine_kwargs(
        "m", model, pool, on_gpu=False, device_arena_bytes=8 * GIB)  # CPU: kv_cache_gib rules


def test_engine_host_hands_vllm_the_reduced_share(monkeypatch):
    spec = EngineSpec(model_path=Path("m"), model=ModelConfig(),
                      pool=PoolConfig(gpu_memory_utilization=0.9), instance_index=0,
                      device_arena_bytes=4 * GIB)
    monkeypatch.setattr(engine_host, "is_cuda_available", lambda: True)
    monkeypatch.setattr(engine_host, "device_total_bytes", lambda: 40 * GIB)
    assert EngineHost(spec)._engine_args().gpu_memory_utilization == pytest.approx(0.8)
    monkeypatch.setattr(engine_host, "is_cuda_available", lambda: False)
    args = EngineHost(spec)._engine_args()  # a CPU engine: vLLM's own default, untouched
    assert args.gpu_memory_utilization == EngineHost(
        EngineSpec(Path("m"), ModelConfig(), PoolConfig(), 0))._engine_args().gpu_memory_utilization


def test_only_a_prefill_on_the_device_path_counts_an_arena(tmp_path):
    settings = KVTransferSettings(staging_dir=tmp_path, transport="cuda_ipc", device_staging_gib=0.5)
    service = ProducerService("p", settings, "127.0.0.1", sweep=False)
    try:
        assert service.engine_arena_bytes(on_gpu=True) == GIB // 2
        assert service.engine_arena_bytes(on_gpu=False) == 0  # CPU engine: host path
    finally:
        service.close()
    host_only = ProducerService("p", settings.model_copy(update={"transport": "tcp"}), "127.0.0.1",
                                sweep=False)
    try:
        assert host_only.engine_arena_bytes(on_gpu=True) == 0  # tcp moves host segments only
    finally:
        host_only.close()


def test_the_planners_kv_capacity_is_net_of_the_arena():
    shape = ModelShape(name="llama-like", num_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, hidden_size=4096, head_dim=128,
                       intermediate_size=14336, vocab_size=128256, is_gated_mlp=True,
                       tie_word_embeddings=False)

    def capacity(arena_gib: float) -> int:
        request = SimpleNamespace(cluster=ClusterSpec(gpu_memory_gib=80, device_staging_gib=arena_gib),
                                  engine=SimpleNamespace(block_size=16))
        problem = PlanningProblem(request=request, shape=shape, profile_model="m", profiles={},
                                  kv_bytes_per_token=shape.kv_bytes_per_token)
        return problem.kv_capacity(ParallelConfig(1, 1))

    assert capacity(0) == kv_capacity_tokens(shape, 1, 1, 80 * GIB, 0.9, 16)  # unchanged default
    lost_tokens = capacity(0) - capacity(2)
    arena_tokens = 2 * GIB // shape.kv_bytes_per_token
    assert abs(lost_tokens - arena_tokens) <= 16  # 2 GiB of KV, to a block
