"""TCP transport: byte-exact fetches, refusals, ack-then-recycle ownership, timeouts.

Faults between real processes (killed or frozen ends, lost acks) are in test_kv_faults.py.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest

from cluster.wire import KVTransferError
from kvtransfer import auth as kv_auth
from kvtransfer.staging import (
    HEADER_BYTES,
    SegmentLayout,
    SegmentPool,
    StagingSegment,
    list_segments,
    segment_nbytes,
    segment_path,
    size_class,
)
from kvtransfer.tcp import (
    FETCHED_PREFIX,
    FetchReply,
    FetchRequest,
    TransferServer,
    _recv_msg,
    _send_msg,
    fetch_segment,
    reclaim_orphan_fetches,
)
from tests.kvtransfer.conftest import fill_pattern, wait_until

EPOCH = "epoch-1"


@pytest.fixture
def server(tmp_path):
    producer_dir = tmp_path / "producer"
    producer_dir.mkdir()
    srv = TransferServer(producer_dir, EPOCH, host="127.0.0.1").start()
    yield srv
    srv.close()


@pytest.fixture
def consumer_dir(tmp_path) -> Path:
    path = tmp_path / "consumer"
    path.mkdir()
    return path


def test_fetch_is_byte_exact_and_producer_unlinks_after_ack(server, consumer_dir, make_segment):
    src, payload = make_segment("r1", staging_dir=server.staging_dir)
    expected = src.read_bytes()

    dest, nbytes = fetch_segment("127.0.0.1", server.port, src.name, EPOCH, consumer_dir, 5.0)

    assert nbytes == len(expected) and dest.read_bytes()[:nbytes] == expected
    assert dest.stat().st_size == size_class(nbytes)  # shaped like a pooled file
    seg = StagingSegment.open(dest)
    assert seg.header.is_complete
    assert bytes(seg.buffer()[HEADER_BYTES:]) == payload
    seg.close()
    # The ack hands ownership over: the producer's copy goes.
    assert wait_until(lambda: not src.exists())
    assert wait_until(lambda: server.num_served == 1)  # counted just after the file goes


def test_epoch_mismatch_refused(server, consumer_dir, make_segment):
    src, _ = make_segment("r1", staging_dir=server.staging_dir)
    with pytest.raises(KVTransferError, match="epoch mismatch"):
        fetch_segment("127.0.0.1", server.port, src.name, "old-epoch", consumer_dir, 5.0)
    assert src.exists()
    assert list(consumer_dir.iterdir()) == []


def test_missing_segment_refused(server, consumer_dir):
    with pytest.raises(KVTransferError, match="does not exist"):
        fetch_segment("127.0.0.1", server.port, "pdserve-kv-p0-gone", EPOCH, consumer_dir, 5.0)
    assert list(consumer_dir.iterdir()) == []


def test_incomplete_segment_refused(server, consumer_dir, make_segment):
    src, _ = make_segment("r1", complete=False, staging_dir=server.staging_dir)
    with pytest.raises(KVTransferError, match="not complete"):
        fetch_segment("127.0.0.1", server.port, src.name, EPOCH, consumer_dir, 5.0)
    assert src.exists()
    assert list(consumer_dir.iterdir()) == []


@pytest.mark.parametrize("name", ["../etc/passwd", "not-a-segment"])
def test_names_outside_staging_refused(server, consumer_dir, name):
    with pytest.raises(KVTransferError, match="invalid segment name"):
        fetch_segment("127.0.0.1", server.port, name, EPOCH, consumer_dir, 5.0)


def test_client_dying_mid_transfer_leaves_segment_with_producer(server, consumer_dir, make_segment):
    src, _ = make_segment("r1", staging_dir=server.staging_dir)
    nbytes = src.stat().st_size
    assert server.num_active == 0
    with socket.create_connection(("127.0.0.1", server.port), timeout=5.0) as sock:
        kv_auth.connect(sock, kv_auth.kv_secret())
        _send_msg(sock, FetchRequest(segment_name=src.name, producer_epoch=EPOCH))
        reply = _recv_msg(sock, FetchReply)
        assert reply.ok and reply.nbytes == nbytes
        got = 0
        while got < nbytes // 2:
            got += len(sock.recv(nbytes // 2 - got))
    # Closed without the ack: the producer still owns (and keeps) the segment.
    assert wait_until(lambda: server.num_failed == 1 and server.num_active == 0)
    assert src.exists() and server.num_served == 0

    # ...so a later consumer can still fetch it, and only that ack moves ownership.
    dest, _ = fetch_segment("127.0.0.1", server.port, src.name, EPOCH, consumer_dir, 5.0)
    assert dest.exists()
    assert wait_until(lambda: not src.exists())


def test_producer_dying_mid_transfer_removes_consumer_copy(tmp_path, consumer_dir, make_segment):
    """A server that sends half the bytes and closes: the partial local copy is removed."""
    src, _ = make_segment("r1")
    data = src.read_bytes()
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def half_server() -> None:
        conn, _ = listener.accept()
        with conn:
            assert kv_auth.accept(conn, kv_auth.kv_secret())
            _recv_msg(conn, FetchRequest)
            _send_msg(conn, FetchReply(ok=True, nbytes=len(data)))
            conn.sendall(data[: len(data) // 2])

    thread = threading.Thread(target=half_server)
    thread.start()
    try:
        with pytest.raises(KVTransferError, match="closed"):
            fetch_segment("127.0.0.1", port, src.name, EPOCH, consumer_dir, 5.0)
    finally:
        thread.join()
        listener.close()
    assert list_segments(consumer_dir) == []
    assert list(consumer_dir.iterdir()) == []


def test_pooled_file_larger_than_its_segment_sends_only_the_segment(tmp_path, consumer_dir):
    """A recycled segment file is larger than its segment: the server sends the header's
    size, not the file's, and after the ack puts the file back into its producer's pool."""
    producer_dir = tmp_path / "producer"
    producer_dir.mkdir()
    pool = SegmentPool(producer_dir, "p0-e1", max_bytes=64 << 20)
    layout = SegmentLayout(layer_names=["l0"], bytes_per_block=[1000], num_blocks=70,
                           num_tokens=1100, block_size=16)
    seg = StagingSegment.create(segment_path(producer_dir, "p0-e1", "r1"), layout, pool)
    payload = fill_pattern(seg, 3)
    seg.mark_complete()
    seg.close()
    src = seg.path
    assert src.stat().st_size > segment_nbytes(layout)
    server = TransferServer(producer_dir, EPOCH, host="127.0.0.1").start()
    try:
        dest, nbytes = fetch_segment("127.0.0.1", server.port, src.name, EPOCH, consumer_dir, 5.0)
        assert nbytes == segment_nbytes(layout)
        copy = StagingSegment.open(dest)
        assert copy.header.is_complete and bytes(copy.buffer()[HEADER_BYTES:]) == payload
        copy.close()
        assert wait_until(lambda: server.num_served == 1)
        assert list_segments(producer_dir) == [] and pool.pooled_bytes() == size_class(nbytes)
    finally:
        server.close()
        pool.close()


def test_segment_taken_back_during_the_send_is_not_delivered(server, consumer_dir, make_segment,
                                                             monkeypatch):
    """Recycled files get reused: a segment the producer took back (lease) while sending it
    may be overwritten under sendfile, so the server says so and the client drops its copy."""
    src, _ = make_segment("r1", staging_dir=server.staging_dir)
    original = socket.socket.sendfile

    def sendfile_then_lease_expires(self, file, offset=0, count=None):
        sent = original(self, file, offset, count)
        src.rename(src.with_name("recycled"))  # what recycle() does, into a pool
        return sent

    monkeypatch.setattr(socket.socket, "sendfile", sendfile_then_lease_expires)
    with pytest.raises(KVTransferError, match="back during the transfer"):
        fetch_segment("127.0.0.1", server.port, src.name, EPOCH, consumer_dir, 5.0)
    assert list(consumer_dir.iterdir()) == []
    assert wait_until(lambda: server.num_failed == 1)
    assert server.num_served == 0


def test_stalled_consumer_holds_a_server_thread_for_at_most_its_timeout(tmp_path, make_segment):
    producer_dir = tmp_path / "producer"
    producer_dir.mkdir()
    server = TransferServer(producer_dir, EPOCH, host="127.0.0.1", timeout_s=0.3).start()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5.0):
            assert wait_until(lambda: server.num_active == 1)
            started = time.monotonic()  # connected, never sends its request
            assert wait_until(lambda: server.num_active == 0, timeout_s=5.0)
            assert time.monotonic() - started < 3.0
        assert server.num_failed == 1
    finally:
        server.close()
    with pytest.raises(ValueError):
        TransferServer(producer_dir, EPOCH, timeout_s=0)


def test_orphan_sweep_removes_only_copies_of_dead_consumers(consumer_dir):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    orphan = consumer_dir / f"{FETCHED_PREFIX}{dead.stdout.strip()}-p0-r1"
    mine = consumer_dir / f"{FETCHED_PREFIX}{os.getpid()}-p0-r2"
    producers = consumer_dir / "pdserve-kv-p0-r3"
    for path in (orphan, mine, producers):
        path.write_bytes(b"x")
    assert reclaim_orphan_fetches(consumer_dir) == 1
    assert sorted(list_segments(consumer_dir)) == sorted([mine, producers])
