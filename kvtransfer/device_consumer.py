"""The decode's side of the connector's device path: load a handle's slab, then ack it.

`ConsumerWorker` delegates here for a `LoadSpec` that names a slab (`device_path.py` chose
the device transport when the decode's service materialized the handle):

    cuda_ipc  claim the slab record (rename to <record>.claimed-<pid>), map the prefill's
              arena, scatter straight out of it into the request's blocks, synchronize and
              unmap (`device_transfer.load_from_ipc`), then unlink the claim: the ack
    dist      push a signed `SlabFetchRequest` onto the prefill engine's queue in the
              rendezvous store; its slab responder claims the record and sends; the receive
              lands on this engine's device and is scattered (`load_from_dist`); the
              completed send is the ack

A decode whose prefix cache held the first blocks loads the rest (`first_block`). Any
failure raises KVTransferError; the caller reports the blocks as load errors.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec
import torch

from cluster.wire import KVTransferError
from kvtransfer import auth as kv_auth
from kvtransfer.device_connector import (
    CLAIMED_SUFFIX,
    SlabFetchRequest,
    connect_store,
    has_store,
    slab_queue_key,
)
from kvtransfer.device_transfer import SlabDescriptor, load_from_dist, load_from_ipc
from kvtransfer.handle import SlabTicket, decode_ticket
from kvtransfer.params import ConnectorSettings
from kvtransfer.specs import LoadSpec


class DeviceConsumer:
    """A decode engine's loads of slabs into its own blocks."""

    def __init__(self, settings: ConnectorSettings, caches: Mapping[str, torch.Tensor],
                 consumer_id: str | None = None):
        self.settings = settings
        self.caches = dict(caches)
        self.consumer_id = consumer_id or f"slab-consumer-{uuid.uuid4().hex[:12]}"
        self._store: Any = None
        self._dist: Any = None

    def load(self, load: LoadSpec) -> int:
        """Copy the slab's blocks from `load.first_block` into `load.dst_block_ids`, then
        ack; returns the bytes loaded. Raises KVTransferError (the caller reports the
        blocks as load errors)."""
        assert load.slab is not None
        ticket = decode_ticket(load.slab)
        try:
            desc = msgspec.msgpack.decode(ticket.slab, type=SlabDescriptor)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise KVTransferError(f"malformed slab descriptor: {e}") from e
        try:
            if load.slab_transport == "cuda_ipc":
                self._load_ipc(ticket, desc, load)
            elif load.slab_transport == "dist":
                self._load_dist(ticket, desc, load)
            else:
                raise KVTransferError(f"no device transport named {load.slab_transport!r}")
        except ValueError as e:  # another layout: layers, block counts
            raise KVTransferError(f"slab of {desc.request_id}: {e}") from e
        per_block = sum(r.nbytes // r.num_blocks for r in desc.regions().values())
        return len(load.dst_block_ids) * per_block

    def _load_ipc(self, ticket: SlabTicket, desc: SlabDescriptor, load: LoadSpec) -> None:
        record = Path(ticket.record_path)
        claimed = record.with_name(record.name + CLAIMED_SUFFIX + str(os.getpid()))
        try:
            os.rename(record, claimed)  # the claim: from now on the producer waits for our ack
        except FileNotFoundError:
            raise KVTransferError(f"slab of {desc.request_id} is gone (lease expired, "
                                  f"released, or the prefill restarted)") from None
        try:
            load_from_ipc(desc, self.caches, load.dst_block_ids,
                          first_block=load.first_block)  # synchronized and unmapped on return
        finally:
            claimed.unlink(missing_ok=True)  # the ack: the slab is the producer's again

    def _load_dist(self, ticket: SlabTicket, desc: SlabDescriptor, load: LoadSpec) -> None:
        store, dist = self._connect()
        record_name = Path(ticket.record_path).name
        transfer_id = uuid.uuid4().hex
        secret = kv_auth.kv_secret()
        request = SlabFetchRequest(
            record_name=record_name, decode_id=self.consumer_id, transfer_id=transfer_id,
            mac=kv_auth.sign_request(secret, record_name, self.consumer_id, transfer_id))
        try:
            store.queue_push(slab_queue_key(ticket.producer_peer_id), msgspec.msgpack.encode(request))
        except RuntimeError as e:
            raise KVTransferError(f"asking {ticket.producer_peer_id} for its slab failed: {e}") from e
        # A completed receive is the ack: the producer frees the slab when its send completes.
        load_from_dist(dist, ticket.producer_peer_id, transfer_id, desc, self.caches,
                       load.dst_block_ids, first_block=load.first_block)

    def _connect(self) -> tuple[Any, Any]:
        if self._dist is None:
            if not has_store(self.settings):
                raise KVTransferError("a dist slab load needs the rendezvous store "
                                      "(kv_transfer.dist_store_host, dist_store_port)")
            from kvtransfer.dist import DistTransport

            self._store = connect_store(self.settings)
            self._dist = DistTransport(self.consumer_id, "decode", self._store,
                                       backend=self.settings.dist_backend,
                                       timeout_s=self.settings.connect_timeout_s,
                                       secret=kv_auth.kv_secret())
        return self._store, self._dist

    def close(self) -> None:
        if self._dist is not None:
            self._dist.close()
        self._dist = self._store = None
