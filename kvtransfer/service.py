"""The transfer service each worker owns: the producer side publishes staged KV, the consumer
side makes a handle's KV local before its engine loads it.

Transport choice, per handle (so per prefill/decode pair), from `KVTransferSettings.transport`:
  auto     - shm when the handle's node id is this host's, else tcp.
  shm      - the segment is on this host: the engine reads it in place (one copy, into blocks).
  tcp      - fetch the segment from the producer node's TransferServer into local staging first.
  dist     - fetch it over a torch.distributed pair group (the prefill's `DistResponder` sends).
  cuda_ipc - registered, not selectable yet (see kvtransfer/cuda_ipc.py).
An explicit name forces that transport for every handle. The transports themselves live
behind `kvtransfer.transport`'s lazy registry; this module only picks one by name.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.config import KVTransferSettings
from cluster.wire import KVHandle, KVTransferError, TransferStat
from kvtransfer.connector import (
    EXTRA_CHECKSUMS,
    EXTRA_LAYERWISE,
    EXTRA_LEASE_S,
    EXTRA_POOL_BYTES,
    EXTRA_STAGING_DIR,
    PARAM_NUM_TOKENS,
    PARAM_SEGMENT,
)
from kvtransfer import auth as kv_auth
from kvtransfer.handle import (
    TransferDescriptor,
    decode_handle,
    encode_handle,
    local_node_id,
)
from kvtransfer.staging import (
    default_staging_dir,
    is_segment_name,
    list_segments,
    owner_tag,
    reclaim_expired,
)
from kvtransfer.tcp import TransferServer, reclaim_orphan_fetches
from kvtransfer.transport import TRANSPORTS, DistResponder, Transport, TransportRegistry


def vllm_kv_transfer_config(role: str, settings: KVTransferSettings, engine_id: str,
                            staging_dir: Path) -> dict[str, Any]:
    """Keyword arguments for vLLM's KVTransferConfig that load pdserve's connector."""
    return {
        "kv_connector": "PdserveConnector",
        "kv_connector_module_path": "kvtransfer.connector",
        "kv_role": role,
        "engine_id": engine_id,
        "kv_load_failure_policy": settings.on_failure,
        "kv_connector_extra_config": {
            EXTRA_STAGING_DIR: str(staging_dir),
            EXTRA_LEASE_S: settings.lease_s,
            EXTRA_POOL_BYTES: int(settings.staging_pool_gib * (1 << 30)),
            EXTRA_LAYERWISE: settings.layerwise,
            EXTRA_CHECKSUMS: settings.checksums,
        },
    }


class ProducerService:
    """Prefill side: owns this instance's staging area, its TCP server, and (with a
    rendezvous store configured) the responder that answers `dist` fetches."""

    def __init__(self, producer_id: str, settings: KVTransferSettings, advertise_host: str):
        self.producer_id = producer_id
        self.settings = settings
        self.epoch = uuid.uuid4().hex[:12]
        # Engine ids tag segment names, so each incarnation only reclaims its own.
        self.engine_id = f"{producer_id}-{self.epoch}"
        self.staging_dir = Path(settings.staging_dir or default_staging_dir())
        # The node's own address, never every interface unless configured (bind_host).
        self._server = TransferServer(self.staging_dir, self.epoch,
                                      host=settings.bind_host or advertise_host,
                                      timeout_s=settings.connect_timeout_s,
                                      secret=kv_auth.kv_secret(settings)).start()
        self._advertise_host = settings.advertise_host or advertise_host
        # With a rendezvous store configured, decodes may fetch over `dist` too: answer them.
        self._dist: DistResponder | None = None
        if settings.dist_store_host is not None:
            try:
                self._dist = DistResponder(settings, self.engine_id, self.staging_dir)
            except BaseException:
                self._server.close()
                raise

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
        if self._dist is not None:
            self._dist.close()


@dataclass(frozen=True)
class MaterializedKV:
    kv_transfer_params: dict[str, Any]
    stat: TransferStat


class ConsumerService:
    """Decode side: turns a handle into a local segment its engine can load.

    `consumer_id` names this decode in `dist` pair groups (default: fresh per process);
    `transports` is the registry transports are built from (tests pass one with fakes).
    """

    def __init__(self, settings: KVTransferSettings, consumer_id: str | None = None,
                 transports: TransportRegistry = TRANSPORTS):
        self.settings = settings
        self.consumer_id = consumer_id or f"consumer-{uuid.uuid4().hex[:12]}"
        self.staging_dir = Path(settings.staging_dir or default_staging_dir())
        reclaim_orphan_fetches(self.staging_dir)  # copies a killed decode left behind
        self._registry = transports
        self._transports: dict[str, Transport] = {}
        self._lock = threading.Lock()  # materialize runs on several threads at once
        if settings.transport != "auto":
            self._transport(settings.transport)  # one that cannot work fails at start-up

    def transport_for(self, handle: KVHandle) -> str:
        """The name of the transport `materialize` uses for this handle."""
        try:
            return self._select(decode_handle(handle))
        except KVTransferError:
            return "tcp" if self.settings.transport == "auto" else self.settings.transport

    def materialize(self, handle: KVHandle) -> MaterializedKV:
        desc = decode_handle(handle)
        name = self._select(desc)
        transport = self._transport(name)
        started = time.perf_counter()
        try:
            path, nbytes = transport.fetch(desc, self.staging_dir, self.settings.connect_timeout_s)
        except KVTransferError as e:
            if transport.is_local and desc.node_id != local_node_id():
                raise KVTransferError(
                    f"{e} (transport {name} reaches only this host's KV, and the handle comes "
                    f"from node {desc.node_id}, not {local_node_id()})") from e
            raise
        stat = TransferStat(transport=name, direction="fetch", num_bytes=nbytes,
                            duration_s=time.perf_counter() - started, outcome="ok")
        return MaterializedKV({PARAM_SEGMENT: str(path), PARAM_NUM_TOKENS: desc.num_tokens}, stat)

    @staticmethod
    def discard(kv: MaterializedKV) -> None:
        """Remove a materialized segment its engine did not consume (the connector gives
        back a segment it loads, so then this finds nothing). Unlink, not recycle: the
        engine may be in the very step that loads it (an abort races with that step), and
        unlinking leaves the connector's mapping intact, while a recycled file could be
        reused and overwritten under it."""
        path = Path(kv.kv_transfer_params[PARAM_SEGMENT])
        if is_segment_name(path.name):
            path.unlink(missing_ok=True)

    def close(self) -> None:
        with self._lock:
            transports, self._transports = list(self._transports.values()), {}
        for transport in transports:
            transport.close()

    def _select(self, desc: TransferDescriptor) -> str:
        if self.settings.transport != "auto":
            return self.settings.transport  # explicit: forced, whatever the node ids say
        return "shm" if desc.node_id == local_node_id() else "tcp"

    def _transport(self, name: str) -> Transport:
        with self._lock:
            transport = self._transports.get(name)
            if transport is None:
                transport = self._registry.get(name)(self.settings, self.consumer_id)
                self._transports[name] = transport
            return transport
