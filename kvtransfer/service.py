"""The transfer service each worker owns: the producer side publishes staged KV, the consumer
side makes a handle's KV local before its engine loads it.

Transport choice (per handle, `KVTransferSettings.transport`):
  shm  - the segment is on this host: the engine reads it in place (one copy, into blocks).
  tcp  - fetch the segment from the producer node's TransferServer into local staging first.
  auto - shm when the handle's node id is this host's, else tcp.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.config import KVTransferSettings
from cluster.wire import KVHandle, KVTransferError, TransferStat
from kvtransfer.connector import PARAM_NUM_TOKENS, PARAM_SEGMENT
from kvtransfer.handle import TransferDescriptor, decode_handle, encode_handle, local_node_id
from kvtransfer.staging import default_staging_dir, list_segments, owner_tag, reclaim_expired
from kvtransfer.tcp import TransferServer, fetch_segment


def vllm_kv_transfer_config(role: str, settings: KVTransferSettings, engine_id: str,
                            staging_dir: Path) -> dict[str, Any]:
    """Keyword arguments for vLLM's KVTransferConfig that load pdserve's connector."""
    return {
        "kv_connector": "PdserveConnector",
        "kv_connector_module_path": "kvtransfer.connector",
        "kv_role": role,
        "engine_id": engine_id,
        "kv_load_failure_policy": settings.on_failure,
        "kv_connector_extra_config": {"staging_dir": str(staging_dir), "lease_s": settings.lease_s},
    }


class ProducerService:
    """Prefill side: owns this instance's staging area and its TCP server."""

    def __init__(self, producer_id: str, settings: KVTransferSettings, advertise_host: str):
        self.producer_id = producer_id
        self.settings = settings
        self.epoch = uuid.uuid4().hex[:12]
        # Engine ids tag segment names, so each incarnation only reclaims its own.
        self.engine_id = f"{producer_id}-{self.epoch}"
        self.staging_dir = Path(settings.staging_dir or default_staging_dir())
        self._server = TransferServer(self.staging_dir, self.epoch).start()
        self._advertise_host = settings.advertise_host or advertise_host

    def handle_for(self, kv_transfer_params: dict[str, Any] | None) -> KVHandle | None:
        if not kv_transfer_params or PARAM_SEGMENT not in kv_transfer_params:
            return None
        return encode_handle(TransferDescriptor(
            segment_path=kv_transfer_params[PARAM_SEGMENT],
            num_tokens=int(kv_transfer_params[PARAM_NUM_TOKENS]),
            node_id=local_node_id(),
            tcp_host=self._advertise_host,
            tcp_port=self._server.port,
            producer_id=self.producer_id,
            producer_epoch=self.epoch,
        ))

    def release(self, handle: KVHandle) -> bool:
        """Drop staged KV nobody will claim (the request ended before decode)."""
        desc = decode_handle(handle)
        if desc.producer_epoch != self.epoch:
            return False
        path = Path(desc.segment_path)
        if path.parent != self.staging_dir:
            return False
        existed = path.exists()
        path.unlink(missing_ok=True)
        return existed

    def num_staged(self) -> int:
        return len(list_segments(self.staging_dir, owner_tag(self.engine_id)))

    def reclaim_expired(self) -> int:
        return reclaim_expired(self.staging_dir, self.settings.lease_s, self.engine_id)

    def close(self) -> None:
        self._server.close()


@dataclass(frozen=True)
class MaterializedKV:
    kv_transfer_params: dict[str, Any]
    stat: TransferStat


class ConsumerService:
    """Decode side: turns a handle into a local segment its engine can load."""

    def __init__(self, settings: KVTransferSettings):
        self.settings = settings
        self.staging_dir = Path(settings.staging_dir or default_staging_dir())

    def transport_for(self, handle: KVHandle) -> str:
        if self.settings.transport != "auto":
            return self.settings.transport
        try:
            return "shm" if decode_handle(handle).node_id == local_node_id() else "tcp"
        except KVTransferError:
            return "tcp"

    def materialize(self, handle: KVHandle) -> MaterializedKV:
        desc = decode_handle(handle)
        transport = self.transport_for(handle)
        started = time.perf_counter()
        if transport == "shm":
            path = Path(desc.segment_path)
            if not path.exists():
                raise KVTransferError(f"staged KV {path.name} is gone (expired or released)")
            nbytes = path.stat().st_size
        else:
            path, nbytes = fetch_segment(
                desc.tcp_host, desc.tcp_port, Path(desc.segment_path).name, desc.producer_epoch,
                self.staging_dir, self.settings.connect_timeout_s)
        stat = TransferStat(transport=transport, direction="fetch", num_bytes=nbytes,
                            duration_s=time.perf_counter() - started, outcome="ok")
        return MaterializedKV({PARAM_SEGMENT: str(path), PARAM_NUM_TOKENS: desc.num_tokens}, stat)
