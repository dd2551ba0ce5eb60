"""Several claimants on one staged segment (n > 1: one prefill, n decodes).

Every test ends with the leak check: no segment name left in the staging directory, and
the producer's pool holds only whole files nobody else names (link count 1), at most the
one file the segment was staged in.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch

from cluster.config import KVTransferSettings
from cluster.wire import KVTransferError
from kvtransfer import claims
from kvtransfer.connector import PARAM_NUM_TOKENS, PARAM_SEGMENT, LoadSpec
from kvtransfer.handle import decode_handle
from kvtransfer.lifecycle import CLAIM_TRANSITIONS, ClaimState, IllegalTransition, Lifecycle
from kvtransfer.service import ConsumerService, ProducerService
from kvtransfer.staging import (
    SegmentLayout,
    SegmentPool,
    StagingSegment,
    list_segments,
    pool_dir_for,
    segment_path,
)
from tests.kvtransfer.conftest import fill_pattern, wait_until

LAYOUT = SegmentLayout(layer_names=["l0", "l1"], bytes_per_block=[4096, 4096], num_blocks=5,
                       num_tokens=70, block_size=16)


@pytest.fixture
def producer(tmp_path):
    staging = tmp_path / "producer"
    staging.mkdir()
    service = ProducerService("prefill-0", KVTransferSettings(staging_dir=staging, lease_s=60),
                              "127.0.0.1", sweep=False)
    yield service
    service.close()


def _stage(producer: ProducerService, request_id: str, seed: int = 3):
    """A complete segment staged the way the connector stages it: in a pooled file."""
    pool = SegmentPool(producer.staging_dir, producer.engine_id, max_bytes=64 << 20)
    path = segment_path(producer.staging_dir, producer.engine_id, request_id)
    seg = StagingSegment.create(path, LAYOUT, pool)
    payload = fill_pattern(seg, seed)
    seg.mark_complete()
    seg.close()
    handle = producer.handle_for({PARAM_SEGMENT: str(path), PARAM_NUM_TOKENS: 70})
    return handle, payload, pool


def _payload(path: str | Path) -> bytes:
    seg = StagingSegment.open(Path(path))
    try:
        return b"".join(bytes(seg.layer_view(i)) for i in range(len(LAYOUT.layer_names)))
    finally:
        seg.close()


def _consume(path: str | Path) -> bytes:
    """What a decode's connector does with a local segment: read it, then give it back."""
    seg = StagingSegment.open(Path(path))
    data = b"".join(bytes(seg.layer_view(i)) for i in range(len(LAYOUT.layer_names)))
    seg.recycle()
    return data


def _assert_no_leak(staging: Path, pool: SegmentPool, max_pooled_files: int = 1) -> None:
    assert list_segments(staging) == [], "a segment or claim was left behind"
    pooled = [p for p in pool.dir.iterdir() if p.name[:1].isdigit()]
    assert len(pooled) <= max_pooled_files
    for p in pooled:
        assert os.stat(p).st_nlink == 1, "a pooled file is still named by a claim"


def test_claims_name_one_file_and_count_its_claimants(producer):
    handle, payload, pool = _stage(producer, "r1")
    handles = producer.claims_for(handle, 3, "r1")
    descs = [decode_handle(h) for h in handles]
    assert [d.claim_index for d in descs] == [0, 1, 2] and {d.num_claims for d in descs} == {3}
    paths = [Path(d.segment_path) for d in descs]
    assert paths[0] == Path(decode_handle(handle).segment_path)  # claim 0 is the segment
    assert len({os.stat(p).st_ino for p in paths}) == 1  # one staged copy, not three
    assert claims.num_claimants(paths[0]) == 3 and producer.num_staged() == 3
    assert all(_payload(p) == payload for p in paths)
    for p in paths:
        _consume(p)
    _assert_no_leak(producer.staging_dir, pool)


def test_one_claim_is_the_handle_itself(producer):
    handle, _, pool = _stage(producer, "r1")
    assert producer.claims_for(handle, 1) == (handle,)
    _consume(decode_handle(handle).segment_path)
    _assert_no_leak(producer.staging_dir, pool)


def test_the_file_goes_back_to_the_pool_only_with_its_last_claim(producer):
    handle, payload, pool = _stage(producer, "r1")
    paths = [decode_handle(h).segment_path for h in producer.claims_for(handle, 3)]
    assert _consume(paths[1]) == payload
    assert pool.pooled_bytes() == 0  # two claimants still read it: not reusable yet
    assert _consume(paths[0]) == payload
    assert pool.pooled_bytes() == 0 and claims.num_claimants(Path(paths[2])) == 1
    assert _consume(paths[2]) == payload
    assert pool.pooled_bytes() > 0  # the last claimant pooled it
    _assert_no_leak(producer.staging_dir, pool)


def test_a_claim_consumed_while_another_claimant_reads_leaves_its_bytes_alone(producer):
    handle, payload, pool = _stage(producer, "r1")
    first, second = (decode_handle(h).segment_path for h in producer.claims_for(handle, 2))
    reader = StagingSegment.open(Path(first))  # claimant 0 has it open, mid-load
    assert _consume(second) == payload  # claimant 1 finishes first
    # Had claimant 1 pooled the file, the producer's next request could take it now.
    other = segment_path(producer.staging_dir, producer.engine_id, "r2")
    seg = StagingSegment.create(other, LAYOUT, pool)
    fill_pattern(seg, seed=99)
    seg.mark_complete()
    seg.close()
    assert os.stat(other).st_ino != os.stat(first).st_ino
    assert b"".join(bytes(reader.layer_view(i)) for i in range(2)) == payload
    reader.recycle()
    _consume(other)
    _assert_no_leak(producer.staging_dir, pool, max_pooled_files=2)


def test_release_gives_back_one_claim_and_the_others_still_load(producer, tmp_path):
    handle, payload, pool = _stage(producer, "r1")
    handles = producer.claims_for(handle, 3)
    assert producer.release(handles[1]) is True  # that choice ended before its decode
    assert producer.release(handles[1]) is False
    consumer = ConsumerService(KVTransferSettings(transport="shm", staging_dir=producer.staging_dir))
    for h in (handles[0], handles[2]):
        assert _consume(consumer.materialize(h).staged.segment_path) == payload
    with pytest.raises(KVTransferError):
        consumer.materialize(handles[1])
    _assert_no_leak(producer.staging_dir, pool)


def test_all_claims_released_by_an_aborted_request(producer):
    handle, _, pool = _stage(producer, "r1")
    for h in producer.claims_for(handle, 4):
        assert producer.release(h) is True
    assert producer.num_staged() == 0
    _assert_no_leak(producer.staging_dir, pool, max_pooled_files=0)


def test_the_lease_reclaims_claims_nobody_came_for(producer):
    handle, payload, pool = _stage(producer, "r1")
    paths = [decode_handle(h).segment_path for h in producer.claims_for(handle, 3)]
    assert _consume(paths[0]) == payload  # one decode came; two never do
    assert producer.reclaim_expired(now=os.stat(paths[1]).st_mtime + 61) == 2
    records = producer.take_transfers()
    assert [r.outcome for r in records] == ["expired", "expired"]
    assert {r.request_id for r in records} == {"r1+claim1", "r1+claim2"}
    _assert_no_leak(producer.staging_dir, pool)
    assert pool.pooled_bytes() > 0  # the last reclaimed claim pooled the file


def test_split_is_all_or_nothing(producer):
    handle, _, pool = _stage(producer, "r1")
    path = Path(decode_handle(handle).segment_path)
    claims.claim_path(path, 2).write_bytes(b"in the way")  # claim 2's name is taken
    with pytest.raises(FileExistsError):
        producer.claims_for(handle, 3)
    claims.claim_path(path, 2).unlink()
    assert claims.num_claimants(path) == 1 and producer.num_staged() == 1
    _consume(path)
    _assert_no_leak(producer.staging_dir, pool)


def test_a_segment_that_expired_before_the_split_fails_it(producer):
    handle, _, pool = _stage(producer, "r1")
    producer.release(handle)
    with pytest.raises(KVTransferError, match="gone"):
        producer.claims_for(handle, 2)
    _assert_no_leak(producer.staging_dir, pool, max_pooled_files=0)


def test_another_producers_handle_is_not_split(producer, tmp_path):
    handle, _, pool = _stage(producer, "r1")
    staging = tmp_path / "other"
    staging.mkdir()
    other = ProducerService("prefill-1", KVTransferSettings(staging_dir=staging), "127.0.0.1",
                            sweep=False)
    try:
        with pytest.raises(KVTransferError, match="not this producer's"):
            other.claims_for(handle, 2)
    finally:
        other.close()
    assert claims.num_claimants(Path(decode_handle(handle).segment_path)) == 1
    producer.release(handle)
    _assert_no_leak(producer.staging_dir, pool, max_pooled_files=0)


def test_claims_fetched_over_tcp_concurrently_each_get_the_bytes(producer, tmp_path):
    handle, payload, pool = _stage(producer, "r1")
    handles = producer.claims_for(handle, 3)
    dirs = []
    results: dict[int, bytes] = {}
    errors: list[BaseException] = []

    def fetch(i: int) -> None:
        d = tmp_path / f"decode-{i}"
        d.mkdir()
        dirs.append(d)
        try:
            consumer = ConsumerService(KVTransferSettings(transport="tcp", staging_dir=d))
            results[i] = _consume(consumer.materialize(handles[i]).staged.segment_path)
            consumer.close()
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=fetch, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and results == {0: payload, 1: payload, 2: payload}
    # Each ack gives back one claim (the server's thread recycles after the client's ack).
    assert wait_until(lambda: list_segments(producer.staging_dir) == [])
    _assert_no_leak(producer.staging_dir, pool)
    for d in dirs:
        assert list_segments(d) == []


def test_a_tcp_claimant_that_never_acks_leaves_its_claim_to_the_lease(producer, tmp_path):
    handle, payload, pool = _stage(producer, "r1")
    handles = producer.claims_for(handle, 2)
    d = tmp_path / "decode"
    d.mkdir()
    consumer = ConsumerService(KVTransferSettings(transport="tcp", staging_dir=d))
    assert _consume(consumer.materialize(handles[0]).staged.segment_path) == payload
    consumer.close()
    # Claim 1's decode died before fetching: its name stays until the lease.
    remaining = decode_handle(handles[1]).segment_path
    assert wait_until(lambda: [str(p) for p in list_segments(producer.staging_dir)] == [remaining])
    assert producer.reclaim_expired(now=os.stat(remaining).st_mtime + 61) == 1
    _assert_no_leak(producer.staging_dir, pool)
    assert list_segments(d) == []


def test_claim_lifecycle_table():
    claim = Lifecycle(CLAIM_TRANSITIONS, ClaimState.OUTSTANDING, "r1+claim1")
    claim.move_to(ClaimState.TAKEN)
    assert claim.is_final
    with pytest.raises(IllegalTransition):
        claim.move_to(ClaimState.EXPIRED)  # a taken claim is the decode's; the lease skips it
    for end in (ClaimState.RELEASED, ClaimState.EXPIRED):
        assert Lifecycle(CLAIM_TRANSITIONS, ClaimState.OUTSTANDING, "c").can_move_to(end)


def test_every_claim_loads_the_same_blocks_through_the_connector(tmp_path):
    """The decode connector's real load path, three claimants of one chunked prefill."""
    from tests.kvtransfer.test_kv_connector import LAYERS, _consumer, _load, _stage_two_steps

    path, src = _stage_two_steps(tmp_path)
    paths = claims.split(path, 3)
    for i, claim in enumerate(paths):
        consumer, dst = _consumer(tmp_path)
        _load(consumer, LoadSpec(request_id=f"{i}_req-1", segment_path=str(claim),
                                 dst_block_ids=(7, 2, 9), first_block=0))
        assert consumer.get_block_ids_with_load_errors() == set()
        for name in LAYERS:
            for d, s in zip((7, 2, 9), (5, 1, 6)):
                assert torch.equal(dst[name][d], src[name][s])
        assert not claim.exists()
        assert claims.num_claimants(paths[-1]) == (2 - i if i < 2 else 0)
    assert list_segments(tmp_path) == []
    pool = pool_dir_for(tmp_path, "prefill-0")
    assert [os.stat(p).st_nlink for p in pool.iterdir() if p.name[:1].isdigit()] == [1]
