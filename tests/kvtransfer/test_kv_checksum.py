"""Per-block checksums find exactly the damaged block."""

from __future__ import annotations

import msgspec
import pytest
import torch

from cluster.wire import KVTransferError
from kvtransfer.checksum import (
    BlockChecksums,
    checksum_blocks,
    checksum_segment,
    checksum_tensor_blocks,
    verify_blocks,
    verify_segment,
)
from kvtransfer.staging import StagingSegment


def test_flipped_byte_names_its_block():
    data = bytearray(torch.randint(0, 256, (8 * 1024,), dtype=torch.uint8).numpy().tobytes())
    sums = checksum_blocks(data, block_nbytes=1024)
    assert len(sums.values) == 8 and verify_blocks(data, sums) == []
    data[5 * 1024 + 17] ^= 0x01
    assert verify_blocks(data, sums) == [5]


def test_checksums_cross_processes_as_typed_struct():
    sums = checksum_blocks(b"\x00" * 64, block_nbytes=16)
    wire = msgspec.msgpack.encode(sums)
    assert msgspec.msgpack.decode(wire, type=BlockChecksums) == sums


def test_segment_checksums_find_damage_in_one_layer(make_segment):
    path, _ = make_segment("r1")
    seg = StagingSegment.open(path)
    expected = checksum_segment(seg)
    assert verify_segment(seg, expected) == []
    view = seg.layer_view(1)
    view[2 * 512 + 3] ^= 0xFF  # layer 1, block 2
    view.release()
    assert verify_segment(seg, expected) == [(1, 2)]
    seg.close()


def test_tensor_blocks_of_any_dtype():
    blocks = torch.randn(6, 2, 4, 16, 8, dtype=torch.bfloat16)  # [num_blocks, 2, H, N, D]
    sums = checksum_tensor_blocks(blocks)
    assert sums.block_nbytes == 2 * 4 * 16 * 8 * 2
    damaged = blocks.clone()
    damaged[4, 1, 3, 15, 7] += 1
    assert verify_blocks(memoryview(damaged.view(torch.uint8).numpy()), sums) == [4]


def test_length_mismatch_is_an_error():
    sums = checksum_blocks(b"\x00" * 64, block_nbytes=16)
    with pytest.raises(KVTransferError):
        verify_blocks(b"\x00" * 48, sums)
    with pytest.raises(KVTransferError):
        checksum_blocks(b"\x00" * 50, block_nbytes=16)


def test_xxhash_when_installed():
    pytest.importorskip("xxhash")
    data = bytearray(4096)
    sums = checksum_blocks(data, 1024, algorithm="xxh3_64")
    data[0] = 1
    assert verify_blocks(data, sums) == [0]
