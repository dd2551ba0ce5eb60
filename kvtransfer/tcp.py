"""TCP transport: a consumer on another host fetches a staged segment from the producer's node.

Wire protocol (no pickle; msgpack headers, raw payload)::

    client → server   u32 length | msgpack FetchRequest
    server → client   u32 length | msgpack FetchReply
                      (ok) nbytes of segment bytes, sent with sendfile (no user-space copy)
    client → server   1 byte: ACK_CONSUMED after the bytes are safely in its own segment

Transfer states, per fetch::

    REQUESTED ──reply ok──▶ STREAMING ──all bytes──▶ RECEIVED ──ack──▶ CONSUMED (server unlinks)
        │                      │                        │
        └─reply error──▶ FAILED└─short read / timeout──▶ FAILED (server keeps the segment until
                                                         its lease expires; client removes its copy)

The server keeps ownership until the ack arrives, so a consumer that dies mid-transfer never
leaves the producer without its staged KV (the lease reclaims it later).
"""

from __future__ import annotations

import os
import socket
import socketserver
import struct
import threading
import time
from pathlib import Path

import msgspec

from cluster.wire import KVTransferError
from kvtransfer.staging import SEGMENT_PREFIX, StagingSegment

_LEN = struct.Struct("<I")
ACK_CONSUMED = b"\x01"
_MAX_HEADER = 64 * 1024


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
    """Serves this node's staged segments to remote consumers (a thread per connection)."""

    def __init__(self, staging_dir: Path, producer_epoch: str, host: str = "0.0.0.0", port: int = 0):
        self.staging_dir = Path(staging_dir)
        self.producer_epoch = producer_epoch
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
        self.num_served = 0

    def start(self) -> "TransferServer":
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _serve_one(self, sock: socket.socket) -> None:
        sock.settimeout(30.0)
        try:
            req = _recv_msg(sock, FetchRequest)
            assert isinstance(req, FetchRequest)
            name = req.segment_name
            if req.producer_epoch != self.producer_epoch:
                _send_msg(sock, FetchReply(ok=False, error="producer restarted (epoch mismatch)"))
                return
            if "/" in name or not name.startswith(SEGMENT_PREFIX):
                _send_msg(sock, FetchReply(ok=False, error="invalid segment name"))
                return
            path = self.staging_dir / name
            try:
                seg = StagingSegment.open(path)
            except KVTransferError as e:
                _send_msg(sock, FetchReply(ok=False, error=str(e)))
                return
            complete = seg.header.is_complete
            seg.close()
            if not complete:
                _send_msg(sock, FetchReply(ok=False, error=f"segment {name} is not complete"))
                return
            with open(path, "rb") as f:
                nbytes = os.fstat(f.fileno()).st_size
                _send_msg(sock, FetchReply(ok=True, nbytes=nbytes))
                sock.sendfile(f, 0, nbytes)
            if _recv_exact(sock, 1) == ACK_CONSUMED:
                path.unlink(missing_ok=True)  # ownership passed to the consumer
                self.num_served += 1
        except (KVTransferError, OSError):
            return  # the consumer reports its own failure; the lease reclaims the segment
        finally:
            sock.close()


def fetch_segment(host: str, port: int, segment_name: str, producer_epoch: str,
                  dest_dir: Path, timeout_s: float) -> tuple[Path, int]:
    """Copy a remote segment into `dest_dir`; returns (local path, bytes). Raises KVTransferError."""
    # Outside every producer's owner-tag namespace: when consumer and producer share a
    # staging dir (one host, transport tcp), the producer must not count or reclaim it.
    dest = Path(dest_dir) / f"{SEGMENT_PREFIX}fetched-{segment_name.removeprefix(SEGMENT_PREFIX)}"
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            _send_msg(sock, FetchRequest(segment_name=segment_name, producer_epoch=producer_epoch))
            reply = _recv_msg(sock, FetchReply)
            assert isinstance(reply, FetchReply)
            if not reply.ok:
                raise KVTransferError(f"producer refused {segment_name}: {reply.error}")
            _receive_into_file(sock, dest, reply.nbytes)
            sock.sendall(ACK_CONSUMED)
    except (OSError, socket.timeout) as e:
        dest.unlink(missing_ok=True)
        raise KVTransferError(f"fetching {segment_name} from {host}:{port} failed: {e}") from e
    except KVTransferError:
        dest.unlink(missing_ok=True)
        raise
    return dest, reply.nbytes


def _receive_into_file(sock: socket.socket, dest: Path, nbytes: int) -> None:
    import mmap

    fd = os.open(dest, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, nbytes)
        with mmap.mmap(fd, nbytes) as mm:
            view = memoryview(mm)
            got = 0
            try:
                while got < nbytes:
                    k = sock.recv_into(view[got:], min(nbytes - got, 4 << 20))
                    if k == 0:
                        raise KVTransferError(f"connection closed after {got} of {nbytes} bytes")
                    got += k
            finally:
                view.release()
    finally:
        os.close(fd)


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
