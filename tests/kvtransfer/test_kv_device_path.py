"""The device data path on the CPU (same code as on a GPU, host tensors and gloo): the bounded
arena and its ownership rules, layer-wise staging, head-sliced scatter into vLLM's CUDA cache
layout, and the vLLM-free harness end to end. GPU cases carry the `gpu` marker."""

from __future__ import annotations

import pytest
import torch

from kvtransfer.device_staging import DeviceArena, LayerwiseStager, SlabState, StaleAck
from kvtransfer.device_transfer import describe, scatter_slab
from kvtransfer.harness import (
    Case,
    ModelShape,
    global_kv,
    request_blocks,
    run_case,
    vllm_cuda_kv_caches,
)
from kvtransfer.layout import HEADS_AXIS_VLLM, kv_heads_of_rank, plan_head_slices
from kvtransfer.lifecycle import IllegalTransition

SHAPE = ModelShape(num_layers=2, num_kv_heads=4, head_size=8, block_size=16, num_blocks=10,
                   num_request_blocks=4)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# -- the arena ---------------------------------------------------------------------------------
def test_arena_is_bounded_and_coalesces_what_it_frees():
    arena = DeviceArena(4096, device="cpu")
    a, b = arena.allocate("a", 1000), arena.allocate("b", 2000)
    assert a is not None and b is not None and arena.used_bytes == 1024 + 2048
    assert arena.allocate("c", 2000) is None and arena.num_refused == 1  # host path for "c"
    for slab in (a, b):
        arena.free(slab)  # WRITING -> FREE (aborted before staging finished)
    assert arena.used_bytes == 0 and arena.num_slabs() == 0
    whole = arena.allocate("d", 4096)  # the freed neighbours merged back into one range
    assert whole is not None and whole.offset == 0
    assert arena.high_water_bytes == 4096


def test_a_lent_slab_is_freed_only_by_the_ack_of_every_borrower():
    arena = DeviceArena(1 << 16, device="cpu")
    slab = arena.allocate("r", 512)
    arena.mark_ready(slab)
    arena.lend(slab)
    arena.lend(slab)  # two decode ranks read it (decode TP = 2 x prefill TP)
    with pytest.raises(IllegalTransition, match="LENT slab is freed only by its ack"):
        arena.free(slab)
    with pytest.raises(StaleAck):
        arena.ack("another-epoch", slab.sequence)
    assert arena.reclaim_expired(now=float("inf")) == []  # the lease never frees a lent slab
    arena.ack(slab.epoch, slab.sequence)
    assert slab.state is SlabState.LENT and arena.used_bytes == 512
    arena.ack(slab.epoch, slab.sequence)
    assert slab.state is SlabState.FREE and arena.used_bytes == 0
    with pytest.raises(StaleAck):
        arena.ack(slab.epoch, slab.sequence)  # a duplicate ack names no slab any more


def test_unclaimed_ready_slabs_expire():
    arena = DeviceArena(1 << 16, device="cpu", lease_s=5)
    slab = arena.allocate("r", 100)
    arena.mark_ready(slab)
    assert arena.reclaim_expired() == []
    assert arena.reclaim_expired(now=slab.created_s + 6) == ["r"] and arena.used_bytes == 0


# -- staging and scatter, in one process -------------------------------------------------------
def test_the_cache_layout_is_vllm_0_32_cuda_flash_attention():
    vllm_utils = pytest.importorskip("vllm.v1.attention.backends.utils")
    from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend
    from vllm.v1.kv_cache_layout import KVCacheLayout

    # FlashAttention declares no layout, so the default preference decides: LBNHC first.
    assert FlashAttentionBackend.supported_kv_cache_layouts() is None
    assert vllm_utils._DEFAULT_LAYOUT_PREFERENCE[0] is KVCacheLayout.LBNHC
    kv = next(iter(vllm_cuda_kv_caches(SHAPE, 4, "cpu").values()))
    n, h, c = SHAPE.block_size, 4, 2 * SHAPE.head_size
    assert kv.shape == (SHAPE.num_blocks, h, n, c)  # logical [B, H, N, 2D]
    assert kv.stride() == (n * h * c, c, h * c, 1)  # physical [B, N, H, 2D] inside each layer
    assert KVCacheLayout.LBNHC.layer_view_order == (0, 2, 1, 3)


def _stage(prefill_tp: int, rank: int, seed: int = 3):
    heads = kv_heads_of_rank(SHAPE.num_kv_heads, prefill_tp, rank)
    caches = vllm_cuda_kv_caches(SHAPE, heads.count, "cpu")
    for kv, full in zip(caches.values(), global_kv(SHAPE, seed)):
        kv.copy_(full[:, heads.start : heads.start + heads.count])
    src_ids = request_blocks(SHAPE, seed + 1)
    arena = DeviceArena(1 << 20, device="cpu")
    stager = LayerwiseStager(arena, caches)
    slab = stager.begin("r", src_ids)
    for name, kv in caches.items():
        stager.save_layer(slab, name, kv)
    stager.finish(slab)
    return arena, slab, caches, src_ids


@pytest.mark.parametrize(("prefill_tp", "decode_tp"), [(1, 1), (1, 2), (2, 4), (1, 8)])
def test_staged_slab_scatters_block_exact_into_every_decode_rank(prefill_tp, decode_tp):
    seed = 3
    full = global_kv(SHAPE, seed)
    for p in range(prefill_tp):
        arena, slab, caches, src_ids = _stage(prefill_tp, p, seed)
        desc = describe(slab, caches, len(src_ids))
        for s in plan_head_slices(SHAPE.num_kv_heads, SHAPE.head_size, SHAPE.block_size,
                                  prefill_tp, p, decode_tp):
            heads = kv_heads_of_rank(SHAPE.num_kv_heads, decode_tp, s.decode_rank)
            dst = vllm_cuda_kv_caches(SHAPE, heads.count, "cpu")
            dst_ids = request_blocks(SHAPE, seed + 2)
            scatter_slab(slab.view, desc, dst, dst_ids,
                         s if decode_tp > prefill_tp else None, HEADS_AXIS_VLLM)
            for kv, layer in zip(dst.values(), full):
                for d, src in zip(dst_ids, src_ids):
                    assert torch.equal(kv[d], layer[src, heads.start : heads.start + heads.count])
                others = [b for b in range(SHAPE.num_blocks) if b not in dst_ids]
                assert not kv[others].any()


def test_the_comparison_catches_a_wrong_head_slice():
    """The harness's check is not vacuous: decode rank 1's heads in rank 0's cache differ."""
    arena, slab, caches, src_ids = _stage(1, 0)
    desc = describe(slab, caches, len(src_ids))
    wrong = plan_head_slices(SHAPE.num_kv_heads, SHAPE.head_size, SHAPE.block_size, 1, 0, 2)[1]
    dst = vllm_cuda_kv_caches(SHAPE, 2, "cpu")
    dst_ids = request_blocks(SHAPE, 5)
    scatter_slab(slab.view, desc, dst, dst_ids, wrong, HEADS_AXIS_VLLM)
    full = global_kv(SHAPE, 3)
    kv = next(iter(dst.values()))
    assert not torch.equal(kv[dst_ids[0]], full[0][src_ids[0], 0:2])


# -- the harness, in processes ----------------------------------------------------------------
@pytest.mark.parametrize(("prefill_tp", "decode_tp"), [(1, 1), (1, 2)])
def test_harness_over_gloo_with_host_tensors(prefill_tp, decode_tp):
    result = run_case(Case(prefill_tp, decode_tp, "dist", "gloo"), SHAPE, device="cpu",
                      timeout_s=240)
    errors = [r.get("error") for r in result["ranks"] if not r.get("ok")]
    assert result["block_exact"], errors
    assert result["num_blocks_checked"] == decode_tp * SHAPE.num_layers * SHAPE.num_request_blocks
    prefills = [r for r in result["ranks"] if r["role"] == "prefill"]
    assert all(r["arena_used_after"] == 0 and r["slab_state"] == "FREE" for r in prefills)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(("prefill_tp", "decode_tp"), [(1, 1), (1, 2), (2, 4)])
def test_harness_over_cuda_ipc(prefill_tp, decode_tp):
    result = run_case(Case(prefill_tp, decode_tp, "cuda_ipc"), SHAPE, device="cuda",
                      timeout_s=240)
    assert result["block_exact"], [r.get("error") for r in result["ranks"] if not r.get("ok")]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs two GPUs (one rank each)")
def test_harness_over_nccl():
    result = run_case(Case(1, 1, "dist", "nccl"), SHAPE, device="cuda", timeout_s=240)
    assert result["block_exact"], [r.get("error") for r in result["ranks"] if not r.get("ok")]


@pytest.mark.gpu
@needs_cuda
def test_layerwise_staging_on_cuda_runs_on_its_own_stream():
    caches = vllm_cuda_kv_caches(SHAPE, 4, "cuda")
    for kv in caches.values():
        kv.normal_()
    arena = DeviceArena(1 << 20, device="cuda")
    stager = LayerwiseStager(arena, caches)
    assert stager.stream != torch.cuda.current_stream()
    ids = request_blocks(SHAPE, 1)
    slab = stager.begin("r", ids)
    for name, kv in caches.items():
        stager.save_layer(slab, name, kv)
    stager.finish(slab)
    slab.done_event.synchronize()
    desc = describe(slab, caches, len(ids))
    dst = vllm_cuda_kv_caches(SHAPE, 4, "cuda")
    scatter_slab(slab.view, desc, dst, list(range(len(ids))))
    for name in caches:
        assert torch.equal(dst[name][: len(ids)], caches[name][ids])


# -- memory accounting ---------------------------------------------------------------------
def test_engine_share_plus_arena_fit_the_configured_utilization():
    from kvtransfer.memory import GIB, engine_memory_utilization, kv_capacity_bytes

    total = 80 * GIB
    util = engine_memory_utilization(0.9, 4 * GIB, total)
    assert util * total + 4 * GIB == pytest.approx(0.9 * total)
    assert kv_capacity_bytes(40 * GIB, 4 * GIB) == 36 * GIB
    with pytest.raises(ValueError, match="takes the whole"):
        engine_memory_utilization(0.05, 8 * GIB, total)
