"""Copy kernels between an engine's paged KV cache and contiguous staged blocks.

A layer's paged cache is a tensor with blocks at dim 0 (vLLM's per-layer view; its inner
axes may be permuted in memory, as on CUDA, see `harness.py`). Staged blocks are always
that layer's blocks in *logical* row-major order: ``[n, *kv.shape[1:]]`` contiguous, so a
segment or a device arena slab means the same thing whatever the memory layout of the
cache it came from, and a receiver can slice heads out of it (`scatter_head_slice`).

    gather_blocks(kv, ids, out)           out[i] = kv[ids[i]]        (prefill: stage)
    scatter_blocks(src, kv, ids)          kv[ids[i]] = src[i]        (decode: load)
    scatter_head_slice(src, kv, ids, s)   kv[ids[i]] = src[i] narrowed to s's heads

All three run on the tensors' device and on the current stream; callers that overlap a
copy with compute pick the stream (see `device_staging.py`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from kvtransfer.layout import HeadSlice, slice_blocks


def bytes_per_block(kv: torch.Tensor) -> int:
    return kv[0].numel() * kv.element_size()


def byte_rows(kv: torch.Tensor) -> np.ndarray | None:
    """A CPU layer's blocks as a numpy [num_blocks, bytes_per_block] view of the same
    memory (numpy's fancy-index assignment copies at memcpy speed; torch's index_copy_
    runs at a fraction of it on CPU), or None when the blocks are not byte-viewable rows
    in logical order (any other layout takes torch's copy, with the same result)."""
    if kv.device.type != "cpu" or kv.dim() < 2 or not kv[0].is_contiguous() or kv.stride(-1) != 1:
        return None
    try:
        return kv.view(torch.uint8).view(kv.shape[0], -1).numpy()
    except RuntimeError:
        return None


def _index(block_ids: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(list(block_ids), dtype=torch.long, device=device)


def gather_blocks(kv: torch.Tensor, block_ids: Sequence[int], out: torch.Tensor) -> None:
    """Copy blocks `block_ids` of `kv` into `out`.

    kv: [num_blocks, *block_shape] paged (any strides); out: [len(block_ids), *block_shape]
    contiguous, on kv's device (a device arena slab) or, for a CUDA cache, on the host
    (a segment: gathered on the device first, then one device-to-host copy).
    """
    idx = _index(block_ids, kv.device)
    if out.device == kv.device:
        torch.index_select(kv, 0, idx, out=out)  # straight into the staging memory
    else:
        out.copy_(kv.index_select(0, idx), non_blocking=False)


def scatter_blocks(src: torch.Tensor, kv: torch.Tensor, dst_block_ids: Sequence[int],
                   rows: np.ndarray | None = None) -> None:
    """Copy `src` [n, *block_shape] into blocks `dst_block_ids` of `kv`.

    `rows` (from `byte_rows(kv)`) takes the numpy path on a CPU cache; otherwise torch's
    `index_copy_`, which handles any strides and a source on another device.
    """
    if rows is not None and src.device.type == "cpu":
        rows[np.asarray(dst_block_ids, dtype=np.intp)] = (
            src.contiguous().view(torch.uint8).view(len(dst_block_ids), -1).numpy())
        return
    kv.index_copy_(0, _index(dst_block_ids, kv.device), src.to(kv.device, non_blocking=True))


def scatter_head_slice(src: torch.Tensor, kv: torch.Tensor, dst_block_ids: Sequence[int],
                       head_slice: HeadSlice, heads_axis: int) -> None:
    """Decode TP > prefill TP: copy this decode rank's heads of a prefill rank's staged
    blocks `src` [n, *prefill_block_shape] into blocks `dst_block_ids` of `kv`
    [num_blocks, *decode_block_shape] (`layout.plan_head_slices` gives `head_slice`)."""
    part = slice_blocks(src, head_slice, heads_axis=heads_axis)
    if tuple(part.shape[1:]) != tuple(kv.shape[1:]):
        raise ValueError(f"a sliced block is {tuple(part.shape[1:])}, this cache's blocks are "
                         f"{tuple(kv.shape[1:])}")
    kv.index_copy_(0, _index(dst_block_ids, kv.device), part.to(kv.device, non_blocking=True))


def blocks_view(buf: torch.Tensor | memoryview, like: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """Contiguous staging bytes as `num_blocks` logical blocks shaped like `like`'s."""
    flat = torch.frombuffer(buf, dtype=torch.uint8) if isinstance(buf, memoryview) else buf
    return flat.view(like.dtype).view(num_blocks, *like.shape[1:])
