"""Recycled segment files: the producer's pool, the mapping caches, orphan clean-up."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvtransfer.staging import (
    MappingCache,
    SegmentLayout,
    SegmentPool,
    StagingSegment,
    list_segments,
    pool_dir_for,
    reclaim_expired,
    reclaim_orphans,
    segment_nbytes,
    segment_path,
    size_class,
)
from tests.kvtransfer.conftest import fill_pattern

LAYOUT = SegmentLayout(layer_names=["l0", "l1"], bytes_per_block=[4096, 4096], num_blocks=20,
                       num_tokens=300, block_size=16)


def _stage(tmp_path: Path, pool: SegmentPool | None, req: str, seed: int = 0,
           layout: SegmentLayout = LAYOUT) -> tuple[Path, bytes]:
    path = segment_path(tmp_path, "p0-e1", req)
    seg = StagingSegment.create(path, layout, pool)
    payload = fill_pattern(seg, seed)
    seg.mark_complete()
    seg.close()
    return path, payload


def _read_payload(seg: StagingSegment) -> bytes:
    return b"".join(bytes(seg.layer_view(i)) for i in range(len(seg.header.layout.layer_names)))


@pytest.mark.parametrize("nbytes", [1, 65536, 65537, 100_000, 1 << 20, (1 << 20) + 1, 5 << 20,
                                    (256 << 20) - 3])
def test_size_classes_cover_the_request_with_bounded_slack(nbytes):
    cls = size_class(nbytes)
    assert cls >= nbytes and cls % 4096 == 0
    assert cls <= max(65536, 1.25 * nbytes)


def test_consumed_file_goes_back_to_the_pool_and_is_reused_with_its_mapping(tmp_path):
    pool = SegmentPool(tmp_path, "p0-e1", max_bytes=64 << 20)
    consumer_maps = MappingCache()
    path, payload = _stage(tmp_path, pool, "r1", seed=1)
    first_inode = path.stat().st_ino
    assert path.stat().st_size == size_class(segment_nbytes(LAYOUT))  # larger than the segment

    seg = StagingSegment.open(path, consumer_maps)
    assert _read_payload(seg) == payload
    assert seg.nbytes == segment_nbytes(LAYOUT) and len(seg.buffer()) == seg.nbytes
    seg.recycle()
    assert not path.exists() and list_segments(tmp_path) == []
    assert pool.pooled_bytes() == size_class(segment_nbytes(LAYOUT))

    # The next request of the same size class gets the same file (no fresh pages), and
    # both sides find their existing mapping of it.
    path2, payload2 = _stage(tmp_path, pool, "r2", seed=2)
    assert path2.stat().st_ino == first_inode
    assert pool.num_reused == 1 and pool.num_created == 1
    assert time.time() - path2.stat().st_mtime < 5  # the lease counts from reuse
    seg = StagingSegment.open(path2, consumer_maps)
    assert len(consumer_maps) == 1
    assert _read_payload(seg) == payload2  # the consumer's old mapping shows the new bytes
    seg.recycle()
    consumer_maps.close()
    pool.close()
    assert not pool.dir.exists()


def test_a_different_size_class_gets_a_new_file(tmp_path):
    pool = SegmentPool(tmp_path, "p0-e1", max_bytes=64 << 20)
    path, _ = _stage(tmp_path, pool, "r1")
    StagingSegment.open(path).recycle()
    big = SegmentLayout(layer_names=["l0", "l1"], bytes_per_block=[4096, 4096], num_blocks=200,
                        num_tokens=3000, block_size=16)
    path2, payload = _stage(tmp_path, pool, "r2", layout=big)
    assert pool.num_created == 2 and pool.num_reused == 0
    seg = StagingSegment.open(path2)
    assert _read_payload(seg) == payload
    seg.close()
    pool.close()


def test_pool_is_bounded(tmp_path):
    cls = size_class(segment_nbytes(LAYOUT))
    pool = SegmentPool(tmp_path, "p0-e1", max_bytes=2 * cls)
    paths = [_stage(tmp_path, pool, f"r{i}")[0] for i in range(4)]  # four out at once
    for p in paths:
        StagingSegment.open(p).recycle()
    assert pool.pooled_bytes() == 4 * cls  # consumers return everything ...
    _stage(tmp_path, pool, "r9")  # ... and the next acquire reuses one (no trim needed)
    assert pool.num_reused == 1
    big = SegmentLayout(layer_names=["l0"], bytes_per_block=[4096], num_blocks=100,
                        num_tokens=1600, block_size=16)
    assert size_class(segment_nbytes(big)) > 2 * cls
    _stage(tmp_path, pool, "r10", layout=big)  # a miss trims the pool to make room ...
    assert pool.pooled_bytes() == 0  # ... and this file alone exceeds the bound
    pool.close()


def test_recycling_into_a_removed_pool_unlinks(tmp_path):
    pool = SegmentPool(tmp_path, "p0-e1", max_bytes=64 << 20)
    path, _ = _stage(tmp_path, pool, "r1")
    pool.close()  # the producer exited while its segment was out
    StagingSegment.open(path).recycle()
    assert list(tmp_path.iterdir()) == []


def test_pool_needs_a_positive_bound(tmp_path):
    with pytest.raises(ValueError, match="max_bytes"):
        SegmentPool(tmp_path, "p0-e1", max_bytes=0)


def test_lease_expiry_takes_the_segment_back_into_the_pool(tmp_path):
    pool = SegmentPool(tmp_path, "p0-e1", max_bytes=64 << 20)
    _stage(tmp_path, pool, "r1")
    assert reclaim_expired(tmp_path, lease_s=60, engine_id="p0-e1") == 0
    assert reclaim_expired(tmp_path, lease_s=60, engine_id="p0-e1", now=time.time() + 61) == 1
    assert list_segments(tmp_path) == [] and pool.pooled_bytes() > 0
    pool.close()


def test_mapping_cache_forgets_deleted_files(tmp_path):
    maps = MappingCache()
    f = tmp_path / "x"
    f.write_bytes(b"\0" * 8192)
    fd = os.open(f, os.O_RDWR)
    mm = maps.get(fd)
    assert maps.get(fd) is mm and len(maps) == 1
    os.close(fd)
    f.unlink()
    maps.sweep()
    assert len(maps) == 0


def test_orphaned_pools_and_segments_of_dead_producers_are_removed(tmp_path):
    # A producer process stages a segment, then dies without cleaning up.
    code = (
        "import sys; from pathlib import Path\n"
        "from kvtransfer.staging import SegmentPool, StagingSegment, SegmentLayout, segment_path\n"
        "d = Path(sys.argv[1]); pool = SegmentPool(d, 'dead-e0', 1 << 20)\n"
        "lay = SegmentLayout(layer_names=['l'], bytes_per_block=[4096], num_blocks=2, "
        "num_tokens=20, block_size=16)\n"
        "StagingSegment.create(segment_path(d, 'dead-e0', 'r'), lay, pool).mark_complete()\n"
        "import os; os._exit(0)\n")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True,
                   cwd=Path(__file__).resolve().parents[2])
    live = SegmentPool(tmp_path, "live-e1", max_bytes=1 << 20)  # this process: alive
    _stage(tmp_path, live, "mine")
    assert len(list_segments(tmp_path)) == 2
    assert reclaim_orphans(tmp_path) == 1
    assert not pool_dir_for(tmp_path, "dead-e0").exists()
    assert [p.name for p in list_segments(tmp_path)] == [segment_path(tmp_path, "p0-e1", "mine").name]
    live.close()
