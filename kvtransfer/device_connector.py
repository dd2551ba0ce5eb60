"""The connector's device path: stage a request in an arena slab, publish it, lend it, take it back.

Chosen by `device_path.staging_medium` (the one place); `worker_side.ProducerWorker` and
`ConsumerWorker` delegate here when it says "device". Pull from a device arena
(docs/kvtransfer.md, "GPU data path").

Producer (the prefill's worker half, `DeviceProducer`):

    save_kv_layer   first chunk: allocate the request's slab (None: the request takes the
                    host path); every layer: `LayerwiseStager.save_blocks` gathers this
                    step's new blocks (on CUDA on a side stream, after the layer's compute)
    wait_for_save   prompt complete: `finish` (done event, slab READY), CUDA IPC export of
                    a CUDA slab, then the slab record `pdserve-slab-<engine>-<request>` in
                    the staging dir holding the `SlabTicket`; `ProducerService.handle_for`
                    puts that ticket into the request's handle

Slab records carry ownership between processes, as segment files do on the host path;
rename(2) is the one atomic claim:

    record ─decode on this host (cuda_ipc) renames it to <record>.claimed-<pid>─▶ slab LENT
           ─the slab responder (dist) renames it to <record>.claimed-<pid>, sends─▶ LENT
                                                          ─send completed (the ack)─▶ FREE
           ─lease: the producer renames it to <record>.expired and unlinks─▶ FREE
           ─ProducerService.release unlinks it (no decode will come)─▶ FREE
    <record>.claimed-<pid> ─the decode unlinks it once its copies are done (the ack)─▶ FREE
                           ─process <pid> is gone (its IPC mapping went with it)─▶ FREE

`DeviceProducer.poll` applies these moves at every connector call and on its own timer (so
an idle prefill frees acked slabs too). A LENT slab is freed only by its ack or its
claimant's death, never by the lease: no free while a copy is in flight.

The decode's side of the protocol is `device_consumer.DeviceConsumer`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import msgspec
import torch

from cluster.wire import KVTransferError
from kvtransfer import auth as kv_auth
from kvtransfer.device_staging import ArenaSlab, DeviceArena, LayerRegion, LayerwiseStager, SlabState, slab_layout, slab_nbytes
from kvtransfer.device_transfer import describe, send_over_dist
from kvtransfer.handle import SlabTicket, encode_ticket, local_node_id
from kvtransfer.specs import SaveSpec
from kvtransfer.names import SLAB_PREFIX, process_alive, slab_record_path
from kvtransfer.params import ConnectorSettings

log = logging.getLogger(__name__)

_QUEUE_PREFIX = "pdserve-kv/slab"
CLAIMED_SUFFIX = ".claimed-"


class SlabFetchRequest(msgspec.Struct, frozen=True, tag="slab"):
    """A decode asks a prefill's slab responder to send one slab over their pair group."""

    record_name: str
    decode_id: str
    transfer_id: str
    mac: bytes = b""  # kv_auth.sign_request over the fields above: the store is open to all


class _Stop(msgspec.Struct, frozen=True, tag="stop"):
    """Wakes a closing responder (pushed by itself onto its own queue)."""


def slab_queue_key(peer_id: str) -> str:
    return f"{_QUEUE_PREFIX}/{peer_id}"


def has_store(settings: ConnectorSettings) -> bool:
    return settings.dist_store_host is not None and settings.dist_store_port is not None


def connect_store(settings: ConnectorSettings) -> Any:
    from torch.distributed import TCPStore  # deferred: only where dist is used

    try:
        return TCPStore(settings.dist_store_host, settings.dist_store_port, is_master=False,
                        timeout=timedelta(seconds=settings.connect_timeout_s))
    except RuntimeError as e:
        raise KVTransferError(f"cannot reach the KV rendezvous store at "
                              f"{settings.dist_store_host}:{settings.dist_store_port}: {e}") from e


@dataclass
class _SlabWrite:
    request_id: str
    slab: ArenaSlab
    regions: dict[str, LayerRegion]
    num_blocks: int
    started_s: float = field(default_factory=time.perf_counter)


class DeviceProducer:
    """A prefill engine's device arena and every slab in it, from allocation to free."""

    def __init__(self, settings: ConnectorSettings, engine_id: str, staging_dir: Path,
                 caches: Mapping[str, torch.Tensor], block_size: int,
                 poll_interval_s: float | None = 0.05):
        self.settings = settings
        self.engine_id = engine_id
        self.staging_dir = Path(staging_dir)
        self.caches = dict(caches)
        self.block_size = block_size
        self.device = next(iter(self.caches.values())).device
        # One allocation, made now and never grown (its bytes come out of the engine's
        # gpu_memory_utilization share: cluster/engine_host.py, kvtransfer/memory.py).
        self.arena = DeviceArena(settings.device_arena_bytes, self.device, lease_s=settings.lease_s)
        self.stager = LayerwiseStager(self.arena, self.caches)
        self._writes: dict[str, _SlabWrite] = {}  # by segment path: slabs being written
        # record -> (request id, slab, when published: the lease counts from then)
        self._published: dict[Path, tuple[str, ArenaSlab, float]] = {}
        self._sending: set[Path] = set()  # records the responder claimed and is sending
        self._lock = threading.RLock()  # engine thread, timer thread, responder thread
        self._closed = threading.Event()
        self._responder = _SlabResponder(self) if has_store(settings) else None
        self._timer = None
        if poll_interval_s is not None:
            self._timer = threading.Thread(target=self._poll_forever, args=(poll_interval_s,),
                                           name="pdserve-kv-slab-poll", daemon=True)
            self._timer.start()

    # -- staging (the engine's thread) ----------------------------------------------------
    def gather(self, save: SaveSpec, layer_name: str, kv_layer: torch.Tensor) -> bool:
        """Stage this step's new blocks of one layer; False: the request is not on the
        device path (its first chunk found no room, it began on the host, or it asks for the
        host: n > 1)."""
        write = self._writes.get(save.segment_path)
        if write is None:
            if save.first_block != 0 or save.host_only:
                return False  # a request's first chunk decides its path, for good
            write = self._begin(save)
            if write is None:
                return False
        region = write.regions.get(layer_name)
        blocks = save.block_ids[save.first_block :]
        if region is not None and blocks:
            self.stager.save_blocks(write.slab, region, kv_layer, blocks, save.first_block)
        return True

    def _begin(self, save: SaveSpec) -> _SlabWrite | None:
        num_blocks = -(-save.num_prompt_tokens // self.block_size)
        slab = self.arena.allocate(save.request_id, slab_nbytes(self.caches, num_blocks))
        if slab is None:
            log.info("[%s] device staging arena full (%d of %d bytes used): host path",
                     save.request_id, self.arena.used_bytes, self.arena.capacity_bytes)
            return None
        write = self._writes[save.segment_path] = _SlabWrite(
            save.request_id, slab, slab_layout(self.caches, num_blocks), num_blocks)
        return write

    def finish(self, save: SaveSpec) -> tuple[_SlabWrite, bool] | None:
        """Publish a request whose prompt this step completed: (its write, published?);
        None when the request is not on the device path."""
        write = self._writes.pop(save.segment_path, None)
        if write is None:
            return None
        slab = self.stager.finish(write.slab)  # done event recorded; READY
        record = slab_record_path(Path(save.segment_path))
        try:
            ipc = None
            if self.device.type == "cuda":
                from kvtransfer.cuda_ipc import export_tensor

                ipc = export_tensor(slab.view, self.stager.stream)  # its event covers the gathers
            ticket = SlabTicket(
                slab=msgspec.Raw(msgspec.msgpack.encode(
                    describe(slab, self.caches, write.num_blocks, ipc=ipc))),
                record_path=str(record), producer_peer_id=self.engine_id, node_id=local_node_id(),
                device_type=self.device.type, num_tokens=save.num_prompt_tokens,
                block_size=self.block_size)
            tmp = record.with_name(record.name + ".tmp")
            tmp.write_bytes(encode_ticket(ticket))
            with self._lock:
                os.rename(tmp, record)  # published whole, or not at all
                self._published[record] = (write.request_id, slab, time.monotonic())
        except (OSError, RuntimeError, ValueError) as e:
            log.warning("[%s] cannot publish the staged slab: %s", write.request_id, e)
            self.arena.free(slab)  # never published: nobody can be reading it
            return write, False
        return write, True

    def discard(self, segment_path: str) -> bool:
        """Abort a slab still being written (the request ended before its prompt was staged)."""
        write = self._writes.pop(segment_path, None)
        if write is None:
            return False
        self.arena.free(write.slab)  # WRITING -> FREE: never published, never lent
        return True

    # -- ownership (any thread) -----------------------------------------------------------
    def poll(self, now: float | None = None) -> list[str]:
        """Apply the record moves of the module docstring; returns the request ids whose
        unclaimed slabs the lease freed in this call."""
        expired: list[str] = []
        with self._lock:
            for record, (request_id, slab, published_s) in list(self._published.items()):
                outcome = self._settle(record, slab, published_s, now)
                if outcome is not None:
                    del self._published[record]
                    if outcome == "expired":
                        expired.append(request_id)
        return expired

    def _settle(self, record: Path, slab: ArenaSlab, published_s: float,
                now: float | None) -> str | None:
        """One published slab's next move: "freed" or "expired" once it is FREE (no longer
        watched), None while it is still READY or LENT."""
        if slab.state is SlabState.FREE:
            return "freed"
        if record in self._sending:
            return None  # the responder owns it until its send completes
        if record.exists():
            age = (time.monotonic() if now is None else now) - published_s
            if age <= self.settings.lease_s:
                return None
            expired = record.with_name(record.name + ".expired")
            try:
                os.rename(record, expired)  # atomic against a decode's claim
            except FileNotFoundError:
                pass  # claimed in the meantime: settled below
            else:
                expired.unlink(missing_ok=True)
                self.arena.free(slab)  # READY -> FREE: nobody claimed it within the lease
                return "expired"
        claims = list(record.parent.glob(record.name + CLAIMED_SUFFIX + "*"))
        if claims:
            if slab.state is SlabState.READY:
                self.arena.lend(slab)  # a decode on this host claimed it: it may be reading
            pids = [int(p) for c in claims if (p := c.name.rsplit("-", 1)[1]).isdigit()]
            if pids and not any(process_alive(pid) for pid in pids):
                for c in claims:  # the claimant died: its mapping went with it
                    c.unlink(missing_ok=True)
                self.arena.ack(slab.epoch, slab.sequence)
                return "freed"
            return None
        # No record, no claim: the claimant acked (unlinked its claim), or the producer
        # service released the record (no decode will come).
        if slab.state is SlabState.LENT:
            self.arena.ack(slab.epoch, slab.sequence)
        else:
            self.arena.free(slab)
        return "freed"

    def claim_for_send(self, record: Path) -> ArenaSlab | None:
        """The slab responder claims a published slab (the record's rename, in this
        process); None when it is gone (expired, released) or not this engine's."""
        with self._lock:
            entry = self._published.get(record)
            if entry is None:
                return None
            try:
                os.rename(record, self._claimed(record))
            except FileNotFoundError:
                return None
            self._sending.add(record)
            return entry[1]

    def sent(self, record: Path) -> None:
        """The responder's send ended (the slab is FREE either way: send_over_dist acks)."""
        with self._lock:
            self._claimed(record).unlink(missing_ok=True)
            self._sending.discard(record)
            self._published.pop(record, None)

    @staticmethod
    def _claimed(record: Path) -> Path:
        return record.with_name(record.name + CLAIMED_SUFFIX + str(os.getpid()))

    def _poll_forever(self, interval_s: float) -> None:
        while not self._closed.wait(interval_s):
            try:
                self.poll()
            except Exception:  # the timer must outlive one bad poll
                log.exception("slab poll failed")

    def num_published(self) -> int:
        with self._lock:
            return len(self._published)

    def published_slabs(self) -> list[ArenaSlab]:
        """Slabs published and not yet free (READY or LENT)."""
        with self._lock:
            return [slab for _, slab, _ in self._published.values()]

    def close(self) -> None:
        self._closed.set()
        if self._timer is not None:
            self._timer.join(timeout=5)
        if self._responder is not None:
            self._responder.close()
        for path in list(self._writes):
            self.discard(path)
        with self._lock:
            for record in list(self._published):
                record.unlink(missing_ok=True)  # unclaimed tickets die with the arena


class _SlabResponder:
    """The prefill side of dist for slabs: pops `SlabFetchRequest`s from this engine's queue
    in the rendezvous store, claims the record, sends the slab (`send_over_dist`: LENT until
    the send completes), or refuses when the slab is gone. One transfer at a time."""

    def __init__(self, producer: DeviceProducer):
        from kvtransfer.dist import DistTransport  # deferred: imports torch.distributed

        self.producer = producer
        settings = producer.settings
        self.peer_id = producer.engine_id
        self._store = connect_store(settings)
        self._queue = self._store.clone()
        self._queue.set_timeout(timedelta(hours=1))
        self._secret = kv_auth.kv_secret()
        self._dist = DistTransport(self.peer_id, "prefill", self._store,
                                   backend=settings.dist_backend,
                                   timeout_s=settings.connect_timeout_s, secret=self._secret)
        self._closed = threading.Event()
        self.num_served = self.num_refused = 0
        self._thread = threading.Thread(target=self._run, name="pdserve-kv-slab-send", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        decoder = msgspec.msgpack.Decoder(SlabFetchRequest | _Stop)
        while not self._closed.is_set():
            try:
                raw = self._queue.queue_pop(slab_queue_key(self.peer_id))
            except RuntimeError:
                self._closed.wait(0.5)
                continue
            try:
                msg = decoder.decode(raw)
            except msgspec.DecodeError:
                continue
            if isinstance(msg, _Stop) or self._closed.is_set():
                return
            if (not msg.record_name.startswith(SLAB_PREFIX) or "/" in msg.record_name
                    or not kv_auth.verify_request(self._secret, msg.mac, msg.record_name,
                                                  msg.decode_id, msg.transfer_id)):
                kv_auth.REFUSALS.add("dist", msg.decode_id, "unsigned slab request")
                continue
            try:
                self._serve(msg)
            except (KVTransferError, RuntimeError, OSError) as e:
                log.warning("slab %s to %s failed: %s", msg.record_name, msg.decode_id, e)

    def _serve(self, req: SlabFetchRequest) -> None:
        producer = self.producer
        record = producer.staging_dir / req.record_name
        slab = producer.claim_for_send(record)
        if slab is None:
            self.num_refused += 1
            self._dist.refuse(req.decode_id, req.transfer_id)  # expired, released or unknown
            return
        try:
            # LENT until the send completed (the peer holds its copy), then FREE.
            send_over_dist(self._dist, producer.arena, slab, [(req.decode_id, req.transfer_id)])
            self.num_served += 1
        finally:
            producer.sent(record)

    def close(self) -> None:
        self._closed.set()
        try:
            self._store.queue_push(slab_queue_key(self.peer_id), msgspec.msgpack.encode(_Stop()))
        except RuntimeError:
            pass
        self._thread.join(timeout=5)
        self._dist.close()
