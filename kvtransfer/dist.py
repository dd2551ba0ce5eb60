"""torch.distributed point-to-point transport for staged KV segments, over a pool of pair groups.

(Over 350 lines for one concept: the communicator pool, its generation handshake and the
framing on top of it are the one transport; split, each half would need the other's
invariants.)

An alternative to the TCP transport for a decode on another host: a staged segment's bytes
move as one uint8 tensor over a two-rank process group per (prefill, decode) pair. The
backend is gloo on CPU and NCCL on GPU; the code path is the same, only the group class
and the device of the wire tensors differ. (NCCL is what makes this transport worth
having: with NVLink or RDMA it moves KV device to device, no host copy in between.)

Pair groups. In a pair's group the prefill is rank 0 and the decode rank 1. A group is
built lazily, the first time the pair transfers, over one shared rendezvous store (a
`TCPStore` that any process may host; a `PrefixStore` per pair and generation keeps the
groups' keys apart). A build costs a rendezvous (and, for NCCL, a communicator init), so
groups are pooled and reused across transfers. The pool is bounded: past `max_groups` it
shuts down the least recently used idle group.

Generation agreement. Either side may drop its half of a pair's group at any time (LRU
eviction, an error), so before every transfer both sides exchange through the store
their (cached generation, highest generation built) for the pair. Equal cached
generations: reuse the group. Otherwise both drop what they hold and build generation
``max(highest) + 1``. Both compute the answer from the same two records, so the two ends
never talk over different groups.

Communicator states, per pair and side::

    (none) ──first transfer──▶ CONNECTING ──rendezvous──▶ IDLE ──transfer──▶ IN_USE
                                                           ▲                    │
                                                           └──────done──────────┤
                    pool full, least recently used ──▶ EVICTED                  │
                    peer holds another generation ──▶ EVICTED     error/timeout─┴──▶ BROKEN
    (EVICTED and BROKEN groups are shut down; the pair's next transfer builds generation + 1)

Transfer protocol. One transfer at a time per pair, and both sides issue a pair's transfers
in the same order (the pull model gives this: the decode asks, the prefill answers in
order). `transfer_id` names one attempt and must not be reused::

    both     handshake through the store under the transfer id: agree on the generation
    both     the deployment secret's challenge-response over the group (kvtransfer/auth.py,
             fixed-size uint8 messages): P refuses a decode that fails it, and D a prefill
    P ─▶ D   int64[2] (status, nbytes); status REFUSED: nothing follows
    P ─▶ D   uint8[nbytes]: the payload (for a segment: its whole file, header included,
             so the decode's connector checks completeness and layout on load as usual)
    D ─▶ P   int64[1] ack, segments only, once the bytes are in the decode's own file;
             on the ack the prefill recycles its segment: ownership passes as with TCP.
             Without an ack the prefill keeps the segment until its lease reclaims it.
"""

from __future__ import annotations

import contextlib
import enum
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import msgspec
import torch
from torch.distributed import PrefixStore, Store

from cluster.wire import KVTransferError
from kvtransfer import auth as kv_auth
from kvtransfer.recycle import recycle
from kvtransfer.segment import StagingSegment, create_mapped_file

Role = Literal["prefill", "decode"]
Backend = Literal["gloo", "nccl"]
_RANK_OF_ROLE = {"prefill": 0, "decode": 1}
_KEY_PREFIX = "pdserve-kv"

# (store, rank, world size, timeout) -> a c10d backend process group (ProcessGroupGloo, ...)
GroupFactory = Callable[[Store, int, int, timedelta], Any]


class CommState(enum.Enum):
    CONNECTING = "connecting"
    IDLE = "idle"
    IN_USE = "in_use"
    EVICTED = "evicted"
    BROKEN = "broken"


class _Status(enum.IntEnum):
    OK = 0
    REFUSED = 1


@dataclass(frozen=True)
class PairKey:
    prefill_id: str
    decode_id: str


@dataclass
class Communicator:
    """One side's half of a pair's process group."""

    pair: PairKey
    generation: int
    group: Any  # a c10d backend process group; only send/recv/shutdown are used
    peer_rank: int
    state: CommState
    last_used_s: float
    num_transfers: int = 0


class _Hello(msgspec.Struct, frozen=True):
    cached_generation: int | None  # the generation this side holds for the pair, if any
    highest_generation: int  # the highest generation this side ever built for the pair (0: none)


def backend_group_factory(backend: Backend) -> GroupFactory:
    """Builds real two-rank groups: gloo (CPU tensors) or NCCL (CUDA tensors)."""
    if backend == "gloo":
        from torch.distributed import ProcessGroupGloo

        return lambda store, rank, size, timeout: ProcessGroupGloo(store, rank, size, timeout)
    if backend == "nccl":
        from torch.distributed import ProcessGroupNCCL

        def build_nccl(store: Store, rank: int, size: int, timeout: timedelta) -> Any:
            options = ProcessGroupNCCL.Options()
            options._timeout = timeout
            return ProcessGroupNCCL(store, rank, size, options)

        return build_nccl
    raise ValueError(f"unknown torch.distributed backend {backend!r}")


class CommunicatorPool:
    """Pair groups of one process, built lazily, reused, LRU-evicted past `max_groups`."""

    def __init__(self, local_id: str, role: Role, store: Store, group_factory: GroupFactory,
                 max_groups: int = 8, timeout_s: float = 30.0):
        if max_groups < 1:
            raise ValueError("max_groups must be at least 1")
        self.local_id = local_id
        self.role = role
        self.rank = _RANK_OF_ROLE[role]
        self._store = store
        self._group_factory = group_factory
        self.max_groups = max_groups
        self._timeout = timedelta(seconds=timeout_s)
        self._lock = threading.Lock()  # guards the dicts below, never held across I/O
        self._groups: OrderedDict[PairKey, Communicator] = OrderedDict()  # LRU first
        self._pair_locks: dict[PairKey, threading.Lock] = {}  # one transfer per pair
        self._highest_generation: dict[PairKey, int] = {}
        self.num_built = 0
        self.num_dropped = 0  # evicted or broken

    def pair_with(self, peer_id: str) -> PairKey:
        if self.role == "prefill":
            return PairKey(prefill_id=self.local_id, decode_id=peer_id)
        return PairKey(prefill_id=peer_id, decode_id=self.local_id)

    def cached(self, peer_id: str) -> Communicator | None:
        with self._lock:
            return self._groups.get(self.pair_with(peer_id))

    def __len__(self) -> int:
        with self._lock:
            return len(self._groups)

    @contextlib.contextmanager
    def lease(self, peer_id: str, transfer_id: str) -> Iterator[Communicator]:
        """The pair's communicator, agreed with the peer, held IN_USE for one transfer."""
        pair = self.pair_with(peer_id)
        with self._lock:
            pair_lock = self._pair_locks.setdefault(pair, threading.Lock())
        with pair_lock:
            comm = self._agree(pair, transfer_id)
            comm.state = CommState.IN_USE
            try:
                yield comm
            except BaseException:
                comm.state = CommState.BROKEN
                self._drop(comm)
                raise
            comm.state = CommState.IDLE
            comm.num_transfers += 1
            comm.last_used_s = time.monotonic()
        self._evict_over_capacity()

    def evict(self, peer_id: str) -> bool:
        """Shut down the pair's group now if it is idle; the peer notices at the next handshake."""
        pair = self.pair_with(peer_id)
        with self._lock:
            pair_lock = self._pair_locks.get(pair)
        if pair_lock is None or not pair_lock.acquire(blocking=False):
            return False
        try:
            comm = self.cached(peer_id)
            if comm is None:
                return False
            comm.state = CommState.EVICTED
            self._drop(comm)
            return True
        finally:
            pair_lock.release()

    def close(self) -> None:
        with self._lock:
            comms = list(self._groups.values())
        for comm in comms:
            comm.state = CommState.EVICTED
            self._drop(comm)

    # -- internals --------------------------------------------------------------------
    def _agree(self, pair: PairKey, transfer_id: str) -> Communicator:
        with self._lock:
            comm = self._groups.get(pair)
            highest = self._highest_generation.get(pair, 0)
        mine = _Hello(cached_generation=comm.generation if comm else None, highest_generation=highest)
        theirs = self._exchange_hello(pair, transfer_id, mine)
        if comm is not None and theirs.cached_generation == comm.generation:
            with self._lock:
                self._groups.move_to_end(pair)
            return comm
        if comm is not None:  # the peer dropped or replaced its half: ours is useless
            comm.state = CommState.EVICTED
            self._drop(comm)
        generation = max(highest, theirs.highest_generation) + 1
        return self._build(pair, generation)

    def _exchange_hello(self, pair: PairKey, transfer_id: str, mine: _Hello) -> _Hello:
        base = f"{_KEY_PREFIX}/hello/{pair.prefill_id}/{pair.decode_id}/{transfer_id}"
        my_key, peer_key = f"{base}/{self.rank}", f"{base}/{1 - self.rank}"
        try:
            self._store.set(my_key, msgspec.msgpack.encode(mine))
            self._store.wait([peer_key], self._timeout)
            raw = self._store.get(peer_key)
            self._store.delete_key(peer_key)  # each key is read once, by the other side
        except RuntimeError as e:  # c10d reports store timeouts and lost connections so
            raise KVTransferError(f"handshake for {transfer_id} with {pair} failed: {e}") from e
        return msgspec.msgpack.decode(raw, type=_Hello)

    def _build(self, pair: PairKey, generation: int) -> Communicator:
        prefix = f"{_KEY_PREFIX}/pg/{pair.prefill_id}/{pair.decode_id}/{generation}"
        try:
            group = self._group_factory(PrefixStore(prefix, self._store), self.rank, 2, self._timeout)
        except RuntimeError as e:
            raise KVTransferError(f"building the process group for {pair} failed: {e}") from e
        comm = Communicator(pair=pair, generation=generation, group=group, peer_rank=1 - self.rank,
                            state=CommState.IDLE, last_used_s=time.monotonic())
        with self._lock:
            self._groups[pair] = comm
            self._highest_generation[pair] = generation
            self.num_built += 1
        return comm

    def _drop(self, comm: Communicator) -> None:
        with self._lock:
            if self._groups.get(comm.pair) is comm:
                del self._groups[comm.pair]
                self.num_dropped += 1
        try:
            comm.group.shutdown()
        except RuntimeError:
            pass  # already torn down by a failed op; nothing more to release

    def _evict_over_capacity(self) -> None:
        with self._lock:
            candidates = [(c, self._pair_locks[c.pair]) for c in self._groups.values()]  # LRU first
        excess = len(candidates) - self.max_groups
        for comm, pair_lock in candidates:
            if excess <= 0:
                return
            if not pair_lock.acquire(blocking=False):
                continue  # in use (or about to be): stays over capacity until idle
            try:
                if comm.state == CommState.IDLE:
                    comm.state = CommState.EVICTED
                    self._drop(comm)
                    excess -= 1
            finally:
                pair_lock.release()


class DistTransport:
    """send/recv of uint8 payloads and staged segments between a prefill and a decode."""

    def __init__(self, local_id: str, role: Role, store: Store, backend: Backend = "gloo",
                 max_groups: int = 8, timeout_s: float = 30.0,
                 group_factory: GroupFactory | None = None, secret: bytes | None = None):
        self.backend = backend
        self._secret = secret if secret is not None else kv_auth.kv_secret()
        # Wire tensors live where the backend moves them from: host for gloo, GPU for NCCL.
        self.device = (torch.device("cuda", torch.cuda.current_device()) if backend == "nccl"
                       else torch.device("cpu"))
        self.pool = CommunicatorPool(local_id, role, store,
                                     group_factory or backend_group_factory(backend),
                                     max_groups=max_groups, timeout_s=timeout_s)

    # -- raw payloads -----------------------------------------------------------------
    def send(self, peer_id: str, transfer_id: str, payload: torch.Tensor) -> None:
        """Send a 1-d uint8 tensor to `peer_id` (who calls `recv` with the same transfer id)."""
        if payload.dtype != torch.uint8 or payload.dim() != 1:
            raise ValueError("payload must be a 1-d uint8 tensor")
        with self.pool.lease(peer_id, transfer_id) as comm:
            self._authenticate(comm, peer_id)
            self._send_frame(comm, _Status.OK, payload)

    def recv(self, peer_id: str, transfer_id: str,
             device: torch.device | str | None = None) -> torch.Tensor:
        """Receive the payload `peer_id` sends under `transfer_id`: a uint8 tensor on `device`
        (default: CPU). With NCCL and a CUDA `device` it lands device to device."""
        with self.pool.lease(peer_id, transfer_id) as comm:
            self._authenticate(comm, peer_id)
            status, nbytes = self._recv_header(comm, transfer_id)
            out = torch.empty(nbytes, dtype=torch.uint8, device=device or "cpu")
            if status == _Status.OK:
                self._recv_payload(comm, out)
        _raise_if_refused(status, peer_id, transfer_id)
        return out

    def refuse(self, peer_id: str, transfer_id: str) -> None:
        """Answer `peer_id`'s `recv` under `transfer_id` with a refusal (what it asked for is
        gone): its `recv` raises KVTransferError, the pair's group stays usable."""
        with self.pool.lease(peer_id, transfer_id) as comm:
            self._authenticate(comm, peer_id)
            self._send_frame(comm, _Status.REFUSED, None)

    # -- staged segments --------------------------------------------------------------
    def send_segment(self, peer_id: str, transfer_id: str, path: Path) -> int:
        """Send a complete staged segment; unlink it once the peer acks. Returns bytes sent.

        A missing or incomplete segment is refused (the peer is told, both raise
        KVTransferError, the pair's group stays usable). On a failed send or a missing ack
        the segment stays where it is, for the lease sweeper.
        """
        path = Path(path)
        refusal: str | None = None
        nbytes = 0
        pool_dir: str | None = None
        with self.pool.lease(peer_id, transfer_id) as comm:
            self._authenticate(comm, peer_id)  # before a byte of the segment moves
            try:
                seg = StagingSegment.open(path)
            except KVTransferError as e:
                refusal = str(e)
            else:
                try:
                    pool_dir = seg.header.pool_dir
                    if not seg.header.is_complete:
                        refusal = f"segment {path.name} is not complete"
                    else:
                        nbytes = _send_buffer(seg.buffer(), lambda t: self._send_frame(comm, _Status.OK, t))
                finally:
                    seg.close()
            if refusal is not None:
                self._send_frame(comm, _Status.REFUSED, None)
            else:
                ack = torch.zeros(1, dtype=torch.int64, device=self.device)
                self._wait(comm.group.recv([ack], comm.peer_rank, 0), "ack", transfer_id)
        if refusal is not None:
            raise KVTransferError(f"refused transfer {transfer_id}: {refusal}")
        recycle(path, pool_dir)  # acked: the decode owns its copy now; the file goes back
        return nbytes

    def recv_segment(self, peer_id: str, transfer_id: str, dest_path: Path) -> int:
        """Receive a segment into `dest_path` (a new file), then ack. Returns bytes received.

        On any failure `dest_path` does not exist afterwards and KVTransferError is raised.
        """
        dest_path = Path(dest_path)
        with self.pool.lease(peer_id, transfer_id) as comm:
            self._authenticate(comm, peer_id)
            status, nbytes = self._recv_header(comm, transfer_id)
            if status == _Status.OK:
                try:
                    _recv_into_new_file(dest_path, nbytes, lambda out: self._recv_payload(comm, out))
                    ack = torch.ones(1, dtype=torch.int64, device=self.device)
                    # Without the ack the prefill keeps its segment; ours goes (below), so
                    # exactly one side owns the KV.
                    self._wait(comm.group.send([ack], comm.peer_rank, 0), "ack", transfer_id)
                except BaseException:
                    dest_path.unlink(missing_ok=True)
                    raise
        _raise_if_refused(status, peer_id, transfer_id)
        return nbytes

    def close(self) -> None:
        self.pool.close()

    # -- framing ----------------------------------------------------------------------
    def _authenticate(self, comm: Communicator, peer_id: str) -> None:
        """The secret's challenge-response over the pair group (the prefill challenges)."""
        def send(data: bytes) -> None:
            wire = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.device)
            self._wait(comm.group.send([wire], comm.peer_rank, 0), "authentication", peer_id)

        def recv(nbytes: int) -> bytes:
            wire = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            self._wait(comm.group.recv([wire], comm.peer_rank, 0), "authentication", peer_id)
            return bytes(wire.cpu().tolist())

        if self.pool.role == "prefill":
            kv_auth.dist_prove_prefill(send, recv, self._secret, peer_id)
        else:
            kv_auth.dist_prove_decode(send, recv, self._secret)

    def _send_frame(self, comm: Communicator, status: _Status, payload: torch.Tensor | None) -> None:
        nbytes = 0 if payload is None else payload.numel()
        header = torch.tensor([int(status), nbytes], dtype=torch.int64, device=self.device)
        self._wait(comm.group.send([header], comm.peer_rank, 0), "header", str(comm.pair))
        if payload is not None and nbytes:
            wire = payload.to(self.device)  # no copy for gloo; host-to-device for NCCL
            self._wait(comm.group.send([wire], comm.peer_rank, 0), "payload", str(comm.pair))

    def _recv_header(self, comm: Communicator, transfer_id: str) -> tuple[_Status, int]:
        header = torch.zeros(2, dtype=torch.int64, device=self.device)
        self._wait(comm.group.recv([header], comm.peer_rank, 0), "header", transfer_id)
        status, nbytes = (int(v) for v in header.cpu())
        return _Status(status), nbytes

    def _recv_payload(self, comm: Communicator, out: torch.Tensor) -> None:
        """Receive into `out` (uint8); through a buffer on the backend's device when `out`
        is elsewhere."""
        if out.numel() == 0:
            return
        wire = out if out.device == self.device else torch.empty_like(out, device=self.device)
        self._wait(comm.group.recv([wire], comm.peer_rank, 0), "payload", str(comm.pair))
        if wire is not out:
            out.copy_(wire)

    @staticmethod
    def _wait(work: Any, what: str, context: str) -> None:
        try:
            work.wait()
        except RuntimeError as e:  # gloo/NCCL report timeouts and peer loss as RuntimeError
            raise KVTransferError(f"{what} of {context} failed: {e}") from e


def _raise_if_refused(status: _Status, peer_id: str, transfer_id: str) -> None:
    if status == _Status.REFUSED:
        raise KVTransferError(f"{peer_id} refused transfer {transfer_id} (segment missing or "
                              f"incomplete)")


def _send_buffer(buf: memoryview, send: Callable[[torch.Tensor], None]) -> int:
    """Send a mapped buffer as a uint8 tensor without copying it; returns its length."""
    try:
        payload = torch.frombuffer(buf, dtype=torch.uint8)  # [nbytes], the file's pages
        send(payload)
        nbytes = payload.numel()
        del payload  # drop the tensor's export of `buf` so the mapping can close
    finally:
        buf.release()
    return nbytes


def _recv_into_new_file(path: Path, nbytes: int, receive: Callable[[torch.Tensor], None]) -> None:
    mm = create_mapped_file(path, nbytes)
    view = memoryview(mm)
    try:
        out = torch.frombuffer(view, dtype=torch.uint8)  # [nbytes], the file's pages
        receive(out)
        del out
    finally:
        view.release()
        mm.close()
