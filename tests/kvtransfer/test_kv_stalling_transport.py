"""The fault harness's transfer stall (kvtransfer.testing.StallingTransport): with the switch
off it delivers like any transport; with it on, half a segment arrives and then nothing,
so the consumer's wait ends at its timeout with KVTransferError, its partial copy removed,
and the producer still holding the segment (its lease reclaims it)."""

from __future__ import annotations

import time

import pytest

from cluster.config import KVTransferSettings
from cluster.wire import KVTransferError
from kvtransfer.handle import TransferDescriptor
from kvtransfer.testing import TRANSFER_STALL_SWITCH, StallingTransport, transfer_stall_requested


def _descriptor(path) -> TransferDescriptor:
    return TransferDescriptor(segment_path=str(path), num_tokens=40, node_id="n", tcp_host="127.0.0.1",
                              tcp_port=0, producer_id="p0", producer_epoch="e")


def test_the_switch_is_a_file_named_by_the_environment(tmp_path, monkeypatch):
    switch = tmp_path / "stall"
    monkeypatch.delenv(TRANSFER_STALL_SWITCH, raising=False)
    assert not transfer_stall_requested()
    monkeypatch.setenv(TRANSFER_STALL_SWITCH, str(switch))
    assert not transfer_stall_requested()  # named, but off until the file exists
    switch.touch()
    assert transfer_stall_requested()


def test_a_stalled_transfer_fails_at_the_timeout_and_leaves_no_partial_copy(
        tmp_path, monkeypatch, make_segment):
    switch = tmp_path / "stall"
    monkeypatch.setenv(TRANSFER_STALL_SWITCH, str(switch))
    producer_dir, consumer_dir = tmp_path / "producer", tmp_path / "consumer"
    producer_dir.mkdir()
    consumer_dir.mkdir()
    transport = StallingTransport(KVTransferSettings(), "decode-0")

    path, payload = make_segment("r1", staging_dir=producer_dir)
    dest, nbytes = transport.fetch(_descriptor(path), consumer_dir, timeout_s=0.2)
    assert dest.read_bytes()[:nbytes].find(payload[:64]) >= 0 and transport.num_stalled == 0

    path, _ = make_segment("r2", staging_dir=producer_dir, seed=1)
    switch.touch()
    t0 = time.monotonic()
    with pytest.raises(KVTransferError, match="no bytes for 0.3 s"):
        transport.fetch(_descriptor(path), consumer_dir, timeout_s=0.3)
    assert 0.3 <= time.monotonic() - t0 < 1.0
    assert transport.num_stalled == 1
    assert [p.name for p in consumer_dir.iterdir()] == [dest.name]  # r2's half copy is gone
    assert path.exists()  # the producer keeps it: its lease reclaims it
