"""Block layout mapping between a prefill and a decode that use different tensor-parallel degrees.

Under tensor parallelism (TP) each rank's paged KV cache holds only its share of the model's
KV heads. A decode running at a higher TP degree than the prefill that computed the KV
(decode TP >= prefill TP, the usual shape: prefill is compute-bound, decode wants more
memory bandwidth) therefore needs, on each of its ranks, a *head slice* of one prefill
rank's blocks. The receiver does the slicing, so a prefill rank stages its blocks unchanged.

Head assignment, as vLLM does it (``QKVParallelLinear`` / the attention layer), for
``H = num_kv_heads`` and a TP degree ``t``::

    t <= H   (H % t == 0)  rank r holds heads [r*H/t, (r+1)*H/t)            (H/t heads each)
    t >  H   (t % H == 0)  rank r holds head  r // (t/H)   (GQA: each head is replicated
                                                             on t/H consecutive ranks)

Mapping rule, for prefill TP ``p`` and decode TP ``d`` with ``d % p == 0``: decode rank
``j`` reads from prefill rank ``j // (d/p)``. That rank always holds every head ``j`` needs
(``floor(j*p/d) * H/p <= floor(j*H/d) < (floor(j*p/d) + 1) * H/p``), each prefill rank
serves exactly ``d/p`` decode ranks, and when heads are replicated on the prefill side the
reads spread over the replicas instead of piling onto the first one.

Assumed per-layer block layout: blocks at dim 0 and the KV heads on one axis of the block,
the *heads axis*, passed explicitly. Two layouts are common:

    [num_blocks, 2, num_kv_heads_local, block_size, head_dim]   K/V split; heads axis 2
                                                                (HEADS_AXIS_SPLIT_KV)
    [num_blocks, num_kv_heads_local, block_size, 2 * head_dim]  vLLM 0.32's standardized
                                                                [B, H, N, C] per-layer view
                                                                (CPU backend); heads axis 1
                                                                (HEADS_AXIS_VLLM)

Slicing one block along the heads axis keeps every other axis whole, so a decode rank's
slice has exactly its own cache's per-block shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

HEADS_AXIS_SPLIT_KV = 2  # [num_blocks, 2, num_kv_heads_local, block_size, head_dim]
HEADS_AXIS_VLLM = 1  # [num_blocks, num_kv_heads_local, block_size, 2 * head_dim]


@dataclass(frozen=True)
class HeadRange:
    """Global KV heads [start, start + count) held by one rank."""

    start: int
    count: int


@dataclass(frozen=True)
class HeadSlice:
    """What one decode rank takes from one prefill rank's blocks."""

    decode_rank: int
    prefill_rank: int
    local_head_start: int  # first head to take, indexed within the prefill rank's local heads
    num_heads: int  # heads to take (== the decode rank's local head count)
    global_head_start: int  # the same first head, as a model-wide KV head index
    num_prefill_local_heads: int  # heads per block on the prefill rank (checks the source)
    num_elements_per_block: int  # K and V elements per sliced block: 2 * heads * tokens * dim


def validate_tp(num_kv_heads: int, prefill_tp: int, decode_tp: int) -> None:
    """Raise ValueError unless vLLM can shard these heads at both TP degrees and the mapping holds."""
    if num_kv_heads <= 0 or prefill_tp <= 0 or decode_tp <= 0:
        raise ValueError("num_kv_heads and both TP degrees must be positive")
    for name, tp in (("prefill", prefill_tp), ("decode", decode_tp)):
        if num_kv_heads % tp != 0 and tp % num_kv_heads != 0:
            raise ValueError(f"{name} TP {tp} cannot shard {num_kv_heads} KV heads: one must "
                             f"divide the other")
    if decode_tp < prefill_tp:
        raise ValueError(f"decode TP {decode_tp} is below prefill TP {prefill_tp}; only head "
                         f"slicing on the receiver (decode TP >= prefill TP) is supported")
    if decode_tp % prefill_tp != 0:
        raise ValueError(f"decode TP {decode_tp} is not a multiple of prefill TP {prefill_tp}")


def kv_heads_of_rank(num_kv_heads: int, tp_size: int, rank: int) -> HeadRange:
    """The global KV heads rank `rank` of a `tp_size`-way TP group holds (vLLM's assignment)."""
    if not 0 <= rank < tp_size:
        raise ValueError(f"rank {rank} is outside TP size {tp_size}")
    if tp_size <= num_kv_heads:
        per_rank = num_kv_heads // tp_size
        return HeadRange(start=rank * per_rank, count=per_rank)
    return HeadRange(start=rank // (tp_size // num_kv_heads), count=1)  # replicated head


def head_slice_for_decode_rank(num_kv_heads: int, head_dim: int, block_size: int,
                               prefill_tp: int, decode_tp: int, decode_rank: int) -> HeadSlice:
    """Which prefill rank, and which of its local heads, decode rank `decode_rank` needs."""
    validate_tp(num_kv_heads, prefill_tp, decode_tp)
    if head_dim <= 0 or block_size <= 0:
        raise ValueError("head_dim and block_size must be positive")
    prefill_rank = decode_rank // (decode_tp // prefill_tp)
    wanted = kv_heads_of_rank(num_kv_heads, decode_tp, decode_rank)
    held = kv_heads_of_rank(num_kv_heads, prefill_tp, prefill_rank)
    # Invariant from the mapping rule (module docstring): the source rank holds them all.
    assert held.start <= wanted.start and wanted.start + wanted.count <= held.start + held.count
    return HeadSlice(
        decode_rank=decode_rank,
        prefill_rank=prefill_rank,
        local_head_start=wanted.start - held.start,
        num_heads=wanted.count,
        global_head_start=wanted.start,
        num_prefill_local_heads=held.count,
        num_elements_per_block=2 * wanted.count * block_size * head_dim,
    )


def plan_head_slices(num_kv_heads: int, head_dim: int, block_size: int, prefill_tp: int,
                     prefill_rank: int, decode_tp: int) -> tuple[HeadSlice, ...]:
    """The decode ranks that read prefill rank `prefill_rank`'s blocks, and each one's slice.

    Every decode rank appears in exactly one prefill rank's plan; the plans of all prefill
    ranks together cover decode ranks 0 .. decode_tp - 1.
    """
    validate_tp(num_kv_heads, prefill_tp, decode_tp)
    if not 0 <= prefill_rank < prefill_tp:
        raise ValueError(f"prefill rank {prefill_rank} is outside prefill TP {prefill_tp}")
    fan_out = decode_tp // prefill_tp
    return tuple(
        head_slice_for_decode_rank(num_kv_heads, head_dim, block_size, prefill_tp, decode_tp, j)
        for j in range(prefill_rank * fan_out, (prefill_rank + 1) * fan_out)
    )


def slice_blocks(blocks: torch.Tensor, head_slice: HeadSlice, *, heads_axis: int) -> torch.Tensor:
    """The decode rank's share of a prefill rank's blocks: a view narrowed on the heads axis.

    blocks: [num_blocks, ...] with `head_slice.num_prefill_local_heads` on `heads_axis`,
    e.g. [num_blocks, 2, num_kv_heads_local, block_size, head_dim] with heads_axis=2.
    Returns the same shape with `head_slice.num_heads` heads on that axis (a view; call
    `.contiguous()` before handing it to a transport or `index_copy_`).
    """
    if not 0 < heads_axis < blocks.dim():
        raise ValueError(f"heads axis {heads_axis} must be a block axis of a {blocks.dim()}-d tensor")
    if blocks.shape[heads_axis] != head_slice.num_prefill_local_heads:
        raise ValueError(f"blocks hold {blocks.shape[heads_axis]} heads on axis {heads_axis}, "
                         f"prefill rank {head_slice.prefill_rank} holds "
                         f"{head_slice.num_prefill_local_heads}")
    per_block = blocks[0].numel() // head_slice.num_prefill_local_heads * head_slice.num_heads
    if per_block != head_slice.num_elements_per_block:
        raise ValueError(f"a sliced block has {per_block} elements, the plan expects "
                         f"{head_slice.num_elements_per_block} (head_dim or block_size differ)")
    return blocks.narrow(heads_axis, head_slice.local_head_start, head_slice.num_heads)
