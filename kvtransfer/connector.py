"""pdserve's vLLM KV connector: stages a prefill's prompt KV and loads it into a decode.

Loaded by vLLM through ``kv_connector_module_path="kvtransfer.connector"`` with
``kv_connector="PdserveConnector"``; the producer (prefill) and consumer (decode) roles
come from ``kv_role``, its settings from ``kv_connector_extra_config``
(`kvtransfer.params.ConnectorSettings`). Like every v1 connector it has a scheduler half
and a worker half, which talk only through `PdserveConnectorMetadata`. This class only
dispatches vLLM's calls to them:

    scheduler_side.py   ProducerScheduler / ConsumerScheduler: per-request state objects
    worker_side.py      ProducerWorker / ConsumerWorker: staging and loading
    block_copy.py       the gather and scatter kernels between paged blocks and staged bytes

Where it stages is decided once, in `device_path.staging_medium` (host segments on CPU
engines by default; a device arena slab on CUDA engines whose decodes reach it over a
device transport, or where `device_path: force` says so).

Handoff model: **pull through a staging segment** (see docs/kvtransfer.md). The engine's
blocks are free to go as soon as a request finishes (the segment holds its own copy), so
``request_finished`` never delays the free. Lease sweeping is not done here: the
producer service's one `reclaim.Sweeper` does it (and records what it reclaims).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

from kvtransfer.device_path import StagingMedium, staging_medium
from kvtransfer.metadata import LoadSpec, PdserveConnectorMetadata, PdserveConnectorStats, SaveSpec
from kvtransfer.params import PARAM_NUM_TOKENS, PARAM_SEGMENT, ConnectorSettings
from kvtransfer.scheduler_side import ConsumerScheduler, ProducerScheduler
from kvtransfer.segment import default_staging_dir
from kvtransfer.worker_side import ConsumerWorker, KVCaches, ProducerWorker, TransferRecorder

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

__all__ = ["PARAM_NUM_TOKENS", "PARAM_SEGMENT", "LoadSpec", "PdserveConnector",
           "PdserveConnectorMetadata", "PdserveConnectorStats", "SaveSpec"]

log = logging.getLogger(__name__)


class PdserveConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole,
                 kv_cache_config: "KVCacheConfig"):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        cfg = self._kv_transfer_config
        self._is_producer = cfg.is_kv_producer
        self._is_consumer = cfg.is_kv_consumer
        self._block_size = vllm_config.cache_config.block_size
        self.settings = ConnectorSettings.from_extra_config(cfg.kv_connector_extra_config)
        self._staging_dir = Path(self.settings.staging_dir or default_staging_dir())
        self._engine_id = cfg.engine_id or "engine"
        # scheduler half
        self._producer_sched = (ProducerScheduler(self._staging_dir, self._engine_id, self._block_size)
                                if self._is_producer else None)
        self._consumer_sched = ConsumerScheduler(self._block_size) if self._is_consumer else None
        # worker half (built by register_kv_caches)
        self._recorder = TransferRecorder()
        self._producer: ProducerWorker | None = None
        self._consumer: ConsumerWorker | None = None
        self.staging_medium: StagingMedium = "host"  # decided in register_kv_caches

    # ================================================================================
    # Scheduler half
    # ================================================================================
    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int
                                   ) -> tuple[int | None, bool]:
        if self._consumer_sched is None:
            return 0, False
        return self._consumer_sched.get_num_new_matched_tokens(request, num_computed_tokens), False

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks",
                                 num_external_tokens: int) -> None:
        if self._consumer_sched is not None:
            self._consumer_sched.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        meta = PdserveConnectorMetadata()
        if self._consumer_sched is not None:
            self._consumer_sched.build(meta)
        if self._producer_sched is not None:
            self._producer_sched.build(meta, scheduler_output)
        return meta

    def update_connector_output(self, connector_output: "KVConnectorOutput") -> None:
        if self._consumer_sched is not None:
            self._consumer_sched.update_connector_output(connector_output)

    def request_finished(self, request: "Request", block_ids: list[int]
                         ) -> tuple[bool, dict[str, Any] | None]:
        params: dict[str, Any] | None = None
        if self._consumer_sched is not None:
            params = self._consumer_sched.request_finished(request)
        if self._producer_sched is not None:
            staged = self._producer_sched.request_finished(request)
            if staged is not None:
                params = {**(params or {}), **staged}
        return False, params

    # ================================================================================
    # Worker half
    # ================================================================================
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        caches = KVCaches(kv_caches, self._block_size)
        if self._producer is not None:
            self._producer.close()
        cache_is_cuda = any(kv.is_cuda for kv in kv_caches.values())
        self.staging_medium = staging_medium(self.settings, cache_is_cuda)
        self._producer = (ProducerWorker(self.settings, self._staging_dir, self._engine_id,
                                         caches, self._recorder, self.staging_medium)
                          if self._is_producer else None)
        self._consumer = (ConsumerWorker(caches, self._recorder, self.settings)
                          if self._is_consumer else None)
        log.info("KV connector (%s) stages on the %s path", self._engine_id, self.staging_medium)

    @property
    def device_producer(self):
        """The producer's device arena and slabs (`DeviceProducer`), or None (host path)."""
        return self._producer.device if self._producer is not None else None

    @property
    def pool(self):
        """The producer's segment pool (None before its first segment, or on a consumer)."""
        return self._producer.pool if self._producer is not None else None

    def _meta(self) -> PdserveConnectorMetadata:
        meta = self._get_connector_metadata()
        assert isinstance(meta, PdserveConnectorMetadata)
        return meta

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        meta = self._meta()
        if self._producer is not None:
            for path in meta.discards:
                self._producer.discard(path)
            self._producer.poll_slabs()
        if self._consumer is not None:
            for load in meta.loads:
                self._consumer.load(load)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are synchronous in start_load_kv

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor,
                      attn_metadata: "AttentionMetadata", **kwargs: Any) -> None:
        if self._producer is None or not self.settings.layerwise:
            return
        self._producer.save_layer(self._meta().saves, layer_name, kv_layer)

    def wait_for_save(self) -> None:
        if self._producer is None or not self.has_connector_metadata():
            return
        saves = self._meta().saves
        if not self.settings.layerwise:
            self._producer.save_all_layers(saves)
        self._producer.finish_step(saves)
        self._producer.poll_slabs()

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._consumer.take_failed_block_ids() if self._consumer is not None else set()

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        return self._recorder.take()

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None
                                 ) -> KVConnectorStats | None:
        return PdserveConnectorStats(data=data) if data is not None else PdserveConnectorStats(
            data={"transfers": []})

    def shutdown(self) -> None:
        if self._producer is not None:
            self._producer.close()
        if self._consumer is not None:
            self._consumer.close()
