"""The contents of a `KVHandle`: where a prefill staged a request's KV and how to reach it.

Only this package encodes or decodes it; the router carries the bytes without reading them.
"""

from __future__ import annotations

import functools
import socket
from pathlib import Path

import msgspec

from cluster.wire import KVHandle, KVTransferError


class SlabTicket(msgspec.Struct, frozen=True):
    """What a decode needs to load a request's KV from a slab of the prefill's device arena
    (the device path, `device_connector.py`). Torch-free: the slab's layout travels as the
    msgpack of a `device_transfer.SlabDescriptor`, which only the connector decodes."""

    slab: msgspec.Raw  # SlabDescriptor: layer regions, arena epoch, sequence, CUDA IPC handle
    record_path: str  # the slab's record on the producer's host (cuda_ipc claims it there)
    producer_peer_id: str  # the prefill engine's id: its slab responder's queue and pair id
    node_id: str  # the producer's host
    device_type: str  # "cuda" or "cpu": where the arena is
    num_tokens: int  # prompt tokens whose KV the slab holds
    block_size: int


def encode_ticket(ticket: SlabTicket) -> bytes:
    return msgspec.msgpack.encode(ticket)


def decode_ticket(data: bytes) -> SlabTicket:
    try:
        return msgspec.msgpack.decode(data, type=SlabTicket)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise KVTransferError(f"malformed slab ticket: {e}") from e


class TransferDescriptor(msgspec.Struct, frozen=True):
    segment_path: str  # on the producer's node
    num_tokens: int  # prompt tokens whose KV the segment holds
    node_id: str  # identifies the producer's host (same id: shared memory reaches it)
    tcp_host: str  # the producer node's transfer server, for consumers on other hosts
    tcp_port: int
    producer_id: str
    producer_epoch: str  # a restarted producer gets a new epoch; old handles are void
    # n > 1: which of the segment's claims this handle is (`claims.py`), and how many
    # there are; segment_path then names this claim's own link.
    claim_index: int = 0
    num_claims: int = 1
    # The device path: the KV sits in a slab of the prefill's device arena, not in a
    # segment file. None: a host segment.
    slab: SlabTicket | None = None


@functools.cache
def local_node_id() -> str:
    """Stable for the life of this host's boot: same value means same /dev/shm."""
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot_id = "noboot"
    return f"{socket.gethostname()}/{boot_id}"


def encode_handle(desc: TransferDescriptor) -> KVHandle:
    return KVHandle(producer_id=desc.producer_id, data=msgspec.msgpack.encode(desc))


def decode_handle(handle: KVHandle) -> TransferDescriptor:
    try:
        return msgspec.msgpack.decode(handle.data, type=TransferDescriptor)
    except msgspec.DecodeError as e:
        raise KVTransferError(f"malformed KV handle from {handle.producer_id}: {e}") from e
