"""Optional per-block checksums of staged KV: detect a block damaged between staging and load.

The producer checksums every block of every layer after staging; the consumer recomputes
them on the bytes it is about to load and refuses the segment (or just the damaged blocks)
on a mismatch. Checksums travel with the algorithm that produced them, so a reader never
compares values of two different functions.

Algorithms: ``crc32`` (``zlib``, always available: the default, so any two hosts agree) and
``xxh3_64`` (the ``xxhash`` package, several times faster, when installed on both ends).
"""

from __future__ import annotations

import math
import zlib
from typing import Literal

import msgspec
import torch

from cluster.wire import KVTransferError
from kvtransfer.segment import StagingSegment

ChecksumAlgorithm = Literal["crc32", "xxh3_64"]


class BlockChecksums(msgspec.Struct, frozen=True):
    """One checksum per fixed-size block of a byte region (one layer of a segment)."""

    algorithm: ChecksumAlgorithm
    block_nbytes: int
    values: tuple[int, ...]


def _hasher(algorithm: ChecksumAlgorithm):
    if algorithm == "crc32":
        return zlib.crc32
    if algorithm == "xxh3_64":
        try:
            import xxhash
        except ImportError as e:
            raise KVTransferError("checksum algorithm xxh3_64 needs the xxhash package") from e
        return xxhash.xxh3_64_intdigest
    raise KVTransferError(f"unknown checksum algorithm {algorithm!r}")


def checksum_blocks(data: memoryview | bytes | bytearray, block_nbytes: int,
                    algorithm: ChecksumAlgorithm = "crc32") -> BlockChecksums:
    """Checksum `data` (any buffer; its length a multiple of `block_nbytes`) block by block."""
    view = memoryview(data).cast("B")
    if block_nbytes <= 0 or len(view) % block_nbytes != 0:
        raise KVTransferError(f"{len(view)} bytes do not split into blocks of {block_nbytes}")
    digest = _hasher(algorithm)
    values = tuple(digest(view[i : i + block_nbytes])
                   for i in range(0, len(view), block_nbytes))
    return BlockChecksums(algorithm=algorithm, block_nbytes=block_nbytes, values=values)


def verify_blocks(data: memoryview | bytes | bytearray, expected: BlockChecksums) -> list[int]:
    """Indices of the blocks of `data` whose checksum differs from `expected` (empty: intact)."""
    actual = checksum_blocks(data, expected.block_nbytes, expected.algorithm)
    if len(actual.values) != len(expected.values):
        raise KVTransferError(f"expected {len(expected.values)} blocks, found {len(actual.values)}")
    return [i for i, (a, e) in enumerate(zip(actual.values, expected.values)) if a != e]


def checksum_tensor_blocks(blocks: torch.Tensor, algorithm: ChecksumAlgorithm = "crc32"
                           ) -> BlockChecksums:
    """Checksums of a CPU tensor's blocks along dim 0: blocks [num_blocks, ...] (any dtype)."""
    if blocks.device.type != "cpu":
        raise KVTransferError("checksum_tensor_blocks needs a CPU tensor")
    flat = blocks.contiguous().view(torch.uint8).reshape(-1)  # byte view, whatever the dtype
    block_nbytes = math.prod(blocks.shape[1:]) * blocks.element_size()
    return checksum_blocks(memoryview(flat.numpy()), block_nbytes, algorithm)


def checksum_segment(seg: StagingSegment, algorithm: ChecksumAlgorithm = "crc32"
                     ) -> list[BlockChecksums]:
    """Per-layer block checksums of a staged segment (its payload, not its header)."""
    layout = seg.header.layout
    return [checksum_blocks(seg.layer_view(i), layout.bytes_per_block[i], algorithm)
            for i in range(len(layout.layer_names))]


def verify_segment(seg: StagingSegment, expected: list[BlockChecksums]) -> list[tuple[int, int]]:
    """(layer index, block index) of every damaged block of `seg`; empty when all match."""
    layout = seg.header.layout
    if len(expected) != len(layout.layer_names):
        raise KVTransferError(f"segment {seg.path.name} has {len(layout.layer_names)} layers, "
                              f"checksums cover {len(expected)}")
    return [(layer, block)
            for layer, sums in enumerate(expected)
            for block in verify_blocks(seg.layer_view(layer), sums)]


# ------------------------------------------------------------- checksums inside a segment
_TRAILER_LEN = 4


def trailer_nbytes(num_layers: int, num_blocks: int) -> int:
    """Room a segment needs after its payload for `write_checksums` (any algorithm)."""
    return _TRAILER_LEN + 16 + num_layers * (64 + 9 * num_blocks)


def write_checksums(seg: StagingSegment, algorithm: ChecksumAlgorithm = "crc32"
                    ) -> list[BlockChecksums]:
    """Checksum every block of `seg` and store the result in its trailer."""
    sums = checksum_segment(seg, algorithm)
    body = msgspec.msgpack.encode(sums)
    view = seg.trailer_view()
    try:
        if _TRAILER_LEN + len(body) > len(view):
            raise KVTransferError(f"segment {seg.path.name} has no room for its checksums")
        view[:_TRAILER_LEN] = len(body).to_bytes(_TRAILER_LEN, "little")
        view[_TRAILER_LEN : _TRAILER_LEN + len(body)] = body
    finally:
        view.release()
    return sums


def read_checksums(seg: StagingSegment) -> list[BlockChecksums]:
    view = seg.trailer_view()
    try:
        if len(view) < _TRAILER_LEN:
            raise KVTransferError(f"segment {seg.path.name} carries no checksums")
        length = int.from_bytes(view[:_TRAILER_LEN], "little")
        if not 0 < length <= len(view) - _TRAILER_LEN:
            raise KVTransferError(f"segment {seg.path.name} has a damaged checksum trailer")
        try:
            return msgspec.msgpack.decode(view[_TRAILER_LEN : _TRAILER_LEN + length],
                                          type=list[BlockChecksums])
        except msgspec.DecodeError as e:
            raise KVTransferError(f"segment {seg.path.name} has a damaged checksum trailer") from e
    finally:
        view.release()


def check_segment(seg: StagingSegment) -> None:
    """Raise KVTransferError naming the damaged blocks when `seg` fails its checksums."""
    damaged = verify_segment(seg, read_checksums(seg))
    if damaged:
        shown = ", ".join(f"layer {layer} block {block}" for layer, block in damaged[:8])
        more = f" and {len(damaged) - 8} more" if len(damaged) > 8 else ""
        raise KVTransferError(f"segment {seg.path.name} failed its checksums: {shown}{more}")
