"""Device-resident staging: gather each layer's blocks on the GPU, on a side stream, into a bounded arena.

The GPU data path (docs/kvtransfer.md, "GPU data path"). A CUDA prefill stages a request's
prompt KV without touching host memory:

    compute stream   layer 0 ──event e0──▶ layer 1 ──event e1──▶ ... layer L-1 ──e(L-1)
    staging stream          wait e0, gather 0     wait e1, gather 1 ...   gather L-1, done event
                            (into the request's arena slab)

`LayerwiseStager.save_layer` records an event on the current (compute) stream right after
a layer's attention wrote its KV, makes the staging stream wait for it, and gathers that
layer's blocks there (`block_copy.gather_blocks`), so the copy of layer i overlaps the
compute of layer i+1 and never reads a block before its write. `finish` records the done
event that a transport waits on (CUDA IPC: the consumer's stream waits on it through the
IPC event; NCCL: the send is issued on the staging stream after it).

The arena is one allocation of `device_staging_gib`, made once, carved into slabs by a
first-fit free list; it is never grown. A request that does not fit gets no slab and takes
the host path (`allocate` returns None); memory accounting (`used_bytes`, `high_water`)
is exact and is what the planner subtracts from the KV capacity (`memory.py`).

Ownership of a slab (`SLAB_TRANSITIONS`), as explicit as the host protocol:

    WRITING ──finish──▶ READY ──lend (IPC export / NCCL send issued)──▶ LENT
       │                 │                                              │ ack from the decode
       └──abort──▶ FREE ◀┴──lease expired / released──────────── FREE ◀─┘ (epoch must match)

A slab is freed only from WRITING, READY or after the ack of a LENT slab; `free` on a LENT
slab without the ack is rejected, so memory a peer may still be reading is never reused.
Each slab carries the arena's epoch and its own sequence number; an ack for another
(epoch, sequence) is refused (`StaleAck`), as a restarted producer's handles are.

Runs on CPU tensors as well (streams and events are then no-ops and copies synchronous),
which is how the CPU harness and CI drive the very same code.
"""

from __future__ import annotations

import enum
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from kvtransfer.block_copy import gather_blocks
from kvtransfer.lifecycle import IllegalTransition, Lifecycle


class SlabState(enum.Enum):
    WRITING = "writing"
    READY = "ready"
    LENT = "lent"
    FREE = "free"


SLAB_TRANSITIONS: Mapping[SlabState, frozenset[SlabState]] = {
    SlabState.WRITING: frozenset({SlabState.READY, SlabState.FREE}),
    SlabState.READY: frozenset({SlabState.LENT, SlabState.FREE}),
    SlabState.LENT: frozenset({SlabState.FREE}),  # only through `ack`
    SlabState.FREE: frozenset(),
}

_ALIGN = 256  # bytes: every slab starts on a 256-byte boundary (CUDA's allocation granularity)


class StaleAck(RuntimeError):
    """An ack names a slab of another epoch or an already-reused sequence number."""


@dataclass
class ArenaSlab:
    request_id: str
    offset: int
    nbytes: int
    epoch: str
    sequence: int
    created_s: float
    view: torch.Tensor  # [nbytes] uint8 on the arena's device
    lifecycle: Lifecycle[SlabState] = field(init=False)
    done_event: object | None = None  # torch.cuda.Event once finished, on CUDA
    num_borrowers: int = 0  # peers lent the slab and not yet acked

    def __post_init__(self) -> None:
        self.lifecycle = Lifecycle(SLAB_TRANSITIONS, SlabState.WRITING, self.request_id)

    @property
    def state(self) -> SlabState:
        return self.lifecycle.state


class DeviceArena:
    """A bounded staging arena of `capacity_bytes` on `device`, allocated once."""

    def __init__(self, capacity_bytes: int, device: torch.device | str = "cuda",
                 lease_s: float = 120.0):
        if capacity_bytes <= 0:
            raise ValueError("a device staging arena needs capacity_bytes > 0")
        self.device = torch.device(device)
        self.capacity_bytes = capacity_bytes
        self.lease_s = lease_s
        self.epoch = uuid.uuid4().hex[:12]
        self._buffer = torch.empty(capacity_bytes, dtype=torch.uint8, device=self.device)
        self._free: list[tuple[int, int]] = [(0, capacity_bytes)]  # (offset, nbytes), sorted
        self._slabs: dict[int, ArenaSlab] = {}  # by sequence number
        self._next_sequence = 0
        self._lock = threading.Lock()
        self.used_bytes = 0
        self.high_water_bytes = 0
        self.num_refused = 0  # allocations that did not fit (those requests took the host path)

    # -- allocation ---------------------------------------------------------------------
    def allocate(self, request_id: str, nbytes: int) -> ArenaSlab | None:
        """A WRITING slab of at least `nbytes`, or None when the arena cannot hold it now."""
        size = -(-nbytes // _ALIGN) * _ALIGN
        with self._lock:
            for i, (offset, free) in enumerate(self._free):
                if free >= size:
                    if free == size:
                        del self._free[i]
                    else:
                        self._free[i] = (offset + size, free - size)
                    break
            else:
                self.num_refused += 1
                return None
            seq = self._next_sequence
            self._next_sequence += 1
            slab = ArenaSlab(request_id, offset, size, self.epoch, seq, time.monotonic(),
                             self._buffer[offset : offset + nbytes])
            self._slabs[seq] = slab
            self.used_bytes += size
            self.high_water_bytes = max(self.high_water_bytes, self.used_bytes)
            return slab

    def mark_ready(self, slab: ArenaSlab) -> None:
        with self._lock:
            slab.lifecycle.move_to(SlabState.READY)

    def lend(self, slab: ArenaSlab) -> None:
        """A transport is about to hand the slab to one more peer (IPC export, NCCL send);
        a slab serving several decode ranks (decode TP > prefill TP) is lent once per rank."""
        with self._lock:
            if slab.state is not SlabState.LENT:
                slab.lifecycle.move_to(SlabState.LENT)
            slab.num_borrowers += 1

    def ack(self, epoch: str, sequence: int) -> None:
        """The decode holds its copy: the lent slab is the arena's again."""
        with self._lock:
            slab = self._slabs.get(sequence)
            if epoch != self.epoch or slab is None:
                raise StaleAck(f"ack for slab {sequence} of epoch {epoch}: not this arena's "
                               f"(epoch {self.epoch}) or already freed")
            if slab.state is not SlabState.LENT:
                raise IllegalTransition(f"{slab.request_id}: ack of a slab that is {slab.state.name}")
            slab.num_borrowers -= 1
            if slab.num_borrowers == 0:  # the last peer holds its copy
                self._release(slab)

    def free(self, slab: ArenaSlab) -> None:
        """Give back a slab that is not lent (aborted, released, or its lease ran out)."""
        with self._lock:
            if slab.state is SlabState.LENT:
                raise IllegalTransition(f"{slab.request_id}: a LENT slab is freed only by its "
                                        f"ack (a peer may still be reading it)")
            self._release(slab)

    def reclaim_expired(self, now: float | None = None) -> list[str]:
        """Free READY slabs older than the lease (nobody claimed them); request ids freed.
        LENT slabs are not touched: their peer's ack (or its timeout) decides."""
        now = time.monotonic() if now is None else now
        with self._lock:
            expired = [s for s in self._slabs.values()
                       if s.state is SlabState.READY and now - s.created_s > self.lease_s]
            for slab in expired:
                self._release(slab)
        return [s.request_id for s in expired]

    def _release(self, slab: ArenaSlab) -> None:
        slab.lifecycle.move_to(SlabState.FREE)
        del self._slabs[slab.sequence]
        self.used_bytes -= slab.nbytes
        self._free.append((slab.offset, slab.nbytes))
        self._free.sort()
        merged: list[tuple[int, int]] = []
        for offset, nbytes in self._free:  # coalesce neighbours
            if merged and merged[-1][0] + merged[-1][1] == offset:
                merged[-1] = (merged[-1][0], merged[-1][1] + nbytes)
            else:
                merged.append((offset, nbytes))
        self._free = merged

    def num_slabs(self) -> int:
        with self._lock:
            return len(self._slabs)


@dataclass(frozen=True)
class LayerRegion:
    """Where one layer's staged blocks sit in a slab: [num_blocks, *block_shape] of dtype."""

    offset: int
    block_shape: tuple[int, ...]
    dtype: torch.dtype
    num_blocks: int

    @property
    def nbytes(self) -> int:
        n = self.num_blocks * torch.tensor([], dtype=self.dtype).element_size()
        for d in self.block_shape:
            n *= d
        return n


def slab_layout(caches: Mapping[str, torch.Tensor], num_blocks: int) -> dict[str, LayerRegion]:
    """Each layer's region in a slab holding `num_blocks` blocks of every layer."""
    regions: dict[str, LayerRegion] = {}
    offset = 0
    for name, kv in caches.items():
        region = LayerRegion(offset, tuple(kv.shape[1:]), kv.dtype, num_blocks)
        regions[name] = region
        offset += -(-region.nbytes // _ALIGN) * _ALIGN
    return regions


def slab_nbytes(caches: Mapping[str, torch.Tensor], num_blocks: int) -> int:
    regions = slab_layout(caches, num_blocks)
    last = list(regions.values())[-1]
    return last.offset + last.nbytes


def region_view(buf: torch.Tensor, region: LayerRegion) -> torch.Tensor:
    """A slab's (or a received copy's) layer region as [num_blocks, *block_shape] blocks."""
    raw = buf[region.offset : region.offset + region.nbytes]
    return raw.view(region.dtype).view(region.num_blocks, *region.block_shape)


class LayerwiseStager:
    """Stages one request's blocks layer by layer into an arena slab, on a side stream."""

    def __init__(self, arena: DeviceArena, caches: Mapping[str, torch.Tensor],
                 stream: object | None = None):
        self.arena = arena
        self.caches = dict(caches)
        self._is_cuda = arena.device.type == "cuda"
        self.stream = (stream or torch.cuda.Stream(device=arena.device)) if self._is_cuda else None

    def begin(self, request_id: str, block_ids: Sequence[int]) -> ArenaSlab | None:
        """A slab for the request's blocks, or None (arena full: take the host path)."""
        self._block_ids = tuple(block_ids)
        self._regions = slab_layout(self.caches, len(block_ids))
        return self.arena.allocate(request_id, slab_nbytes(self.caches, len(block_ids)))

    def save_layer(self, slab: ArenaSlab, layer_name: str, kv_layer: torch.Tensor) -> None:
        """Gather this layer's blocks into the slab once the compute stream wrote them."""
        self.save_blocks(slab, self._regions[layer_name], kv_layer, self._block_ids, 0)

    def save_blocks(self, slab: ArenaSlab, region: LayerRegion, kv_layer: torch.Tensor,
                    block_ids: Sequence[int], first_block: int) -> None:
        """Gather `block_ids` of one layer into slab blocks [first_block, first_block + n) of
        its `region` once the compute stream wrote them (a chunked prefill stages each
        chunk's new blocks as it computes them; the connector's path)."""
        # out: [n, *block_shape], a contiguous run of the slab's layer region
        out = region_view(slab.view, region)[first_block : first_block + len(block_ids)]
        if self.stream is None:
            gather_blocks(kv_layer, block_ids, out)
            return
        written = torch.cuda.Event()
        written.record(torch.cuda.current_stream(kv_layer.device))  # after this layer's compute
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(written)
            gather_blocks(kv_layer, block_ids, out)
        # The cache tensor is used on the staging stream: keep the allocator from reusing it
        # early (it is the engine's long-lived KV cache, so this only documents the rule).
        kv_layer.record_stream(self.stream)

    def finish(self, slab: ArenaSlab) -> ArenaSlab:
        """Record the done event (transports wait on it) and mark the slab READY."""
        if self.stream is not None:
            done = torch.cuda.Event(interprocess=True)
            done.record(self.stream)
            slab.done_event = done
        self.arena.mark_ready(slab)
        return slab
