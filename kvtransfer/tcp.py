"""TCP transport: a consumer on another host fetches a staged segment from the producer's node.

Wire protocol (no pickle; msgpack headers, raw payload)::

    both              the deployment secret's HMAC challenge-response (kvtransfer/auth.py):
                      a peer that fails it is refused before its request is even read
    client → server   u32 length | msgpack FetchRequest
    server → client   u32 length | msgpack FetchReply
                      (ok) nbytes of segment bytes, sent with sendfile (no user-space copy);
                           nbytes = segment_nbytes(header.layout), the file may be larger
                      1 byte: SENT_INTACT if the segment stayed the server's for the whole
                           send, SENT_STALE if it was taken back meanwhile (lease, release)
    client → server   1 byte: ACK_CONSUMED once the copy is complete and the client's own

Transfer states, per fetch (`kvtransfer.lifecycle.FETCH_TRANSITIONS`, checked by
`fetch_segment`)::

    REQUESTED ──reply ok──▶ STREAMING ──all bytes, intact──▶ RECEIVED ──ack──▶ CONSUMED
        │                      │                                │       (server recycles its file)
        │                      │                                └─ack lost──▶ RECEIVED (server keeps
        │                      │                                   its file until the lease)
        └─reply error──▶ FAILED└─short read / timeout / stale──▶ FAILED (client removes its copy;
                                                                 server keeps the segment until
                                                                 its lease expires)

Ownership and faults. The server keeps its segment until the ack arrives, so at every
moment at least one side holds the KV, and neither side ever frees the other's file:

- **Producer dies mid-stream** (or its host goes silent): the client sees the connection
  close, or no bytes for `timeout_s`, raises `KVTransferError` and removes its partial copy.
- **Consumer dies mid-stream**: the server's send fails (or stalls for at most `timeout_s`);
  it keeps the segment (a retry can still fetch it, else its lease reclaims it). The dead
  consumer's partial copy carries its pid in its name; `reclaim_orphan_fetches` on that
  host removes it.
- **Lost ack**: once the client holds all bytes and the server's SENT_INTACT, its copy is
  complete and its own, so `fetch_segment` returns it whether or not the ack gets through.
  The ack only lets the producer free its segment early; without it the server waits at
  most `timeout_s`, keeps the segment, and the lease reclaims it. The cost of a lost ack is
  a second, idle copy for one lease, never a missing one. (A consumer that dies after the
  ack but before loading leaves an orphan copy, as above.)

Timeouts: `timeout_s` (client and server alike) bounds every single wait for the peer
(connect, each read, each send, the verdict, the ack), not the whole transfer, so a slow
but live transfer of any size proceeds while a dead or stalled peer is noticed within
`timeout_s`.

Why the verdict byte: producers recycle consumed segment files (`staging.recycle`), so a
segment taken back while being sent (its lease expired during a slow send) can be handed
to a new request and overwritten under ``sendfile``. The server checks after the send that
the path still names the file it sent; if not, the client discards what it received.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import socket
import socketserver
import struct
import threading
import time
from pathlib import Path
from typing import BinaryIO

import msgspec

from cluster.wire import KVTransferError
from kvtransfer import auth as kv_auth
from kvtransfer.lifecycle import FETCH_TRANSITIONS, FetchState, Lifecycle
from kvtransfer.names import is_segment_name, process_alive, SEGMENT_PREFIX
from kvtransfer.pool import SegmentPool
from kvtransfer.recycle import recycle, size_class
from kvtransfer.segment import create_mapped_file, SegmentHeader, StagingSegment

_LEN = struct.Struct("<I")
SENT_INTACT = b"\x01"
SENT_STALE = b"\x00"
ACK_CONSUMED = b"\x01"
_MAX_HEADER = 64 * 1024
# Outside every producer's owner-tag namespace: when consumer and producer share a staging
# dir (one host, transport tcp), the producer must not count or reclaim a fetched copy.
FETCHED_PREFIX = f"{SEGMENT_PREFIX}fetched-"
_FETCHED_PID = re.compile(rf"^{re.escape(FETCHED_PREFIX)}(\d+)-")


class FetchRequest(msgspec.Struct, frozen=True):
    segment_name: str
    producer_epoch: str


class FetchReply(msgspec.Struct, frozen=True):
    ok: bool
    nbytes: int = 0
    error: str = ""


def _send_msg(sock: socket.socket, msg: msgspec.Struct) -> None:
    body = msgspec.msgpack.encode(msg)
    sock.sendall(_LEN.pack(len(body)) + body)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise KVTransferError("transfer connection closed early")
        got += k
    return bytes(buf)


def _recv_msg(sock: socket.socket, typ: type) -> msgspec.Struct:
    (length,) = _LEN.unpack(_recv_exact(sock, _LEN.size))
    if length > _MAX_HEADER:
        raise KVTransferError("transfer header too large")
    try:
        return msgspec.msgpack.decode(_recv_exact(sock, length), type=typ)
    except msgspec.DecodeError as e:
        raise KVTransferError(f"malformed transfer header: {e}") from e


class TransferServer:
    """Serves this node's staged segments to remote consumers (a thread per connection).

    `timeout_s` bounds each wait for a consumer (see the module docstring), so a consumer
    that dies or stalls holds a server thread for at most that long.
    """

    def __init__(self, staging_dir: Path, producer_epoch: str, host: str = "127.0.0.1",
                 port: int = 0, timeout_s: float = 30.0, secret: bytes | None = None):
        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        self.staging_dir = Path(staging_dir)
        self.producer_epoch = producer_epoch
        self.timeout_s = timeout_s
        self._secret = secret if secret is not None else kv_auth.kv_secret()
        self.refusals = kv_auth.RefusalCounter(parent=kv_auth.REFUSALS)  # failed authentication
        server = self

        class _Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                server._serve_one(self.request)

        class _Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = _Server((host, port), _Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="pdserve-kv-tcp",
                                        daemon=True)
        self._lock = threading.Lock()
        self.num_active = 0  # connections being served now
        self.num_served = 0  # fetches acknowledged (ownership passed to a consumer)
        self.num_failed = 0  # connections that ended without an ack (the segment stays)

    def start(self) -> TransferServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _count(self, active: int = 0, served: int = 0, failed: int = 0) -> None:
        with self._lock:
            self.num_active += active
            self.num_served += served
            self.num_failed += failed

    def _serve_one(self, sock: socket.socket) -> None:
        sock.settimeout(self.timeout_s)
        self._count(active=1)
        served = False
        try:
            # Nothing is read from a peer that has not proven the deployment secret.
            if kv_auth.accept(sock, self._secret, self.refusals):
                served = self._serve(sock)
        except (KVTransferError, OSError):
            pass  # the consumer reports its own failure; the lease reclaims the segment
        finally:
            self._count(active=-1, served=int(served), failed=int(not served))
            sock.close()

    def _serve(self, sock: socket.socket) -> bool:
        """One fetch; True when the consumer acknowledged it (and the file was recycled)."""
        req = _recv_msg(sock, FetchRequest)
        assert isinstance(req, FetchRequest)
        name = req.segment_name
        if req.producer_epoch != self.producer_epoch:
            _send_msg(sock, FetchReply(ok=False, error="producer restarted (epoch mismatch)"))
            return False
        if not is_segment_name(name):
            _send_msg(sock, FetchReply(ok=False, error="invalid segment name"))
            return False
        path = self.staging_dir / name
        try:
            with open(path, "rb") as f:
                header = self._send_segment(sock, path, f)
        except FileNotFoundError:
            _send_msg(sock, FetchReply(ok=False, error=f"staged KV segment {name} does not exist"))
            return False
        if header is None or _recv_exact(sock, 1) != ACK_CONSUMED:
            return False
        recycle(path, header.pool_dir)  # ownership passed to the consumer
        return True

    def _send_segment(self, sock: socket.socket, path: Path, f: BinaryIO) -> SegmentHeader | None:
        """Reply and stream the segment open as `f`; its header when it went out intact."""
        try:
            seg = StagingSegment.open(path)
        except KVTransferError as e:
            _send_msg(sock, FetchReply(ok=False, error=str(e)))
            return None
        header = seg.header
        nbytes = seg.nbytes  # the segment, not the (possibly larger, recycled) file
        seg.close()
        if not header.is_complete:
            _send_msg(sock, FetchReply(ok=False, error=f"segment {path.name} is not complete"))
            return None
        _send_msg(sock, FetchReply(ok=True, nbytes=nbytes))
        sock.sendfile(f, 0, nbytes)
        intact = _names_file(path, f.fileno())
        sock.sendall(SENT_INTACT if intact else SENT_STALE)
        return header if intact else None


def _names_file(path: Path, fd: int) -> bool:
    """Whether `path` still names the open file `fd` (it was not recycled meanwhile)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def fetched_path(dest_dir: Path, segment_name: str) -> Path:
    """Where this process puts its copy of `segment_name` (the pid marks its owner)."""
    return Path(dest_dir) / f"{FETCHED_PREFIX}{os.getpid()}-{segment_name.removeprefix(SEGMENT_PREFIX)}"


def fetch_segment(host: str, port: int, segment_name: str, producer_epoch: str,
                  dest_dir: Path, timeout_s: float, pool: SegmentPool | None = None,
                  pool_lock: threading.Lock | None = None,
                  secret: bytes | None = None) -> tuple[Path, int]:
    """Copy a remote segment into `dest_dir`; returns (local path, segment bytes).

    Raises KVTransferError, and leaves nothing in `dest_dir`, unless the whole segment
    arrived intact; the returned copy is the caller's even if the ack is lost. With `pool`
    (the consumer's own; `pool_lock` serializes taking files from it), the bytes land in a
    recycled, already-mapped file instead of fresh pages, and the copy names that pool as
    the one its file goes back to once loaded. `secret`: the deployment's KV secret
    (default: `kv_auth.kv_secret()`), proven before the request is sent.
    """
    dest = fetched_path(dest_dir, segment_name)
    state = Lifecycle(FETCH_TRANSITIONS, FetchState.REQUESTED, segment_name)  # checked moves
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            kv_auth.connect(sock, secret if secret is not None else kv_auth.kv_secret())
            _send_msg(sock, FetchRequest(segment_name=segment_name, producer_epoch=producer_epoch))
            reply = _recv_msg(sock, FetchReply)
            assert isinstance(reply, FetchReply)
            if not reply.ok:
                raise KVTransferError(f"producer refused {segment_name}: {reply.error}")
            state.move_to(FetchState.STREAMING)
            _receive(sock, dest, reply.nbytes, pool, pool_lock)
            if _recv_exact(sock, 1) != SENT_INTACT:
                raise KVTransferError(f"producer took {segment_name} back during the transfer")
            state.move_to(FetchState.RECEIVED)  # the copy is ours from here on
            try:
                sock.sendall(ACK_CONSUMED)
                state.move_to(FetchState.CONSUMED)
            except OSError:
                pass  # lost ack: the copy stands, the producer's lease reclaims its own
    except OSError as e:
        if state.state is FetchState.RECEIVED:
            return dest, reply.nbytes  # closing after a lost ack: the copy is complete
        state.move_to(FetchState.FAILED)
        dest.unlink(missing_ok=True)
        raise KVTransferError(f"fetching {segment_name} from {host}:{port} failed: {e}") from e
    except KVTransferError:
        state.move_to(FetchState.FAILED)
        dest.unlink(missing_ok=True)
        raise
    return dest, reply.nbytes


def _recv_into_view(sock: socket.socket, view: memoryview, nbytes: int) -> None:
    got = 0
    while got < nbytes:
        k = sock.recv_into(view[got:], min(nbytes - got, 4 << 20))
        if k == 0:
            raise KVTransferError(f"connection closed after {got} of {nbytes} bytes")
        got += k


def _receive(sock: socket.socket, dest: Path, nbytes: int, pool: SegmentPool | None,
             lock: threading.Lock | None) -> None:
    """Receive the segment into `dest`: a recycled file of `pool`, which the copy then
    names as where its file goes once loaded; without a pool, a new file sized like a
    pooled one (its tail stays sparse)."""
    if pool is None:
        with create_mapped_file(dest, size_class(nbytes), exclusive=False) as mm:
            _recv_into(sock, mm, nbytes)
        return
    with lock or contextlib.nullcontext():
        mm = pool.acquire(dest, nbytes)
    _recv_into(sock, mm, nbytes)
    seg = StagingSegment.open(dest, pool.maps)  # checks the header that arrived
    seg.adopt(pool)
    seg.close()


def _recv_into(sock: socket.socket, mm: mmap.mmap, nbytes: int) -> None:
    view = memoryview(mm)[:nbytes]
    try:
        _recv_into_view(sock, view, nbytes)
    finally:
        view.release()


def reclaim_orphan_fetches(staging_dir: Path) -> int:
    """Remove fetched copies whose consumer process is gone (it died mid-fetch, or before
    loading what it fetched). Returns how many. Run by a consumer when it starts."""
    removed = 0
    for path in Path(staging_dir).glob(f"{FETCHED_PREFIX}*"):
        m = _FETCHED_PID.match(path.name)
        if m is None or process_alive(int(m.group(1))):
            continue
        path.unlink(missing_ok=True)
        removed += 1
    return removed


def wait_port_open(host: str, port: int, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
