"""The dist request channel: how a decode asks a prefill for a segment over torch.distributed.

`DistTransport` (`dist.py`) moves a segment once both ends are in the same transfer;
something must tell the prefill which segment a decode wants. The decode pushes a
`DistFetchRequest` onto the prefill's queue in the shared rendezvous store (its key names
the prefill's engine id, so a request for a restarted prefill's segment finds no reader
and times out as a failed fetch); `DistResponder`, started by `ProducerService`, pops
requests and answers each with `send_segment`. A decode holds a per-prefill lock from its
push until its receive ends, so the two ends of a pair always issue that pair's transfers
in the same order, as `DistTransport` requires.
"""

from __future__ import annotations

import collections
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from cluster.config import KVTransferSettings
from cluster.wire import KVTransferError
from kvtransfer import auth as kv_auth
from kvtransfer.handle import TransferDescriptor
from kvtransfer.names import is_segment_name
from kvtransfer.tcp import fetched_path

if TYPE_CHECKING:  # typing only: kvtransfer.dist imports torch.distributed
    from kvtransfer.dist import DistTransport


_QUEUE_PREFIX = "pdserve-kv/fetch"


class DistFetchRequest(msgspec.Struct, frozen=True, tag="fetch"):
    """A decode asks a prefill to send one segment over their pair group."""

    segment_name: str
    decode_id: str  # the decode's rank-1 id in the pair (its DistTransport local id)
    transfer_id: str  # fresh per attempt; names the pair's handshake in the store
    mac: bytes = b""  # kv_auth.sign_request over the fields above: the store is open to all

    def is_signed_with(self, secret: bytes) -> bool:
        return kv_auth.verify_request(secret, self.mac, self.segment_name, self.decode_id,
                                      self.transfer_id)


class DistStop(msgspec.Struct, frozen=True, tag="stop"):
    """Wakes a responder that is closing (pushed by itself, onto its own queue)."""


_DistMessage = DistFetchRequest | DistStop


def dist_peer_id(producer_id: str, producer_epoch: str) -> str:
    """A prefill's id in pair groups: one per incarnation (= ProducerService.engine_id), so a
    restarted prefill never inherits its predecessor's groups or queued requests."""
    return f"{producer_id}-{producer_epoch}"


def _queue_key(peer_id: str) -> str:
    return f"{_QUEUE_PREFIX}/{peer_id}"


def _require_store(settings: KVTransferSettings) -> None:
    if settings.dist_store_host is None or settings.dist_store_port is None:
        raise KVTransferError("transport 'dist' needs kv_transfer.dist_store_host and "
                              "dist_store_port (the rendezvous store that prefill and decode share)")


def connect_store(settings: KVTransferSettings, timeout_s: float) -> Any:
    """A client of the deployment's rendezvous TCPStore (the launcher hosts it)."""
    _require_store(settings)
    # Deferred: torch.distributed is imported only where dist is used.
    from torch.distributed import TCPStore

    try:
        return TCPStore(settings.dist_store_host, settings.dist_store_port, is_master=False,
                        timeout=timedelta(seconds=timeout_s))
    except RuntimeError as e:
        raise KVTransferError(f"cannot reach the KV rendezvous store at "
                              f"{settings.dist_store_host}:{settings.dist_store_port}: {e}") from e


def host_store(settings: KVTransferSettings, bind_host: str, timeout_s: float) -> Any:
    """Host the deployment's rendezvous TCPStore, listening on `bind_host` only.

    torch's TCPStore server listens on every interface whatever host it is given; handing
    it a socket already bound to the node's own address keeps it there (`bind_host`
    "0.0.0.0" restores every interface). Fetch requests in the store are signed and every
    transfer authenticates over its pair group (kvtransfer/auth.py), so a reachable store
    is not an open door either way.
    """
    import socket

    from torch.distributed import TCPStore

    _require_store(settings)
    listener = socket.create_server((bind_host, settings.dist_store_port), backlog=512)
    try:
        store = TCPStore(settings.dist_store_host, settings.dist_store_port, is_master=True,
                         wait_for_workers=False, timeout=timedelta(seconds=timeout_s),
                         master_listen_fd=listener.fileno())
    except BaseException:
        listener.close()
        raise
    listener.detach()  # the store's server owns the descriptor now
    return store


class DistFetchTransport:
    """Any host in the rendezvous: ask the prefill through the store, receive over the pair
    group (gloo or NCCL, `dist_backend`). Connects on the first fetch, whose `timeout_s`
    then bounds every wait for a peer (as `DistTransport`'s `timeout_s`)."""

    name = "dist"
    is_local = False

    def __init__(self, settings: KVTransferSettings, consumer_id: str):
        _require_store(settings)  # fail at start-up, not at the first request
        self._settings = settings
        self._secret = kv_auth.kv_secret(settings)
        self.consumer_id = consumer_id
        self._lock = threading.Lock()  # guards the fields below, never held across a transfer
        self._store: Any = None
        self._dist: DistTransport | None = None
        self._peer_locks: dict[str, threading.Lock] = {}

    def fetch(self, desc: TransferDescriptor, dest_dir: Path, timeout_s: float) -> tuple[Path, int]:
        name = Path(desc.segment_path).name
        if not is_segment_name(name):
            raise KVTransferError(f"handle names no staged KV segment: {desc.segment_path!r}")
        store, dist = self._connect(timeout_s)
        peer_id = dist_peer_id(desc.producer_id, desc.producer_epoch)
        dest = fetched_path(dest_dir, name)
        transfer_id = uuid.uuid4().hex
        request = DistFetchRequest(
            segment_name=name, decode_id=self.consumer_id, transfer_id=transfer_id,
            mac=kv_auth.sign_request(self._secret, name, self.consumer_id, transfer_id))
        with self._lock:
            peer_lock = self._peer_locks.setdefault(peer_id, threading.Lock())
        with peer_lock:  # one outstanding request per pair: both ends see the same order
            try:
                store.queue_push(_queue_key(peer_id), msgspec.msgpack.encode(request))
            except RuntimeError as e:
                raise KVTransferError(f"asking {peer_id} for {name} failed: {e}") from e
            try:
                nbytes = dist.recv_segment(peer_id, request.transfer_id, dest)
            except KVTransferError as e:
                raise KVTransferError(f"dist fetch of {name} from {peer_id} failed (producer "
                                      f"gone, restarted, or the segment expired): {e}") from e
        return dest, nbytes

    def _connect(self, timeout_s: float) -> tuple[Any, DistTransport]:
        with self._lock:
            if self._dist is None:
                # Deferred: kvtransfer.dist imports torch.distributed.
                from kvtransfer.dist import DistTransport

                self._store = connect_store(self._settings, timeout_s)
                self._dist = DistTransport(self.consumer_id, "decode", self._store,
                                           backend=self._settings.dist_backend,
                                           timeout_s=timeout_s, secret=self._secret)
            return self._store, self._dist

    def close(self) -> None:
        with self._lock:
            if self._dist is not None:
                self._dist.close()
            self._dist = self._store = None


class DistResponder:
    """Prefill side of the dist transport: serves `DistFetchRequest`s from its queue.

    One thread pops the queue; each request is answered on a worker thread, so a slow
    decode delays only its own pair (`DistTransport` serializes transfers per pair).
    Refusals (segment missing or incomplete) travel over the pair group as usual; a request
    naming no segment file is dropped (our decodes never send one; the asker times out).
    """

    def __init__(self, settings: KVTransferSettings, engine_id: str, staging_dir: Path,
                 max_concurrent: int = 16):
        # Deferred: kvtransfer.dist imports torch.distributed.
        from kvtransfer.dist import DistTransport

        self.peer_id = engine_id
        self.staging_dir = Path(staging_dir)
        timeout_s = settings.connect_timeout_s
        self._store = connect_store(settings, timeout_s)
        # Popping blocks its store client until a request comes: a client of its own, with
        # a long timeout, leaves the pair groups' client free (and the log quiet when idle).
        self._queue = self._store.clone()
        self._queue.set_timeout(timedelta(hours=1))
        self._secret = kv_auth.kv_secret(settings)
        self._recent_transfer_ids: collections.deque[str] = collections.deque(maxlen=4096)
        self._dist = DistTransport(engine_id, "prefill", self._store, backend=settings.dist_backend,
                                   timeout_s=timeout_s, secret=self._secret)
        self._workers = ThreadPoolExecutor(max_workers=max_concurrent,
                                           thread_name_prefix="pdserve-kv-dist-send")
        self._closed = threading.Event()
        self.num_served = 0
        self.num_failed = 0
        self.num_refused = 0  # fetch requests that failed authentication
        self._count_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="pdserve-kv-dist", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        decoder = msgspec.msgpack.Decoder(_DistMessage)
        while not self._closed.is_set():
            try:
                raw = self._queue.queue_pop(_queue_key(self.peer_id))
            except RuntimeError:  # idle past the pop timeout, or the store is unreachable
                self._closed.wait(0.5)  # (a dead store fails at once: do not spin)
                continue
            try:
                msg = decoder.decode(raw)
            except msgspec.DecodeError:
                continue
            if isinstance(msg, DistStop) or self._closed.is_set():
                return
            # Forged (unsigned) or replayed requests never tie up a sender thread.
            if not msg.is_signed_with(self._secret) or msg.transfer_id in self._recent_transfer_ids:
                kv_auth.REFUSALS.add("dist", msg.decode_id, "unsigned or replayed fetch request")
                with self._count_lock:
                    self.num_refused += 1
                continue
            self._recent_transfer_ids.append(msg.transfer_id)
            if is_segment_name(msg.segment_name):
                self._workers.submit(self._serve, msg)

    def _serve(self, req: DistFetchRequest) -> None:
        try:
            self._dist.send_segment(req.decode_id, req.transfer_id,
                                    self.staging_dir / req.segment_name)
        except (KVTransferError, OSError, RuntimeError):
            # The decode reports its own failure; the segment stays for its lease.
            with self._count_lock:
                self.num_failed += 1
            return
        with self._count_lock:
            self.num_served += 1

    def close(self) -> None:
        self._closed.set()
        try:
            self._store.queue_push(_queue_key(self.peer_id), msgspec.msgpack.encode(DistStop()))
        except RuntimeError:
            pass  # store gone: the popping thread errors out on its own
        self._thread.join(timeout=5)
        self._workers.shutdown(wait=True)
        self._dist.close()
