"""ProducerService / ConsumerService: handles, release, and materialize over shm and TCP."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from cluster.config import KVTransferSettings
from cluster.wire import KVHandle, KVTransferError
from kvtransfer.connector import PARAM_NUM_TOKENS, PARAM_SEGMENT
from kvtransfer.handle import decode_handle
from kvtransfer.service import ConsumerService, ProducerService
from kvtransfer.staging import HEADER_BYTES, StagingSegment, segment_path
from tests.kvtransfer.conftest import wait_until


def _stage(producer: ProducerService, make_segment, request_id: str) -> tuple[KVHandle, bytes]:
    path, _ = make_segment(request_id, engine_id=producer.engine_id,
                           staging_dir=producer.staging_dir)
    assert path == segment_path(producer.staging_dir, producer.engine_id, request_id)
    handle = producer.handle_for({PARAM_SEGMENT: str(path), PARAM_NUM_TOKENS: 40})
    assert handle is not None and handle.producer_id == "prefill-0"
    return handle, path.read_bytes()


def test_no_handle_without_staged_kv(producer):
    assert producer.handle_for(None) is None
    assert producer.handle_for({"other": 1}) is None


def test_release_unlinks_only_this_incarnations_segment(producer, make_segment):
    handle, _ = _stage(producer, make_segment, "r1")
    assert producer.num_staged() == 1
    stale = KVHandle(producer_id=handle.producer_id, data=handle.data.replace(
        producer.epoch.encode(), b"0" * len(producer.epoch)))
    assert decode_handle(stale).producer_epoch != producer.epoch
    assert producer.release(stale) is False  # an older incarnation's handle: not ours
    assert producer.num_staged() == 1
    assert producer.release(handle) is True
    assert producer.num_staged() == 0
    assert producer.release(handle) is False  # already gone


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_materialize_delivers_the_staged_bytes(producer, make_segment, tmp_path, transport):
    handle, staged = _stage(producer, make_segment, "r1")
    consumer_dir = tmp_path / "consumer"
    consumer_dir.mkdir()
    consumer = ConsumerService(KVTransferSettings(transport=transport, staging_dir=consumer_dir))

    kv = consumer.materialize(handle)

    local = kv.kv_transfer_params[PARAM_SEGMENT]
    assert kv.kv_transfer_params[PARAM_NUM_TOKENS] == 40
    assert kv.stat.transport == transport and kv.stat.outcome == "ok"
    assert kv.stat.num_bytes == len(staged)
    seg = StagingSegment.open(local)
    assert seg.header.is_complete and bytes(seg.buffer()[HEADER_BYTES:]) == staged[HEADER_BYTES:]
    source = StagingSegment._read_header(staged[:HEADER_BYTES], Path("staged"))
    assert seg.header.layout == source.layout
    seg.close()
    if transport == "shm":
        # Same host: decode reads the producer's segment in place; its connector unlinks it.
        assert str(local).startswith(str(producer.staging_dir))
        assert producer.num_staged() == 1
    else:
        assert str(local).startswith(str(consumer_dir))
        # Received into this consumer's own pool file, which the load gives back to.
        assert Path(StagingSegment.open(local).header.pool_dir).parent == consumer_dir
        assert wait_until(lambda: producer.num_staged() == 0)  # acked: producer let go


def test_tcp_on_one_host_keeps_consumer_copy_out_of_producer_accounting(producer, make_segment):
    """transport=tcp with one staging dir for both (a single node): the fetched copy belongs
    to the consumer, so the producer neither counts it as staged nor reclaims it."""
    handle, _ = _stage(producer, make_segment, "r1")
    consumer = ConsumerService(KVTransferSettings(transport="tcp",
                                                  staging_dir=producer.staging_dir))
    kv = consumer.materialize(handle)
    assert wait_until(lambda: producer.num_staged() == 0)
    local = kv.kv_transfer_params[PARAM_SEGMENT]
    settings = producer.settings
    producer.settings = settings.model_copy(update={"lease_s": 1e-9})
    try:
        time.sleep(0.01)
        producer.reclaim_expired()
    finally:
        producer.settings = settings
    assert StagingSegment.open(local).header.is_complete


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_materialize_after_release_fails(producer, make_segment, tmp_path, transport):
    handle, _ = _stage(producer, make_segment, "r1")
    producer.release(handle)
    consumer = ConsumerService(KVTransferSettings(transport=transport, staging_dir=tmp_path))
    with pytest.raises(KVTransferError):
        consumer.materialize(handle)


def test_auto_transport_picks_shm_on_the_same_host(producer, make_segment, tmp_path):
    handle, _ = _stage(producer, make_segment, "r1")
    consumer = ConsumerService(KVTransferSettings(transport="auto", staging_dir=tmp_path))
    assert consumer.transport_for(handle) == "shm"
    assert consumer.transport_for(KVHandle(producer_id="x", data=b"garbage")) == "tcp"
