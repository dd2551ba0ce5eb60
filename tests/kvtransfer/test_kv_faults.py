"""TCP transfer faults between real processes: a sender killed (or frozen) mid-stream, a
receiver killed (or frozen) mid-stream, and a lost acknowledgement.

Each side that is made to fail runs as a child process with a small fault-injection script
(a monkeypatched socket method, in the child only); the test then SIGKILLs or SIGSTOPs it.
Every case ends with a defined outcome within the configured timeout and with no segment
left on either side once the owner's clean-up (lease, orphan sweep) has run.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cluster.wire import KVTransferError
from kvtransfer.staging import (
    HEADER_BYTES,
    SegmentLayout,
    StagingSegment,
    list_segments,
    pool_dir_for,
    reclaim_expired,
    reclaim_orphans,
)
from kvtransfer.tcp import TransferServer, fetch_segment, reclaim_orphan_fetches

ROOT = Path(__file__).resolve().parents[2]
EPOCH = "epoch-1"
ENGINE_ID = "p0"
TIMEOUT_S = 1.0  # the transfer timeout under test, on both ends
MARGIN_S = 4.0  # scheduling slack on a loaded 2-core machine; a hang guard, not a benchmark
LEASE_S = 60.0
# Big enough that the sender is still inside sendfile when the receiver stops reading
# (loopback socket buffers hold a few MiB).
BIG = SegmentLayout(layer_names=["l0", "l1"], bytes_per_block=[1 << 20, 1 << 20], num_blocks=24,
                    num_tokens=24 * 16, block_size=16)


class Child:
    """A fault-injection script in its own interpreter, talking in lines on stdout."""

    def __init__(self, script: str, *args: object, log: Path):
        self._log = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", script, *map(str, args)], cwd=ROOT, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
            env={**os.environ, "PYTHONPATH": str(ROOT)})
        self.log = log

    def expect(self, prefix: str, timeout_s: float = 30.0) -> str:
        """The rest of the next stdout line, which must start with `prefix`."""
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        line = self.proc.stdout.readline() if ready else ""
        assert line.startswith(prefix), (
            f"expected {prefix!r} from the child, got {line!r}; stderr:\n{self.log.read_text()}")
        return line[len(prefix):].strip()

    def send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        self._log.close()


@pytest.fixture
def children():
    started: list[Child] = []
    yield started
    for child in started:
        child.close()


def _elapsed_until(predicate, timeout_s: float) -> float:
    """Seconds until `predicate()` holds; fails the test after `timeout_s`."""
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout_s, "timed out waiting"
        time.sleep(0.01)
    return time.monotonic() - started


def _report(case: str, seconds: float) -> None:
    print(f"\nfault timing | {case} | {seconds:.3f} s")


# ----------------------------------------------------------------------------- sender dies
PRODUCER = """
import socket, sys, time
from pathlib import Path
from kvtransfer.staging import SegmentLayout, SegmentPool, StagingSegment, segment_path
from kvtransfer.tcp import TransferServer
from tests.kvtransfer.conftest import fill_pattern

staging, epoch, engine_id = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
pool = SegmentPool(staging, engine_id)  # the producer's pool marks it alive (its pid)
layout = SegmentLayout(layer_names=["l0", "l1"], bytes_per_block=[65536, 65536], num_blocks=16,
                       num_tokens=256, block_size=16)
seg = StagingSegment.create(segment_path(staging, engine_id, "r1"), layout, pool)
fill_pattern(seg, 0)
seg.mark_complete()
seg.close()

original = socket.socket.sendfile
def sendfile_half_then_freeze(self, file, offset=0, count=None):
    original(self, file, offset, count // 2)
    print("half-sent", flush=True)
    time.sleep(3600)  # the test kills or stops this process here
socket.socket.sendfile = sendfile_half_then_freeze

server = TransferServer(staging, epoch, host="127.0.0.1").start()
print(f"serving {server.port} {seg.path.name}", flush=True)
time.sleep(3600)
"""


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "frozen"])
def test_sender_dies_mid_stream(tmp_path, children, sig):
    """Killed: the consumer sees the connection close at once. Frozen (a host gone silent,
    no FIN): the consumer's timeout ends the wait. Either way it raises KVTransferError and
    keeps no partial copy; the dead producer's segment and pool go with the orphan sweep
    that the next producer on the host runs."""
    producer_dir, consumer_dir = tmp_path / "producer", tmp_path / "consumer"
    producer_dir.mkdir()
    consumer_dir.mkdir()
    producer = Child(PRODUCER, producer_dir, EPOCH, ENGINE_ID, log=tmp_path / "producer.log")
    children.append(producer)
    port, name = producer.expect("serving ").split()
    outcome: dict[str, object] = {}

    def fetch() -> None:
        try:
            fetch_segment("127.0.0.1", int(port), name, EPOCH, consumer_dir, TIMEOUT_S)
        except KVTransferError as e:
            outcome["error"] = e
        outcome["at"] = time.monotonic()

    thread = threading.Thread(target=fetch)
    thread.start()
    producer.expect("half-sent")
    assert "at" not in outcome  # the consumer is waiting for the second half
    producer.signal(sig)
    faulted = time.monotonic()
    thread.join(timeout=TIMEOUT_S + MARGIN_S)
    assert not thread.is_alive(), "fetch_segment hung after the sender died"
    seconds = outcome["at"] - faulted
    _report(f"sender {'killed' if sig == signal.SIGKILL else 'frozen'} mid-stream -> "
            f"consumer error", seconds)

    assert isinstance(outcome.get("error"), KVTransferError)
    assert seconds < TIMEOUT_S + MARGIN_S
    assert list(consumer_dir.iterdir()) == []  # no partial copy
    # The producer is gone; its staged segment and pool are orphans on its host.
    producer.close()
    assert len(list_segments(producer_dir)) == 1
    assert reclaim_orphans(producer_dir) == 1
    assert list_segments(producer_dir) == []
    assert not pool_dir_for(producer_dir, ENGINE_ID).exists()


# --------------------------------------------------------------------------- receiver dies
CONSUMER = """
import os, socket, sys, time
from pathlib import Path
from kvtransfer import tcp
from kvtransfer.staging import StagingSegment

port, name, epoch, dest_dir, fault = sys.argv[1:6]
held = []

if fault == "mid-stream":
    original_recv_into = socket.socket.recv_into
    received = 0
    def recv_into_then_freeze(self, buffer, nbytes=0, flags=0):
        global received
        n = original_recv_into(self, buffer, nbytes, flags)
        received += n
        if received >= 1 << 20:
            print("mid-stream", flush=True)
            time.sleep(3600)  # the test kills or stops this process here
        return n
    socket.socket.recv_into = recv_into_then_freeze
else:
    original_sendall = socket.socket.sendall
    def sendall_without_ack(self, data, flags=0):
        if bytes(data) != tcp.ACK_CONSUMED:
            return original_sendall(self, data, flags)
        if fault == "die-before-ack":
            print("received-all", flush=True)
            time.sleep(3600)  # the test kills this process here
        # "ack-lost": the ack vanishes and the connection stays open (a partition); a
        # duplicate descriptor keeps fetch_segment's close from reaching the producer.
        held.append(os.dup(self.fileno()))
    socket.socket.sendall = sendall_without_ack

dest, nbytes = tcp.fetch_segment("127.0.0.1", int(port), name, epoch, Path(dest_dir), 5.0)
seg = StagingSegment.open(dest)
print(f"fetched {dest} {nbytes} {int(seg.header.is_complete)}", flush=True)
seg.close()
if sys.stdin.readline().strip() == "consume":
    StagingSegment.open(dest).recycle()  # what the decode's connector does after loading
    print("consumed", flush=True)
"""


@pytest.fixture
def producer(tmp_path, make_segment):
    """A TransferServer in this process over a staged segment of BIG's layout."""
    staging = tmp_path / "producer"
    staging.mkdir()
    path, payload = make_segment("r1", engine_id=ENGINE_ID, layout=BIG, staging_dir=staging)
    server = TransferServer(staging, EPOCH, host="127.0.0.1", timeout_s=TIMEOUT_S).start()
    yield server, path, payload
    server.close()


def _start_consumer(tmp_path: Path, children: list, server: TransferServer, path: Path,
                    mode: str) -> tuple[Child, Path]:
    """A consumer process fetching `path` from `server`, misbehaving as `mode` says."""
    consumer_dir = tmp_path / "consumer"
    consumer_dir.mkdir()
    consumer = Child(CONSUMER, server.port, path.name, EPOCH, consumer_dir, mode,
                     log=tmp_path / "consumer.log")
    children.append(consumer)
    return consumer, consumer_dir


def _expire_lease(staging: Path) -> int:
    return reclaim_expired(staging, LEASE_S, ENGINE_ID, now=time.time() + LEASE_S + 1)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "frozen"])
def test_receiver_dies_mid_stream(tmp_path, children, producer, sig):
    """The producer's send fails (killed: reset) or stalls (frozen: its timeout); its server
    thread ends within the timeout, it keeps the segment, and the lease reclaims it. The dead
    consumer's partial copy goes with the consumer-side orphan sweep."""
    server, path, _ = producer
    consumer, consumer_dir = _start_consumer(tmp_path, children, server, path, "mid-stream")
    consumer.expect("mid-stream")
    assert server.num_active == 1
    consumer.signal(sig)
    seconds = _elapsed_until(lambda: server.num_active == 0, TIMEOUT_S + MARGIN_S)
    _report(f"receiver {'killed' if sig == signal.SIGKILL else 'frozen'} mid-stream -> "
            f"producer thread free", seconds)

    assert server.num_failed == 1 and server.num_served == 0
    assert path.exists(), "the producer let go of a segment nobody acknowledged"
    assert _expire_lease(server.staging_dir) == 1
    assert list_segments(server.staging_dir) == []
    # The consumer's partial copy is an orphan once its process is gone.
    consumer.close()
    assert len(list_segments(consumer_dir)) == 1
    assert reclaim_orphan_fetches(consumer_dir) == 1
    assert list_segments(consumer_dir) == []


def test_consumer_dies_after_the_last_byte_before_the_ack(tmp_path, children, producer):
    """The ack never comes because the consumer died: the producer keeps the segment until
    the lease; the consumer's complete but unowned copy goes with the orphan sweep."""
    server, path, _ = producer
    consumer, consumer_dir = _start_consumer(tmp_path, children, server, path, "die-before-ack")
    consumer.expect("received-all")
    consumer.signal(signal.SIGKILL)
    seconds = _elapsed_until(lambda: server.num_active == 0, TIMEOUT_S + MARGIN_S)
    _report("consumer killed before its ack -> producer thread free", seconds)

    assert server.num_failed == 1 and server.num_served == 0
    assert path.exists()
    assert _expire_lease(server.staging_dir) == 1
    assert list_segments(server.staging_dir) == []
    consumer.close()
    assert reclaim_orphan_fetches(consumer_dir) == 1
    assert list_segments(consumer_dir) == []


def test_lost_ack_leaves_each_side_its_own_copy_until_it_lets_go(tmp_path, children, producer):
    """The ack is lost on the way while the connection stays open (a partition): the
    consumer's copy is complete and its own, so the fetch succeeds; the producer gives up
    waiting after its timeout, keeps its segment, and its lease reclaims it."""
    server, path, payload = producer
    consumer, consumer_dir = _start_consumer(tmp_path, children, server, path, "ack-lost")
    dest, nbytes, complete = consumer.expect("fetched ").split()
    dest = Path(dest)
    assert complete == "1" and int(nbytes) == HEADER_BYTES + len(payload)
    seg = StagingSegment.open(dest)
    assert bytes(seg.buffer()[HEADER_BYTES:]) == payload
    seg.close()
    # The producer waits for the ack on an open connection, and gives up after its timeout.
    seconds = _elapsed_until(lambda: server.num_active == 0, TIMEOUT_S + MARGIN_S)
    _report("ack lost, connection open -> producer thread free", seconds)

    assert server.num_failed == 1 and server.num_served == 0
    assert path.exists(), "the producer let go without an ack"
    assert _expire_lease(server.staging_dir) == 1
    assert list_segments(server.staging_dir) == []
    # The live consumer still owns its copy; it loads it and lets go of it.
    assert reclaim_orphan_fetches(consumer_dir) == 0
    consumer.send("consume")
    consumer.expect("consumed")
    assert list_segments(consumer_dir) == []
