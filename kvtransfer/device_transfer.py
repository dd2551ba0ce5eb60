"""Moving a device arena slab to a decode: CUDA IPC within a node, `dist` (NCCL, or gloo on CPU) across.

Pull from the producer's arena (docs/kvtransfer.md, "GPU data path: push or pull"):

    prefill                                            decode
    stage layer by layer into a slab (device_staging)
    describe(slab) ──SlabDescriptor (msgpack)───────▶  reserve its own blocks
      cuda_ipc: lend_over_ipc  (slab LENT, IPC event) ▶ load_from_ipc: map the arena, scatter
                                                        its heads straight into its blocks,
                                                        synchronize, unmap
      dist:     send_over_dist (slab LENT, send)  ───▶ load_from_dist: receive on its device,
                                                        scatter its heads into its blocks
    arena.ack(epoch, sequence) ◀──ack─────────────────  (the slab is the prefill's again)

The receiver slices heads (`layout.plan_head_slices`), so one prefill-rank slab serves every
decode rank of a higher TP degree that maps to it, and the prefill never learns the decode's
TP. `scatter_slab` is the one scatter used by both transports (and by the CPU harness).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
import torch

from kvtransfer.block_copy import scatter_blocks, scatter_head_slice
from kvtransfer.device_staging import ArenaSlab, DeviceArena, LayerRegion, region_view, slab_layout
from kvtransfer.layout import HeadSlice

_DTYPES = {str(d).removeprefix("torch."): d for d in
           (torch.float16, torch.bfloat16, torch.float32, torch.uint8, torch.int8,
            torch.float8_e4m3fn, torch.float8_e5m2)}


class LayerEntry(msgspec.Struct, frozen=True):
    name: str
    offset: int
    block_shape: tuple[int, ...]
    dtype: str


class SlabDescriptor(msgspec.Struct, frozen=True):
    """What a decode needs to read a slab: its layers' regions, and how to reach it."""

    request_id: str
    epoch: str  # the producer arena's; an ack must name it
    sequence: int
    nbytes: int
    num_blocks: int
    layers: tuple[LayerEntry, ...]
    ipc: Any = None  # a cuda_ipc.CudaIpcDescriptor (as a dict once decoded) when lent over CUDA IPC

    def regions(self) -> dict[str, LayerRegion]:
        return {e.name: LayerRegion(e.offset, tuple(e.block_shape), _DTYPES[e.dtype],
                                    self.num_blocks) for e in self.layers}


def describe(slab: ArenaSlab, caches: Mapping[str, torch.Tensor], num_blocks: int,
             ipc: object | None = None) -> SlabDescriptor:
    regions = slab_layout(caches, num_blocks)
    return SlabDescriptor(
        request_id=slab.request_id, epoch=slab.epoch, sequence=slab.sequence,
        nbytes=slab.view.numel(), num_blocks=num_blocks, ipc=ipc,
        layers=tuple(LayerEntry(name, r.offset, r.block_shape, str(r.dtype).removeprefix("torch."))
                     for name, r in regions.items()))


def scatter_slab(buf: torch.Tensor, desc: SlabDescriptor, caches: Mapping[str, torch.Tensor],
                 dst_block_ids: Sequence[int], head_slice: HeadSlice | None = None,
                 heads_axis: int = 1, first_block: int = 0) -> None:
    """Copy a slab's blocks (`buf`: the slab's bytes, mapped or received) into blocks
    `dst_block_ids` of every layer of `caches`; with `head_slice`, only this decode rank's
    heads (decode TP > prefill TP). Slab blocks from `first_block` on are copied (a decode
    whose own prefix cache held the first ones loads the rest)."""
    if first_block < 0 or first_block + len(dst_block_ids) > desc.num_blocks:
        raise ValueError(f"{len(dst_block_ids)} destination blocks from block {first_block} "
                         f"for a slab of {desc.num_blocks}")
    if set(caches) != {e.name for e in desc.layers}:
        raise ValueError("the slab's layers are not this engine's")
    end = first_block + len(dst_block_ids)
    for name, region in desc.regions().items():
        src = region_view(buf, region)[first_block:end]  # [n, *prefill block shape]
        kv = caches[name]
        if head_slice is None:
            scatter_blocks(src, kv, dst_block_ids)
        else:
            scatter_head_slice(src, kv, dst_block_ids, head_slice, heads_axis)


# ------------------------------------------------------------------------------ CUDA IPC
def lend_over_ipc(arena: DeviceArena, slab: ArenaSlab, caches: Mapping[str, torch.Tensor],
                  num_blocks: int, stream: object | None = None) -> SlabDescriptor:
    """Export the slab for one decode on this host; it stays LENT until `arena.ack`."""
    from kvtransfer.cuda_ipc import export_tensor

    ipc = export_tensor(slab.view, stream)  # the IPC event covers the staging stream's writes
    arena.lend(slab)  # one more borrower: freed after as many acks
    return describe(slab, caches, num_blocks, ipc=ipc)


def load_from_ipc(desc: SlabDescriptor, caches: Mapping[str, torch.Tensor],
                  dst_block_ids: Sequence[int], head_slice: HeadSlice | None = None,
                  heads_axis: int = 1, first_block: int = 0) -> None:
    """Map the producer's slab and scatter from it in place (no intermediate copy);
    returns once the copies are done and the mapping released: then ack."""
    from kvtransfer.cuda_ipc import CudaIpcDescriptor, open_lent

    ipc = msgspec.convert(desc.ipc, CudaIpcDescriptor) if not isinstance(
        desc.ipc, CudaIpcDescriptor) else desc.ipc
    with open_lent(ipc) as shared:
        scatter_slab(shared, desc, caches, dst_block_ids, head_slice, heads_axis, first_block)


# ------------------------------------------------------------------------------ dist
def send_over_dist(dist: Any, arena: DeviceArena, slab: ArenaSlab,
                   peers: Sequence[tuple[str, str]]) -> None:
    """Send the slab to each (peer id, transfer id) in turn over its pair group (NCCL:
    device to device; gloo: CPU tensors). The slab is lent to every peer before the first
    send, so it stays LENT until the last one's send has completed (a completed send is the
    ack: the peer's copy is in its own memory), and only then is the arena's again."""
    if slab.done_event is not None:
        torch.cuda.current_stream(arena.device).wait_event(slab.done_event)
    for _ in peers:
        arena.lend(slab)
    pending = len(peers)
    try:
        for peer_id, transfer_id in peers:
            dist.send(peer_id, transfer_id, slab.view)
            pending -= 1
            arena.ack(slab.epoch, slab.sequence)
    finally:
        for _ in range(pending):  # a failed send: nothing of ours is in flight any more
            arena.ack(slab.epoch, slab.sequence)


def load_from_dist(dist: Any, peer_id: str, transfer_id: str, desc: SlabDescriptor,
                   caches: Mapping[str, torch.Tensor], dst_block_ids: Sequence[int],
                   head_slice: HeadSlice | None = None, heads_axis: int = 1,
                   first_block: int = 0) -> None:
    """Receive a slab on the caches' device and scatter it into `dst_block_ids`."""
    device = next(iter(caches.values())).device
    buf = dist.recv(peer_id, transfer_id, device=device)
    if buf.numel() != desc.nbytes:
        raise ValueError(f"received {buf.numel()} bytes, the slab has {desc.nbytes}")
    scatter_slab(buf, desc, caches, dst_block_ids, head_slice, heads_axis, first_block)
