"""The one lease sweeper: it reclaims what nobody claimed and records each reclaim, even on an
idle prefill (no engine step needed)."""

from __future__ import annotations

import time

from cluster.config import KVTransferSettings
from kvtransfer.reclaim import Sweeper
from kvtransfer.service import ProducerService
from kvtransfer.staging import list_segments, segment_nbytes
from tests.kvtransfer.conftest import wait_until


def test_an_idle_prefill_records_every_expired_segment(tmp_path, make_segment):
    service = ProducerService("prefill-0", KVTransferSettings(staging_dir=tmp_path, lease_s=0.2),
                              "127.0.0.1")  # its sweeper runs on its own timer
    try:
        for rid in ("a", "b"):
            make_segment(rid, engine_id=service.engine_id, staging_dir=tmp_path)
        other, _ = make_segment("c", engine_id="someone-else", staging_dir=tmp_path)
        assert wait_until(lambda: service.num_staged() == 0, timeout_s=10)
        time.sleep(0.1)
        records = service.take_transfers()
        assert sorted(r.request_id for r in records) == ["a", "b"]
        assert {(r.outcome, r.direction, r.transport) for r in records} == {("expired", "save", "shm")}
        assert all(r.num_bytes > 0 for r in records)
        assert service.take_transfers() == ()  # handed over once
        assert other.exists()  # another engine's segment is not this sweeper's
    finally:
        service.close()


def test_sweep_counts_exactly_what_it_reclaims(tmp_path, make_segment):
    sweeper = Sweeper(tmp_path, "p0-e1", lease_s=60)
    path, _ = make_segment("r1", engine_id="p0-e1")
    make_segment("r2", engine_id="p0-e1")
    assert sweeper.sweep() == 0 and sweeper.take_records() == ()  # within the lease
    assert sweeper.sweep(now=time.time() + 61) == 2
    records = sweeper.take_records()
    assert [r.request_id for r in sorted(records, key=lambda r: r.request_id)] == ["r1", "r2"]
    from kvtransfer.segment import SegmentLayout
    layout = SegmentLayout(layer_names=["layer.0", "layer.1"], bytes_per_block=[256, 512],
                           num_blocks=3, num_tokens=40, block_size=16)
    assert {r.num_bytes for r in records} == {segment_nbytes(layout)}
    assert sweeper.sweep(now=time.time() + 61) == 0 and sweeper.take_records() == ()
    assert list_segments(tmp_path, "p0-e1") == [] and not path.exists()
    assert sweeper.num_expired == 2
