"""TP layout mapping: which prefill rank and heads each decode rank reads, and the slicing."""

from __future__ import annotations

import pytest
import torch

from kvtransfer.layout import (
    HEADS_AXIS_SPLIT_KV,
    HEADS_AXIS_VLLM,
    HeadRange,
    head_slice_for_decode_rank,
    kv_heads_of_rank,
    plan_head_slices,
    slice_blocks,
)

HEAD_DIM, BLOCK_SIZE = 4, 8


def _rank_cache(num_kv_heads: int, tp: int, rank: int, num_blocks: int = 5) -> torch.Tensor:
    """A rank's blocks [num_blocks, 2, local_heads, block_size, head_dim] where every value
    encodes (block, k/v, global head, token, dim), so a wrong slice cannot go unnoticed."""
    heads = kv_heads_of_rank(num_kv_heads, tp, rank)
    b, kv, h, t, d = torch.meshgrid(
        torch.arange(num_blocks), torch.arange(2),
        torch.arange(heads.start, heads.start + heads.count),
        torch.arange(BLOCK_SIZE), torch.arange(HEAD_DIM), indexing="ij")
    return (((b * 2 + kv) * 100 + h) * 100 + t) * 10 + d


def _check_every_decode_rank(num_kv_heads: int, prefill_tp: int, decode_tp: int) -> None:
    """Slicing prefill ranks' caches per the plans rebuilds each decode rank's own cache."""
    covered = []
    for p in range(prefill_tp):
        source = _rank_cache(num_kv_heads, prefill_tp, p)
        for s in plan_head_slices(num_kv_heads, HEAD_DIM, BLOCK_SIZE, prefill_tp, p, decode_tp):
            assert s.prefill_rank == p
            got = slice_blocks(source, s, heads_axis=HEADS_AXIS_SPLIT_KV)
            assert torch.equal(got, _rank_cache(num_kv_heads, decode_tp, s.decode_rank))
            assert got[0].numel() == s.num_elements_per_block
            covered.append(s.decode_rank)
    assert sorted(covered) == list(range(decode_tp))  # each decode rank served exactly once


def test_same_tp_is_identity():
    (s,) = plan_head_slices(8, HEAD_DIM, BLOCK_SIZE, prefill_tp=1, prefill_rank=0, decode_tp=1)
    assert (s.decode_rank, s.prefill_rank, s.local_head_start, s.num_heads) == (0, 0, 0, 8)
    _check_every_decode_rank(8, 1, 1)
    _check_every_decode_rank(8, 2, 2)


def test_tp1_to_tp2_splits_heads():
    slices = plan_head_slices(8, HEAD_DIM, BLOCK_SIZE, prefill_tp=1, prefill_rank=0, decode_tp=2)
    assert [(s.decode_rank, s.local_head_start, s.num_heads) for s in slices] == [(0, 0, 4), (1, 4, 4)]
    _check_every_decode_rank(8, 1, 2)


def test_tp2_to_tp4_reads_within_one_prefill_rank():
    s = head_slice_for_decode_rank(8, HEAD_DIM, BLOCK_SIZE, prefill_tp=2, decode_tp=4, decode_rank=3)
    # decode rank 3 holds global heads 6..7: the second half of prefill rank 1's heads 4..7
    assert (s.prefill_rank, s.local_head_start, s.num_heads, s.global_head_start) == (1, 2, 2, 6)
    _check_every_decode_rank(8, 2, 4)


def test_gqa_replicates_heads_when_decode_tp_exceeds_kv_heads():
    # 2 KV heads, decode TP 4: each head lives on 2 consecutive decode ranks (vLLM's rule).
    assert [kv_heads_of_rank(2, 4, r) for r in range(4)] == [
        HeadRange(0, 1), HeadRange(0, 1), HeadRange(1, 1), HeadRange(1, 1)]
    slices = plan_head_slices(2, HEAD_DIM, BLOCK_SIZE, prefill_tp=1, prefill_rank=0, decode_tp=4)
    assert [(s.local_head_start, s.num_heads) for s in slices] == [(0, 1), (0, 1), (1, 1), (1, 1)]
    _check_every_decode_rank(2, 1, 4)
    _check_every_decode_rank(2, 2, 4)
    _check_every_decode_rank(2, 2, 8)


def test_gqa_replicated_on_both_sides_spreads_reads_over_replicas():
    # 2 KV heads, prefill TP 4 (each head on 2 prefill ranks), decode TP 8.
    sources = [head_slice_for_decode_rank(2, HEAD_DIM, BLOCK_SIZE, 4, 8, j).prefill_rank
               for j in range(8)]
    assert sources == [0, 0, 1, 1, 2, 2, 3, 3]  # both replicas of each head serve
    _check_every_decode_rank(2, 4, 8)


def test_vllm_standard_view_slices_on_axis_1():
    # [num_blocks, heads, block_size, 2 * head_dim]: vLLM 0.32's CPU per-layer view
    blocks = torch.arange(3 * 4 * BLOCK_SIZE * 2 * HEAD_DIM).view(3, 4, BLOCK_SIZE, 2 * HEAD_DIM)
    s = head_slice_for_decode_rank(4, HEAD_DIM, BLOCK_SIZE, prefill_tp=1, decode_tp=2, decode_rank=1)
    got = slice_blocks(blocks, s, heads_axis=HEADS_AXIS_VLLM)
    assert torch.equal(got, blocks[:, 2:4])


@pytest.mark.parametrize("num_kv_heads, prefill_tp, decode_tp", [
    (8, 2, 1),  # decode TP below prefill TP: not a receiver-side slice
    (8, 2, 3),  # 3 does not shard 8 heads
    (8, 4, 6),  # not a multiple
    (6, 4, 4),  # 4 cannot shard 6 heads
])
def test_unsupported_tp_combinations_rejected(num_kv_heads, prefill_tp, decode_tp):
    with pytest.raises(ValueError):
        plan_head_slices(num_kv_heads, HEAD_DIM, BLOCK_SIZE, prefill_tp, 0, decode_tp)


def test_slice_checks_the_source_shape():
    s = head_slice_for_decode_rank(8, HEAD_DIM, BLOCK_SIZE, prefill_tp=2, decode_tp=4, decode_rank=0)
    with pytest.raises(ValueError, match="heads"):
        slice_blocks(_rank_cache(8, 1, 0), s, heads_axis=HEADS_AXIS_SPLIT_KV)  # 8 heads, not 4
    wrong_dim = torch.zeros(2, 2, 4, BLOCK_SIZE, HEAD_DIM * 2)
    with pytest.raises(ValueError, match="elements"):
        slice_blocks(wrong_dim, s, heads_axis=HEADS_AXIS_SPLIT_KV)
