"""The transfer service each worker owns: the producer side publishes staged KV, the consumer
side makes a handle's KV local before its engine loads it.

Transport choice, per handle (so per prefill/decode pair), from `KVTransferSettings.transport`:
  auto     - shm when the handle's node id is this host's, else tcp.
  shm      - the segment is on this host: the engine reads it in place (one copy, into blocks).
  tcp      - fetch the segment from the producer node's TransferServer into local staging first.
  dist     - fetch it over a torch.distributed pair group (the prefill's `DistResponder` sends).
  cuda_ipc - registered; fails at start-up on the host path (host staging has no device
             arena to lend).
A handle whose KV the prefill staged on the device path (`device_path.py`) carries a
`SlabTicket` instead of a segment: `materialize` then moves nothing itself, it picks the
device transport (`device_path.device_transport_for`: cuda_ipc on this host, dist across)
and the decode's connector loads the slab and acks it.
An explicit name forces that transport for every handle. The transports themselves live
behind `kvtransfer.registry`'s lazy registry; this module only picks one by name.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from cluster.config import KVTransferSettings
from cluster.wire import KVHandle, KVTransferError, TransferStat
from kvtransfer import auth as kv_auth
from kvtransfer import claims
from kvtransfer.device_path import device_transport_for, engine_arena_bytes
from kvtransfer.handle import (
    TransferDescriptor,
    decode_handle,
    decode_ticket,
    encode_handle,
    encode_ticket,
    local_node_id,
)
from kvtransfer.names import is_segment_name, list_segments, owner_tag, slab_record_path
from kvtransfer.params import KVLoadReport, StagedKV, vllm_kv_transfer_config
from kvtransfer.reclaim import Sweeper
from kvtransfer.dist_channel import DistResponder
from kvtransfer.registry import TRANSPORTS, Transport, TransportRegistry
from kvtransfer.segment import default_staging_dir
from kvtransfer.tcp import TransferServer, reclaim_orphan_fetches

__all__ = ["ConsumerService", "MaterializedKV", "ProducerService", "vllm_kv_transfer_config"]

log = logging.getLogger(__name__)


class ProducerService:
    """Prefill side: owns this instance's staging area, its TCP server, its lease sweeper
    (the only one: it records every segment it reclaims) and, with a rendezvous store
    configured, the responder that answers `dist` fetches.

    The prefill worker makes one call per request: `handle_for(final output params)`.
    `sweep=False` leaves the sweeper's timer off (tests call `reclaim_expired` themselves).
    """

    def __init__(self, producer_id: str, settings: KVTransferSettings, advertise_host: str,
                 sweep: bool = True):
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
        self._sweeper = Sweeper(self.staging_dir, self.engine_id, settings.lease_s)
        if sweep:
            self._sweeper.start()

    def engine_kv_config(self) -> dict[str, Any]:
        """vLLM KVTransferConfig arguments for this prefill's engine (producer role)."""
        return vllm_kv_transfer_config("kv_producer", self.settings, self.engine_id,
                                       self.staging_dir)

    def engine_arena_bytes(self, on_gpu: bool) -> int:
        """The device staging arena this prefill's engine will allocate outside vLLM's own
        accounting (0 on the host path): `cluster.engine_host` takes it out of the
        engine's gpu_memory_utilization share."""
        return engine_arena_bytes(self.engine_kv_config(), cache_is_cuda=on_gpu)

    def handle_for(self, kv_transfer_params: dict[str, Any] | None,
                   request_id: str | None = None) -> KVHandle | None:
        """The handle to a finished prefill's staged KV, from its final output's
        kv_transfer_params; None when the connector staged nothing for it."""
        staged = StagedKV.from_params(kv_transfer_params)
        if staged is None:
            if request_id is not None:
                log.info("[%s] prefill staged no KV", request_id)
            return None
        if request_id is not None:
            log.debug("[%s] staged %d prompt tokens in %s", request_id, staged.num_tokens,
                      Path(staged.segment_path).name)
        slab = None
        try:  # the device path published a slab record instead of a segment
            slab = decode_ticket(slab_record_path(Path(staged.segment_path)).read_bytes())
        except OSError:
            pass  # no record: a host segment (or nothing, and the decode recomputes)
        return encode_handle(TransferDescriptor(
            segment_path=staged.segment_path,
            num_tokens=staged.num_tokens,
            node_id=local_node_id(),
            tcp_host=self._advertise_host,
            tcp_port=self._server.port,
            producer_id=self.producer_id,
            producer_epoch=self.epoch,
            slab=slab,
        ))

    def claims_for(self, handle: KVHandle, num_claims: int,
                   request_id: str | None = None) -> tuple[KVHandle, ...]:
        """Split a staged segment into `num_claims` claims, one handle each (claim 0 first),
        for as many decodes of the same prompt (n > 1). Each handle is then owned, consumed,
        released or reclaimed on its own; the segment's bytes go when its last claim ends
        (`claims.py`). With one claim, the handle itself. All or nothing: raises
        KVTransferError (the segment is gone) or OSError, and then the segment keeps its
        single claim, owned by the caller as before."""
        if num_claims == 1:
            return (handle,)
        desc = decode_handle(handle)
        if desc.producer_epoch != self.epoch or Path(desc.segment_path).parent != self.staging_dir:
            raise KVTransferError(f"handle of {desc.producer_id} is not this producer's to split")
        if desc.slab is not None:
            raise KVTransferError("KV staged in a device slab serves one decode (no claims)")
        paths = claims.split(Path(desc.segment_path), num_claims)
        if request_id is not None:
            log.debug("[%s] staged KV split into %d claims", request_id, num_claims)
        return tuple(encode_handle(msgspec.structs.replace(
            desc, segment_path=str(path), claim_index=i, num_claims=num_claims))
            for i, path in enumerate(paths))

    def release(self, handle: KVHandle) -> bool:
        """Drop staged KV nobody will claim (the request ended before decode). For a claim
        of a shared segment (`claims_for`), only that claim: the others stay loadable."""
        desc = decode_handle(handle)
        if desc.producer_epoch != self.epoch:
            return False
        path = Path(desc.segment_path)
        if path.parent != self.staging_dir:
            return False
        if desc.slab is not None:
            # The slab's record: its engine frees the slab once the record is gone unclaimed.
            path = slab_record_path(path)
        existed = path.exists()
        path.unlink(missing_ok=True)
        return existed

    def abandon(self, engine_request_id: str) -> int:
        """The prefill the engine ran as `engine_request_id` ended without handing out a
        handle (it was cancelled, or aborted and its final output named no segment): nobody
        can claim what the engine staged for it. Released now (returns how many files), and
        whatever the engine stages for it later, at the sweeper's next pass instead of at
        the end of the lease (`reclaim.Sweeper.abandon`)."""
        return self._sweeper.abandon(engine_request_id)

    def num_staged(self) -> int:
        return len(list_segments(self.staging_dir, owner_tag(self.engine_id)))

    def reclaim_expired(self, now: float | None = None) -> int:
        """One sweep now (the sweeper's timer does this on its own); returns how many
        expired segments it reclaimed, each recorded for `take_transfers`."""
        return self._sweeper.sweep(now=now, lease_s=self.settings.lease_s)

    def take_transfers(self) -> tuple[TransferStat, ...]:
        """Records of this service's own transfer work since the last call (expired
        segments); the engine's connector reports its saves separately."""
        return self._sweeper.take_records()

    def close(self) -> None:
        self._sweeper.close()
        self._server.close()
        if self._dist is not None:
            self._dist.close()


@dataclass(frozen=True)
class MaterializedKV:
    """A handle's KV, local and ready for the decode's engine to load."""

    staged: StagedKV
    stat: TransferStat

    @property
    def kv_transfer_params(self) -> dict[str, Any]:
        """What the engine request carries to the consumer's connector."""
        return self.staged.to_params()


class ConsumerService:
    """Decode side: turns a handle into a local segment its engine can load.

    The decode worker's calls: `materialize(handle)` before the engine sees the request,
    `discard(kv)` when the request ends, `load_report(final params)` for how the engine
    obtained the prompt's KV (the connector's own account).

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

    def engine_kv_config(self, engine_id: str) -> dict[str, Any]:
        """vLLM KVTransferConfig arguments for this decode's engine (consumer role)."""
        return vllm_kv_transfer_config("kv_consumer", self.settings, engine_id, self.staging_dir)

    def materialize(self, handle: KVHandle, request_id: str | None = None) -> MaterializedKV:
        """Make the handle's KV local. Raises KVTransferError when it cannot be had."""
        rid = request_id or "-"
        desc = decode_handle(handle)
        if desc.slab is not None:
            return self._slab(desc, request_id)
        name = self._select(desc)
        transport = self._transport(name)
        started = time.perf_counter()
        try:
            path, nbytes = transport.fetch(desc, self.staging_dir, self.settings.connect_timeout_s)
        except KVTransferError as e:
            log.warning("[%s] KV fetch over %s from %s failed: %s", rid, name, desc.producer_id, e)
            if transport.is_local and desc.node_id != local_node_id():
                raise KVTransferError(
                    f"{e} (transport {name} reaches only this host's KV, and the handle comes "
                    f"from node {desc.node_id}, not {local_node_id()})") from e
            raise
        duration = time.perf_counter() - started
        log.debug("[%s] KV of %d prompt tokens local over %s in %.4f s", rid, desc.num_tokens,
                  name, duration)
        stat = TransferStat(transport=name, direction="fetch", num_bytes=nbytes,
                            duration_s=duration, outcome="ok", request_id=request_id)
        return MaterializedKV(StagedKV(segment_path=str(path), num_tokens=desc.num_tokens), stat)

    def _slab(self, desc: TransferDescriptor, request_id: str | None) -> MaterializedKV:
        """A device-path handle: nothing moves here; the decode's connector loads the slab
        over the device transport chosen now."""
        assert desc.slab is not None
        s = self.settings
        name = device_transport_for(s.transport, s.dist_store_host is not None
                                    and s.dist_store_port is not None,
                                    arena_is_cuda=desc.slab.device_type == "cuda",
                                    same_node=desc.slab.node_id == local_node_id())
        stat = TransferStat(transport=name, direction="fetch", num_bytes=0, duration_s=0.0,
                            outcome="ok", request_id=request_id)
        return MaterializedKV(StagedKV(segment_path=desc.segment_path, num_tokens=desc.num_tokens,
                                       slab=encode_ticket(desc.slab), slab_transport=name), stat)

    def failed_fetch(self, handle: KVHandle, error: KVTransferError,
                     request_id: str | None = None) -> TransferStat:
        """The record of a materialize that raised `error`."""
        return TransferStat(transport=self.transport_for(handle), direction="fetch",
                            num_bytes=0, duration_s=0.0, outcome="failed",
                            request_id=request_id, error=str(error))

    @staticmethod
    def load_report(final_kv_transfer_params: dict[str, Any] | None) -> KVLoadReport | None:
        """How the consumer's connector obtained a finished request's prompt KV (from its
        final output's kv_transfer_params); None when it reported nothing."""
        return KVLoadReport.from_params(final_kv_transfer_params)

    @staticmethod
    def discard(kv: MaterializedKV) -> None:
        """Remove a materialized segment its engine did not consume (the connector gives
        back a segment it loads, so then this finds nothing). Unlink, not recycle: the
        engine may be in the very step that loads it (an abort races with that step), and
        unlinking leaves the connector's mapping intact, while a recycled file could be
        reused and overwritten under it."""
        path = Path(kv.staged.segment_path)
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
