"""The connector's worker half: stage a prefill's blocks into segments, load segments into a decode.

Producer: ``save_kv_layer`` gathers each layer's new blocks into the request's segment as
soon as that layer is computed (``layerwise``; otherwise ``wait_for_save`` gathers every
layer after the forward); ``wait_for_save`` marks the segment complete after the step
that computed the last prompt token, after writing block checksums into its trailer when
``checksums`` is set. Each segment being written is a `SegmentWrite` whose lifecycle
(WRITING -> COMPLETE | DISCARDED) is checked.

Consumer: ``start_load_kv`` copies each planned segment into the request's freshly
allocated blocks before the forward (synchronous load), verifying block checksums first
when the segment carries them, then recycles the segment file: the consumer owns it from
the moment it opens it. A failed load reports the blocks through
``get_block_ids_with_load_errors``; output is never computed on partial KV.

The device path (`device_path.staging_medium` says "device": a CUDA engine whose decodes
reach it over a device transport, or `device_path: force`): the producer stages into a
slab of its device arena instead (`device_connector.DeviceProducer`; a request that does
not fit takes the host path above), the consumer loads a handle's slab over CUDA IPC or
dist (`device_consumer.DeviceConsumer`) and acks it.

Every save and load is recorded as a `TransferStat` dict (request id, the staging medium
the copy went through: "shm" for host staging, and the error text of a failure); the
decode's fetch of a segment from another host is recorded by `ConsumerService` with its
transport (tcp, dist).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cluster.wire import KVTransferError
from kvtransfer.block_copy import byte_rows, bytes_per_block, gather_blocks, scatter_blocks
from kvtransfer.checksum import check_segment, trailer_nbytes, write_checksums
from kvtransfer.device_connector import DeviceProducer
from kvtransfer.device_consumer import DeviceConsumer
from kvtransfer.device_path import StagingMedium
from kvtransfer.lifecycle import SEGMENT_WRITE_TRANSITIONS, Lifecycle, SegmentWriteState
from kvtransfer.mapping import MappingCache
from kvtransfer.specs import LoadSpec, SaveSpec
from kvtransfer.params import ConnectorSettings, TransportName
from kvtransfer.pool import SegmentPool
from kvtransfer.recycle import recycle
from kvtransfer.segment import HEADER_BYTES, SegmentLayout, StagingSegment

log = logging.getLogger(__name__)


class KVCaches:
    """The engine's paged KV tensors, one per layer, as registered by vLLM."""

    def __init__(self, kv_caches: dict[str, torch.Tensor], block_size: int):
        self.tensors = dict(kv_caches)
        self.block_size = block_size
        self.index = {name: i for i, name in enumerate(self.tensors)}
        self.rows = {name: byte_rows(kv) for name, kv in self.tensors.items()}
        self.layer_bytes = [bytes_per_block(kv) for kv in self.tensors.values()]

    def layout(self, num_blocks: int, num_tokens: int, checksums: bool) -> SegmentLayout:
        names = list(self.tensors)
        return SegmentLayout(
            layer_names=names, bytes_per_block=list(self.layer_bytes), num_blocks=num_blocks,
            num_tokens=num_tokens, block_size=self.block_size,
            trailer_nbytes=trailer_nbytes(len(names), num_blocks) if checksums else 0)


class TransferRecorder:
    """The worker half's transfer records, collected by vLLM as connector stats (built on
    `take`, so this module imports no vLLM: the GPU check runs it where vLLM is absent)."""

    def __init__(self) -> None:
        self.records: list[dict] = []

    def record(self, direction: str, transport: TransportName, num_bytes: int, started: float,
               outcome: str, request_id: str, error: str | None = None) -> None:
        self.records.append({
            "transport": transport, "direction": direction, "num_bytes": num_bytes,
            "duration_s": time.perf_counter() - started, "outcome": outcome,
            "request_id": request_id, "error": error,
        })

    def take_records(self) -> list[dict]:
        records, self.records = self.records, []
        return records

    def take(self):
        """The records since the last call as a `PdserveConnectorStats`, or None."""
        from kvtransfer.metadata import PdserveConnectorStats

        records = self.take_records()
        return PdserveConnectorStats(data={"transfers": records}) if records else None


@dataclass
class SegmentWrite:
    request_id: str
    segment: StagingSegment
    started_s: float
    lifecycle: Lifecycle[SegmentWriteState] = field(init=False)

    def __post_init__(self) -> None:
        self.lifecycle = Lifecycle(SEGMENT_WRITE_TRANSITIONS, SegmentWriteState.WRITING,
                                   self.request_id)


class ProducerWorker:
    def __init__(self, settings: ConnectorSettings, staging_dir: Path, engine_id: str,
                 caches: KVCaches, recorder: TransferRecorder, medium: StagingMedium = "host",
                 slab_poll_interval_s: float | None = 0.05):
        self.settings = settings
        self.staging_dir = staging_dir
        self.engine_id = engine_id
        self.caches = caches
        self.recorder = recorder
        self.pool: SegmentPool | None = None  # recycled segment files, made on first use
        self.writes: dict[str, SegmentWrite] = {}  # by segment path
        self.device = (DeviceProducer(settings, engine_id, staging_dir, caches.tensors,
                                      caches.block_size, poll_interval_s=slab_poll_interval_s)
                       if medium == "device" else None)

    @property
    def _device_label(self) -> TransportName:
        # TransferStat names a transport: a CUDA slab leaves over cuda_ipc or NCCL, a host
        # one (device_path force on a CPU engine) over dist only.
        assert self.device is not None
        return "cuda_ipc" if self.device.device.type == "cuda" else "dist"

    def poll_slabs(self, now: float | None = None) -> None:
        """Settle published slabs (acks, claims, leases); records each expired one."""
        if self.device is None:
            return
        for request_id in self.device.poll(now):
            self.recorder.record("save", self._device_label, 0, time.perf_counter(), "expired",
                                 request_id)

    def discard(self, path: str) -> None:
        """Give back a segment that will never be published (the request ended early)."""
        if self.device is not None and self.device.discard(path):
            return  # its slab, WRITING, is free again; there is no segment
        write = self.writes.pop(path, None)
        if write is not None:
            write.lifecycle.move_to(SegmentWriteState.DISCARDED)
            write.segment.close()
        recycle(Path(path), self.pool.dir if self.pool is not None else None)

    def save_layer(self, saves: list[SaveSpec], layer_name: str, kv_layer: torch.Tensor) -> None:
        layer = self.caches.index.get(layer_name)
        if layer is None:
            return
        for save in saves:
            self._gather(save, layer, layer_name, kv_layer)

    def save_all_layers(self, saves: list[SaveSpec]) -> None:
        for name, kv in self.caches.tensors.items():
            for save in saves:
                self._gather(save, self.caches.index[name], name, kv)

    def _gather(self, save: SaveSpec, layer: int, layer_name: str, kv_layer: torch.Tensor) -> None:
        """Copy this step's new blocks of one layer into the request's slab (device path)
        or segment."""
        if (self.device is not None and save.segment_path not in self.writes
                and self.device.gather(save, layer_name, kv_layer)):
            return
        write = self._write_for(save)
        if write is None:
            return
        blocks = save.block_ids[save.first_block :]
        if not blocks:
            return
        seg = write.segment
        num_blocks = seg.header.layout.num_blocks
        dst = torch.frombuffer(seg.layer_view(layer), dtype=kv_layer.dtype).view(
            num_blocks, *kv_layer.shape[1:])
        # kv_layer: [num_blocks, ...] paged; dst: [len(blocks), ...] contiguous in the segment
        gather_blocks(kv_layer, blocks, dst[save.first_block : save.first_block + len(blocks)])

    def _write_for(self, save: SaveSpec) -> SegmentWrite | None:
        write = self.writes.get(save.segment_path)
        if write is not None:
            return write
        num_blocks = -(-save.num_prompt_tokens // self.caches.block_size)
        layout = self.caches.layout(num_blocks, save.num_prompt_tokens,
                                    checksums=self.settings.checksums is not None)
        if self.pool is None and self.settings.pool_bytes > 0:
            self.pool = SegmentPool(self.staging_dir, self.engine_id, self.settings.pool_bytes)
        path = Path(save.segment_path)
        try:
            try:
                seg = StagingSegment.create(path, layout, self.pool)
            except FileExistsError:
                # Resumed after preemption: rewrite the segment from scratch.
                path.unlink(missing_ok=True)
                seg = StagingSegment.create(path, layout, self.pool)
        except OSError as e:
            # Staging space exhausted: the request is never marked complete (decode recomputes).
            log.warning("[%s] cannot stage KV: %s", save.request_id, e)
            self.recorder.record("save", "shm", 0, time.perf_counter(), "failed",
                                 save.request_id, error=str(e))
            return None
        write = self.writes[save.segment_path] = SegmentWrite(save.request_id, seg,
                                                              time.perf_counter())
        return write

    def finish_step(self, saves: list[SaveSpec]) -> None:
        """Publish every segment whose prompt this step completed."""
        for save in saves:
            if save.end_token < save.num_prompt_tokens:
                continue
            if self.device is not None:
                published = self.device.finish(save)
                if published is not None:
                    slab_write, ok = published
                    self.recorder.record(
                        "save", self._device_label, slab_write.slab.nbytes, slab_write.started_s,
                        "ok" if ok else "failed", save.request_id,
                        error=None if ok else "the slab could not be published")
                    continue
            write = self.writes.pop(save.segment_path, None)
            if write is None:
                continue
            seg = write.segment
            if self.settings.checksums:
                write_checksums(seg, self.settings.checksums)
            seg.mark_complete()
            write.lifecycle.move_to(SegmentWriteState.COMPLETE)
            layout = seg.header.layout
            seg.close()
            self.recorder.record("save", "shm", layout.num_blocks * sum(layout.bytes_per_block),
                                 write.started_s, "ok", save.request_id)

    def close(self) -> None:
        for path in list(self.writes):
            self.discard(path)
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        if self.device is not None:
            self.device.close()
            self.device = None


class ConsumerWorker:
    def __init__(self, caches: KVCaches, recorder: TransferRecorder,
                 settings: ConnectorSettings | None = None):
        self.caches = caches
        self.recorder = recorder
        self.settings = settings or ConnectorSettings()
        self.maps = MappingCache()  # mappings of segment files, kept
        self.failed_block_ids: set[int] = set()
        self.device: DeviceConsumer | None = None  # made on the first slab load

    def load(self, load: LoadSpec) -> None:
        if load.slab is not None:
            self._load_slab(load)
            return
        started = time.perf_counter()
        num_bytes = 0
        try:
            seg = StagingSegment.open(Path(load.segment_path), self.maps)
            try:
                num_bytes = self._copy_into_cache(seg, load)
            finally:
                seg.recycle()  # consumed (or unusable): the consumer owns and returns it
        except (KVTransferError, OSError, RuntimeError) as e:
            self.failed_block_ids.update(load.dst_block_ids)
            log.warning("[%s] KV load failed: %s", load.request_id, e)
            self.recorder.record("load", "shm", num_bytes, started, "failed",
                                 load.request_id, error=str(e))
            return
        self.recorder.record("load", "shm", num_bytes, started, "ok", load.request_id)

    def _copy_into_cache(self, seg: StagingSegment, load: LoadSpec) -> int:
        header = seg.header
        layout = header.layout
        caches = self.caches
        if not header.is_complete:
            raise KVTransferError(f"segment {seg.path.name} is not complete")
        if (layout.layer_names != list(caches.tensors) or layout.block_size != caches.block_size
                or layout.bytes_per_block != caches.layer_bytes):
            raise KVTransferError(
                f"segment {seg.path.name} layout does not match this engine's KV cache "
                f"(layers or bytes per block differ)")
        n = len(load.dst_block_ids)
        if load.first_block + n > layout.num_blocks:
            raise KVTransferError(f"segment {seg.path.name} holds too few blocks")
        if layout.trailer_nbytes:
            check_segment(seg)  # names the damaged blocks; nothing is copied
        whole = np.frombuffer(seg.buffer(), dtype=np.uint8)
        start = HEADER_BYTES
        for name, kv in caches.tensors.items():
            nbytes = caches.layer_bytes[caches.index[name]]
            region = whole[start : start + layout.num_blocks * nbytes]
            start += layout.num_blocks * nbytes
            rows = caches.rows.get(name)
            if rows is not None:
                # One copy, from the mapped segment straight into the paged blocks.
                src = region.reshape(layout.num_blocks, nbytes)
                rows[np.asarray(load.dst_block_ids, dtype=np.intp)] = (
                    src[load.first_block : load.first_block + n])
            else:
                src_t = torch.from_numpy(region).view(kv.dtype).view(layout.num_blocks, *kv.shape[1:])
                scatter_blocks(src_t[load.first_block : load.first_block + n], kv, load.dst_block_ids)
        return n * sum(caches.layer_bytes)

    def _load_slab(self, load: LoadSpec) -> None:
        """The device path: the handle named a slab of the prefill's arena."""
        started = time.perf_counter()
        transport: TransportName = "cuda_ipc" if load.slab_transport == "cuda_ipc" else "dist"
        if self.device is None:
            self.device = DeviceConsumer(self.settings, self.caches.tensors)
        try:
            num_bytes = self.device.load(load)
        except (KVTransferError, RuntimeError) as e:
            self.failed_block_ids.update(load.dst_block_ids)
            log.warning("[%s] KV slab load over %s failed: %s", load.request_id, transport, e)
            self.recorder.record("load", transport, 0, started, "failed", load.request_id,
                                 error=str(e))
            return
        self.recorder.record("load", transport, num_bytes, started, "ok", load.request_id)

    def take_failed_block_ids(self) -> set[int]:
        failed, self.failed_block_ids = self.failed_block_ids, set()
        return failed

    def close(self) -> None:
        self.maps.close()
        if self.device is not None:
            self.device.close()
            self.device = None
