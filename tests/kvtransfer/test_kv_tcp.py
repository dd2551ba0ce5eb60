"""TCP transport: byte-exact fetches, refusals, and ack-then-unlink ownership."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from cluster.wire import KVTransferError
from kvtransfer.staging import HEADER_BYTES, StagingSegment, list_segments
from kvtransfer.tcp import (
    FetchReply,
    FetchRequest,
    TransferServer,
    _recv_msg,
    _send_msg,
    fetch_segment,
)

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


def _wait_until(predicate, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_fetch_is_byte_exact_and_producer_unlinks_after_ack(server, consumer_dir, make_segment):
    src, payload = make_segment("r1", staging_dir=server.staging_dir)
    expected = src.read_bytes()

    dest, nbytes = fetch_segment("127.0.0.1", server.port, src.name, EPOCH, consumer_dir, 5.0)

    assert nbytes == len(expected) and dest.read_bytes() == expected
    seg = StagingSegment.open(dest)
    assert seg.header.is_complete
    assert bytes(seg.buffer()[HEADER_BYTES:]) == payload
    seg.close()
    # The ack hands ownership over: the producer's copy goes.
    assert _wait_until(lambda: not src.exists())
    assert server.num_served == 1


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
    with socket.create_connection(("127.0.0.1", server.port), timeout=5.0) as sock:
        _send_msg(sock, FetchRequest(segment_name=src.name, producer_epoch=EPOCH))
        reply = _recv_msg(sock, FetchReply)
        assert reply.ok and reply.nbytes == nbytes
        got = 0
        while got < nbytes // 2:
            got += len(sock.recv(nbytes // 2 - got))
    # Closed without the ack: the producer still owns (and keeps) the segment.
    time.sleep(0.2)
    assert src.exists() and server.num_served == 0

    # ...so a later consumer can still fetch it, and only that ack moves ownership.
    dest, _ = fetch_segment("127.0.0.1", server.port, src.name, EPOCH, consumer_dir, 5.0)
    assert dest.exists()
    assert _wait_until(lambda: not src.exists())


def test_producer_dying_mid_transfer_removes_consumer_copy(tmp_path, consumer_dir, make_segment):
    """A server that sends half the bytes and closes: the partial local copy is removed."""
    src, _ = make_segment("r1")
    data = src.read_bytes()
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def half_server() -> None:
        conn, _ = listener.accept()
        with conn:
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
