"""Staged segments: layout, header checks, and the lease sweeper."""

from __future__ import annotations

import os
import time

import pytest

from cluster.wire import KVTransferError
from kvtransfer.segment import segment_is_usable as _segment_is_usable
from kvtransfer.staging import (
    HEADER_BYTES,
    SegmentLayout,
    StagingSegment,
    list_segments,
    reclaim_expired,
    segment_nbytes,
    segment_path,
)

LAYOUT = SegmentLayout(layer_names=["model.layers.0.attn", "model.layers.1.attn"],
                       bytes_per_block=[256, 512], num_blocks=3, num_tokens=40, block_size=16)


def test_round_trip_preserves_layers_and_header(tmp_path):
    path = segment_path(tmp_path, "prefill-0", "req/1")  # unsafe chars are escaped
    assert path.parent == tmp_path and "/" not in path.name
    seg = StagingSegment.create(path, LAYOUT)
    assert not seg.header.is_complete
    seg.layer_view(0)[:] = bytes([1]) * (3 * 256)
    seg.layer_view(1)[:] = bytes(range(256)) * 6
    seg.mark_complete()
    seg.close()

    assert path.stat().st_size == segment_nbytes(LAYOUT) == HEADER_BYTES + 3 * (256 + 512)
    reopened = StagingSegment.open(path)
    assert reopened.header.is_complete
    assert reopened.header.layout == LAYOUT
    assert bytes(reopened.layer_view(0)) == bytes([1]) * 768
    assert bytes(reopened.layer_view(1)) == bytes(range(256)) * 6
    reopened.unlink()
    assert not path.exists()


def test_create_refuses_to_overwrite(tmp_path, make_segment):
    path, _ = make_segment("r1")
    with pytest.raises(FileExistsError):
        StagingSegment.create(path, LAYOUT)


def test_incomplete_segment_opens_but_is_not_usable(make_segment):
    path, _ = make_segment("r1", complete=False)
    seg = StagingSegment.open(path)
    assert seg.header.is_complete is False
    seg.close()
    assert not _segment_is_usable(path, num_tokens=40, block_size=16)
    complete, _ = make_segment("r2")
    assert _segment_is_usable(complete, num_tokens=40, block_size=16)
    # A complete segment for another prompt length or block size is not usable either.
    assert not _segment_is_usable(complete, num_tokens=41, block_size=16)
    assert not _segment_is_usable(complete, num_tokens=40, block_size=32)


def test_missing_segment_refused(tmp_path):
    with pytest.raises(KVTransferError, match="does not exist"):
        StagingSegment.open(tmp_path / "pdserve-kv-nope")


def test_wrong_size_refused(make_segment):
    path, _ = make_segment("r1")
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 1)
    with pytest.raises(KVTransferError, match="wrong size"):
        StagingSegment.open(path)


def test_truncated_below_header_refused(make_segment):
    path, _ = make_segment("r1")
    with open(path, "r+b") as f:
        f.truncate(HEADER_BYTES - 1)
    with pytest.raises(KVTransferError, match="truncated"):
        StagingSegment.open(path)


def test_zeroed_header_refused(make_segment):
    path, _ = make_segment("r1")
    with open(path, "r+b") as f:
        f.write(b"\0" * 64)
    with pytest.raises(KVTransferError, match="no valid header"):
        StagingSegment.open(path)


def test_corrupt_header_refused(make_segment):
    path, _ = make_segment("r1")
    with open(path, "r+b") as f:
        f.seek(4)
        f.write(b"\xc1" * 32)  # 0xc1 is never valid msgpack
    with pytest.raises(KVTransferError, match="corrupt header"):
        StagingSegment.open(path)


def test_reclaim_expired_only_touches_own_old_segments(tmp_path, make_segment):
    old_mine, _ = make_segment("old", engine_id="p1")
    fresh_mine, _ = make_segment("fresh", engine_id="p1")
    old_other, _ = make_segment("old", engine_id="p2")
    # An engine whose id extends ours is another engine, not one of our segments.
    old_longer_id, _ = make_segment("old", engine_id="p10")
    long_ago = time.time() - 1000
    for path in (old_mine, old_other, old_longer_id):
        os.utime(path, (long_ago, long_ago))

    assert reclaim_expired(tmp_path, lease_s=60, engine_id="p1") == 1
    assert not old_mine.exists()
    assert fresh_mine.exists() and old_other.exists() and old_longer_id.exists()
    assert list_segments(tmp_path, "p1") == [fresh_mine]
    assert reclaim_expired(tmp_path, lease_s=60, engine_id="p1") == 0
