"""pdserve's vLLM KV connector: stages a prefill's prompt KV and loads it into a decode.

Loaded by vLLM through ``kv_connector_module_path="kvtransfer.connector"`` with
``kv_connector="PdserveConnector"``; the producer (prefill) and consumer (decode) roles
come from ``kv_role``. Like every v1 connector it has a scheduler half and a worker half,
which talk only through `PdserveConnectorMetadata`.

Handoff model: **pull through a staging segment** (see docs/kvtransfer.md).

Producer (prefill) request, scheduler half::

    scheduled ──(each step: save spec for the prompt tokens computed)──▶ SAVING
    SAVING ──request_finished, prompt complete──▶ STAGED   (handle in kv_transfer_params)
    SAVING ──request_finished, aborted early────▶ DISCARD  (segment unlinked by the worker)

Producer worker half: ``save_kv_layer`` gathers each layer's paged blocks into the
segment as soon as that layer is computed (``layerwise``; otherwise ``wait_for_save``
gathers every layer after the forward); ``wait_for_save`` marks the segment complete
after the step that computed the last prompt token, after writing block checksums into
its trailer when ``checksums`` is set. The engine's blocks are free to go as
soon as the request finishes (the segment holds its own copy), so ``request_finished``
never delays the free.

Consumer (decode) request, scheduler half::

    new ──get_num_new_matched_tokens: segment complete, layout ok──▶ LOAD_PLANNED
    new ──segment missing / incomplete / wrong layout─────────────▶ RECOMPUTE (0 tokens)
    LOAD_PLANNED ──build_connector_meta──▶ handed to the worker half

Consumer worker half: ``start_load_kv`` copies the segment into the request's freshly
allocated blocks before the forward (synchronous load), verifying the block checksums
first when the segment carries them, then recycles the segment file into its producer's
pool: the consumer owns it from the moment it opens it. A failed load reports the blocks through
``get_block_ids_with_load_errors``, and vLLM's ``kv_load_failure_policy`` (pdserve's
``on_failure``) recomputes or fails the request; output is never computed on partial KV.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats
from vllm.v1.request import RequestStatus

from cluster.wire import KVTransferError
from kvtransfer.checksum import check_segment, trailer_nbytes, write_checksums
from kvtransfer.staging import (
    HEADER_BYTES,
    MappingCache,
    SegmentLayout,
    SegmentPool,
    StagingSegment,
    default_staging_dir,
    reclaim_expired,
    reclaim_orphans,
    recycle,
    segment_path,
)

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

# kv_connector_extra_config keys (set by kvtransfer.service.vllm_kv_transfer_config).
EXTRA_STAGING_DIR = "staging_dir"
EXTRA_LEASE_S = "lease_s"
EXTRA_POOL_BYTES = "pool_bytes"  # recycled segment files per producer; 0: off
EXTRA_LAYERWISE = "layerwise"  # stage each layer in save_kv_layer (else after the forward)
EXTRA_CHECKSUMS = "checksums"  # None, "crc32" or "xxh3_64"

# Keys of vLLM's kv_transfer_params dict that this connector reads and writes.
PARAM_SEGMENT = "pdserve_segment_path"
PARAM_NUM_TOKENS = "pdserve_num_tokens"


@dataclass(frozen=True)
class SaveSpec:
    request_id: str
    segment_path: str
    block_ids: tuple[int, ...]  # all of the request's blocks so far
    first_block: int  # first block whose bytes change this step
    end_token: int  # prompt tokens computed once this step ends
    num_prompt_tokens: int


@dataclass(frozen=True)
class LoadSpec:
    request_id: str
    segment_path: str
    dst_block_ids: tuple[int, ...]  # decode blocks to fill, in prompt order
    first_block: int  # index of dst_block_ids[0] within the segment


@dataclass
class PdserveConnectorMetadata(KVConnectorMetadata):
    saves: list[SaveSpec] = field(default_factory=list)
    loads: list[LoadSpec] = field(default_factory=list)
    discards: list[str] = field(default_factory=list)  # segment paths to unlink


@dataclass
class PdserveConnectorStats(KVConnectorStats):
    """Transfer records since the last collection: dicts of TransferStat fields."""

    def reset(self) -> None:
        self.data = {"transfers": []}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        self.data.setdefault("transfers", []).extend(other.data.get("transfers", []))
        return self

    def reduce(self) -> dict[str, int | float]:
        records = self.data.get("transfers", [])
        return {
            "num_transfers": len(records),
            "num_bytes": sum(r["num_bytes"] for r in records),
            "num_failed": sum(r["outcome"] != "ok" for r in records),
        }

    def is_empty(self) -> bool:
        return not self.data.get("transfers")


class PdserveConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole,
                 kv_cache_config: "KVCacheConfig"):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        cfg = self._kv_transfer_config
        self._is_producer = cfg.is_kv_producer
        self._is_consumer = cfg.is_kv_consumer
        self._block_size = vllm_config.cache_config.block_size
        self._staging_dir = Path(cfg.get_from_extra_config(EXTRA_STAGING_DIR, None)
                                 or default_staging_dir())
        self._lease_s = float(cfg.get_from_extra_config(EXTRA_LEASE_S, 120.0))
        self._pool_bytes = int(cfg.get_from_extra_config(EXTRA_POOL_BYTES, 1 << 30))
        self._layerwise = bool(cfg.get_from_extra_config(EXTRA_LAYERWISE, True))
        self._checksums = cfg.get_from_extra_config(EXTRA_CHECKSUMS, None)
        self._engine_id = cfg.engine_id or "engine"
        # scheduler half
        self._saving: dict[str, list[int]] = {}  # request id -> block ids so far
        self._save_prompt_len: dict[str, int] = {}
        self._planned_loads: dict[str, LoadSpec] = {}
        self._num_local_computed: dict[str, int] = {}
        self._pending_discards: list[str] = []
        # worker half
        self._kv_caches: dict[str, torch.Tensor] = {}
        self._byte_rows: dict[str, np.ndarray | None] = {}  # per layer: [num_blocks, bytes]
        self._layer_index: dict[str, int] = {}
        self._layer_bytes: list[int] = []  # bytes per block, per layer
        self._pool: SegmentPool | None = None  # producer: recycled segment files
        self._maps = MappingCache()  # consumer: mappings of segment files, kept
        self._open_segments: dict[str, StagingSegment] = {}
        self._failed_block_ids: set[int] = set()
        self._stats = PdserveConnectorStats()
        self._stats.reset()
        self._save_started_s: dict[str, float] = {}
        self._last_sweep_s = 0.0

    # ================================================================================
    # Scheduler half
    # ================================================================================
    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int
                                   ) -> tuple[int | None, bool]:
        if not self._is_consumer:
            return 0, False
        params = request.kv_transfer_params or {}
        path = params.get(PARAM_SEGMENT)
        if path is None:
            return 0, False
        num_tokens = int(params.get(PARAM_NUM_TOKENS, 0))
        num_prompt = len(request.prompt_token_ids or ())
        # The consumer's prompt is the producer's prompt plus its first token, or (when the
        # router has decode sample the first token again) the producer's prompt itself: at
        # least the last prompt token is computed here, so it loads at most num_prompt - 1.
        if not 0 < num_tokens <= num_prompt:
            return 0, False
        if not _segment_is_usable(Path(path), num_tokens, self._block_size):
            return 0, False  # recompute; the worker reports the outcome
        self._num_local_computed[request.request_id] = num_computed_tokens
        return max(0, min(num_tokens, num_prompt - 1) - num_computed_tokens), False

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks",
                                 num_external_tokens: int) -> None:
        if num_external_tokens <= 0:
            return
        params = request.kv_transfer_params or {}
        num_local = self._num_local_computed.pop(request.request_id, 0)
        num_tokens = num_local + num_external_tokens
        first_block = num_local // self._block_size
        end_block = -(-num_tokens // self._block_size)
        block_ids = blocks.get_block_ids()[0]
        self._planned_loads[request.request_id] = LoadSpec(
            request_id=request.request_id,
            segment_path=params[PARAM_SEGMENT],
            dst_block_ids=tuple(block_ids[first_block:end_block]),
            first_block=first_block,
        )

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        meta = PdserveConnectorMetadata()
        meta.loads = list(self._planned_loads.values())
        self._planned_loads.clear()
        meta.discards, self._pending_discards = self._pending_discards, []
        if not self._is_producer:
            return meta
        num_scheduled = scheduler_output.num_scheduled_tokens
        for new_req in scheduler_output.scheduled_new_reqs:
            prompt_len = len(new_req.prompt_token_ids or ())
            self._saving[new_req.req_id] = list(new_req.block_ids[0])
            self._save_prompt_len[new_req.req_id] = prompt_len
            end = min(new_req.num_computed_tokens + num_scheduled[new_req.req_id], prompt_len)
            # A new request's locally cached prefix blocks are copied too: the segment
            # must hold the whole prompt.
            self._add_save(meta, new_req.req_id, first_token=0, end_token=end)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            if req_id not in self._saving:
                continue
            new_blocks = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                self._saving[req_id] = list(new_blocks[0]) if new_blocks else []
                first = 0
            else:
                if new_blocks:
                    self._saving[req_id].extend(new_blocks[0])
                first = cached.num_computed_tokens[i]
            prompt_len = self._save_prompt_len[req_id]
            if first >= prompt_len:
                continue  # prompt already staged; decoding tokens are not transferred
            end = min(cached.num_computed_tokens[i] + num_scheduled[req_id], prompt_len)
            self._add_save(meta, req_id, first_token=first, end_token=end)
        return meta

    def _add_save(self, meta: PdserveConnectorMetadata, req_id: str, first_token: int,
                  end_token: int) -> None:
        prompt_len = self._save_prompt_len[req_id]
        num_blocks = -(-end_token // self._block_size)
        meta.saves.append(SaveSpec(
            request_id=req_id,
            segment_path=str(self._segment_path(req_id)),
            block_ids=tuple(self._saving[req_id][:num_blocks]),
            first_block=first_token // self._block_size,
            end_token=end_token,
            num_prompt_tokens=prompt_len,
        ))

    def _segment_path(self, req_id: str) -> Path:
        return segment_path(self._staging_dir, self._engine_id, req_id)

    def request_finished(self, request: "Request", block_ids: list[int]
                         ) -> tuple[bool, dict[str, Any] | None]:
        req_id = request.request_id
        self._num_local_computed.pop(req_id, None)
        self._planned_loads.pop(req_id, None)
        if req_id not in self._saving:
            return False, None
        del self._saving[req_id]
        prompt_len = self._save_prompt_len.pop(req_id)
        path = self._segment_path(req_id)
        if request.num_computed_tokens < prompt_len or request.status == RequestStatus.FINISHED_ABORTED:
            self._pending_discards.append(str(path))
            return False, None
        # The worker marked the segment complete in the step that computed the last
        # prompt token, before this call; the engine's own blocks can be freed now.
        return False, {PARAM_SEGMENT: str(path), PARAM_NUM_TOKENS: prompt_len}

    # ================================================================================
    # Worker half
    # ================================================================================
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._kv_caches = dict(kv_caches)
        self._layer_index = {name: i for i, name in enumerate(self._kv_caches)}
        self._byte_rows = {name: _byte_rows(kv) for name, kv in self._kv_caches.items()}
        self._layer_bytes = [_bytes_per_block(kv) for kv in self._kv_caches.values()]

    def _layout(self, num_blocks: int, num_tokens: int) -> SegmentLayout:
        names = list(self._kv_caches)
        return SegmentLayout(
            layer_names=names,
            bytes_per_block=list(self._layer_bytes),
            num_blocks=num_blocks,
            num_tokens=num_tokens,
            block_size=self._block_size,
            trailer_nbytes=trailer_nbytes(len(names), num_blocks) if self._checksums else 0,
        )

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, PdserveConnectorMetadata)
        for path in meta.discards:
            self._close_segment(path, unlink=True)
        self._maybe_sweep()
        for load in meta.loads:
            self._load_one(load)

    def _load_one(self, load: LoadSpec) -> None:
        started = time.perf_counter()
        path = Path(load.segment_path)
        num_bytes = 0
        try:
            seg = StagingSegment.open(path, self._maps)
            try:
                num_bytes = self._copy_into_cache(seg, load)
            finally:
                seg.recycle()  # consumed (or unusable): the consumer owns and returns it
        except (KVTransferError, OSError, RuntimeError) as e:
            self._failed_block_ids.update(load.dst_block_ids)
            self._record("load", num_bytes, started, "failed", error=str(e))
            return
        self._record("load", num_bytes, started, "ok")

    def _copy_into_cache(self, seg: StagingSegment, load: LoadSpec) -> int:
        header = seg.header
        layout = header.layout
        if not header.is_complete:
            raise KVTransferError(f"segment {seg.path.name} is not complete")
        if (layout.layer_names != list(self._kv_caches) or layout.block_size != self._block_size
                or layout.bytes_per_block != self._layer_bytes):
            raise KVTransferError(
                f"segment {seg.path.name} layout does not match this engine's KV cache "
                f"(layers or bytes per block differ)")
        n = len(load.dst_block_ids)
        if load.first_block + n > layout.num_blocks:
            raise KVTransferError(f"segment {seg.path.name} holds too few blocks")
        if layout.trailer_nbytes:
            check_segment(seg)  # names the damaged blocks; nothing is copied
        dst_ids = np.asarray(load.dst_block_ids, dtype=np.intp)
        whole = np.frombuffer(seg.buffer(), dtype=np.uint8)
        start = HEADER_BYTES
        for name, kv in self._kv_caches.items():
            layer = self._layer_index[name]
            rows = self._byte_rows.get(name)
            nbytes = self._layer_bytes[layer]
            region = whole[start : start + layout.num_blocks * nbytes]
            start += layout.num_blocks * nbytes
            if rows is not None:
                # One copy, from the mapped segment straight into the paged blocks.
                src = region.reshape(layout.num_blocks, nbytes)
                rows[dst_ids] = src[load.first_block : load.first_block + n]
            else:
                dst_idx = torch.tensor(load.dst_block_ids, dtype=torch.long, device=kv.device)
                src_t = torch.from_numpy(region).view(kv.dtype).view(layout.num_blocks, *kv.shape[1:])
                kv.index_copy_(0, dst_idx, src_t[load.first_block : load.first_block + n].to(kv.device))
        return n * sum(self._layer_bytes)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are synchronous in start_load_kv

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor,
                      attn_metadata: "AttentionMetadata", **kwargs: Any) -> None:
        if not self._is_producer or not self._layerwise:
            return
        meta = self._get_connector_metadata()
        assert isinstance(meta, PdserveConnectorMetadata)
        layer = self._layer_index.get(layer_name)
        if layer is None:
            return
        for save in meta.saves:
            self._gather(save, layer, kv_layer)

    def _gather(self, save: SaveSpec, layer: int, kv_layer: torch.Tensor) -> None:
        """Copy this step's new blocks of one layer into the request's segment."""
        seg = self._segment_for_save(save)
        if seg is None:
            return
        blocks = save.block_ids[save.first_block :]
        if not blocks:
            return
        dst = _segment_blocks(seg, layer, kv_layer, seg.header.layout.num_blocks)
        dst = dst[save.first_block : save.first_block + len(blocks)]
        # kv_layer: [num_blocks, ...] paged; dst: [len(blocks), ...] contiguous in the segment
        idx = torch.tensor(blocks, dtype=torch.long, device=kv_layer.device)
        if kv_layer.device.type == "cpu":
            torch.index_select(kv_layer, 0, idx, out=dst)  # gather straight into the segment
        else:
            dst.copy_(kv_layer.index_select(0, idx))  # gather on device, then device-to-host

    def _segment_for_save(self, save: SaveSpec) -> StagingSegment | None:
        seg = self._open_segments.get(save.segment_path)
        if seg is not None:
            return seg
        num_blocks = -(-save.num_prompt_tokens // self._block_size)
        layout = self._layout(num_blocks, save.num_prompt_tokens)
        if self._pool is None and self._pool_bytes > 0:
            self._pool = SegmentPool(self._staging_dir, self._engine_id, self._pool_bytes)
        try:
            try:
                seg = StagingSegment.create(Path(save.segment_path), layout, self._pool)
            except FileExistsError:
                # Resumed after preemption: rewrite the segment from scratch.
                Path(save.segment_path).unlink(missing_ok=True)
                seg = StagingSegment.create(Path(save.segment_path), layout, self._pool)
        except OSError:
            return None  # staging space exhausted: the request is never marked complete
        self._open_segments[save.segment_path] = seg
        self._save_started_s[save.segment_path] = time.perf_counter()
        return seg

    def wait_for_save(self) -> None:
        if not self._is_producer or not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        assert isinstance(meta, PdserveConnectorMetadata)
        if not self._layerwise:
            for name, kv in self._kv_caches.items():
                for save in meta.saves:
                    self._gather(save, self._layer_index[name], kv)
        for save in meta.saves:
            if save.end_token < save.num_prompt_tokens:
                continue
            seg = self._open_segments.pop(save.segment_path, None)
            if seg is None:
                continue
            if self._checksums:
                write_checksums(seg, self._checksums)
            seg.mark_complete()
            num_bytes = seg.header.layout.num_blocks * sum(seg.header.layout.bytes_per_block)
            seg.close()
            started = self._save_started_s.pop(save.segment_path, time.perf_counter())
            self._record("save", num_bytes, started, "ok")

    def _close_segment(self, path: str, unlink: bool) -> None:
        seg = self._open_segments.pop(path, None)
        self._save_started_s.pop(path, None)
        if seg is not None:
            seg.close()
        if unlink:
            recycle(Path(path), str(self._pool.dir) if self._pool is not None else "")

    def _maybe_sweep(self) -> None:
        if not self._is_producer:
            return
        now = time.time()
        if now - self._last_sweep_s < min(self._lease_s, 5.0):
            return
        self._last_sweep_s = now
        reclaim_orphans(self._staging_dir)
        reclaimed = reclaim_expired(self._staging_dir, self._lease_s, self._engine_id, now)
        for _ in range(reclaimed):
            self._record("save", 0, time.perf_counter(), "expired")

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._failed_block_ids = self._failed_block_ids, set()
        return failed

    def _record(self, direction: str, num_bytes: int, started: float, outcome: str,
                error: str | None = None) -> None:
        self._stats.data.setdefault("transfers", []).append({
            "transport": "local",
            "direction": direction,
            "num_bytes": num_bytes,
            "duration_s": time.perf_counter() - started,
            "outcome": outcome,
        })

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        if self._stats.is_empty():
            return None
        stats, self._stats = self._stats, PdserveConnectorStats()
        self._stats.reset()
        return stats

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None
                                 ) -> KVConnectorStats | None:
        return PdserveConnectorStats(data=data) if data is not None else PdserveConnectorStats(
            data={"transfers": []})

    def shutdown(self) -> None:
        for path in list(self._open_segments):
            self._close_segment(path, unlink=True)
        self._maps.close()
        if self._pool is not None:
            self._pool.close()
            self._pool = None


def _bytes_per_block(kv: torch.Tensor) -> int:
    return kv[0].numel() * kv.element_size()


def _byte_rows(kv: torch.Tensor) -> np.ndarray | None:
    """A CPU layer's blocks as a numpy [num_blocks, bytes_per_block] view of the same
    memory (numpy's fancy-index assignment copies at memcpy speed; torch's index_copy_
    runs at a fraction of it on CPU), or None when the blocks are not byte-viewable."""
    if kv.device.type != "cpu" or kv.dim() < 2 or kv.stride(-1) != 1:
        return None
    try:
        return kv.view(torch.uint8).view(kv.shape[0], -1).numpy()
    except RuntimeError:
        return None


def _segment_blocks(seg: StagingSegment, layer: int, kv: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """The segment's region for one layer as a tensor shaped like `num_blocks` KV blocks."""
    view = seg.layer_view(layer)
    return torch.frombuffer(view, dtype=kv.dtype).view(num_blocks, *kv.shape[1:])


def _segment_is_usable(path: Path, num_tokens: int, block_size: int) -> bool:
    try:
        seg = StagingSegment.open(path)
    except KVTransferError:
        return False
    try:
        layout = seg.header.layout
        return (seg.header.is_complete and layout.num_tokens == num_tokens
                and layout.block_size == block_size)
    finally:
        seg.close()
