"""torch.distributed transport: the pool's reuse/eviction logic, and real gloo transfers
between two processes spawned on 127.0.0.1."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path

import torch
import torch.multiprocessing as mp
from torch.distributed import HashStore, TCPStore

from cluster.wire import KVTransferError
from kvtransfer.dist import CommState, CommunicatorPool, DistTransport
from kvtransfer.staging import SegmentLayout, StagingSegment, segment_path


# -- the pool, with a fake group backend (no sockets) ----------------------------------
class FakeGroup:
    def __init__(self, rank: int):
        self.rank = rank
        self.is_shut_down = False

    def shutdown(self) -> None:
        self.is_shut_down = True


def _fake_factory(store, rank, size, timeout):
    return FakeGroup(rank)


def _lease_both(a: CommunicatorPool, b: CommunicatorPool, transfer_id: str):
    """Run one transfer's lease on both ends at once (each blocks on the other's hello)."""
    comms = {}

    def run(pool: CommunicatorPool, peer_id: str) -> None:
        with pool.lease(peer_id, transfer_id) as comm:
            assert comm.state == CommState.IN_USE
            comms[pool.local_id] = comm

    threads = [threading.Thread(target=run, args=(a, b.local_id)),
               threading.Thread(target=run, args=(b, a.local_id))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(comms) == 2, "a lease did not complete"
    assert comms[a.local_id].generation == comms[b.local_id].generation
    return comms[a.local_id], comms[b.local_id]


def test_pool_reuses_groups_and_evicts_the_least_recently_used_idle_one():
    store = HashStore()
    store.set_timeout(timedelta(seconds=5))
    decode = CommunicatorPool("d0", "decode", store, _fake_factory, max_groups=2)
    prefills = {p: CommunicatorPool(p, "prefill", store, _fake_factory) for p in ("p1", "p2", "p3")}

    d_p1, _ = _lease_both(decode, prefills["p1"], "t1")
    _lease_both(decode, prefills["p2"], "t2")
    again, _ = _lease_both(decode, prefills["p1"], "t3")
    assert again is d_p1 and d_p1.num_transfers == 2  # reused, not rebuilt
    assert decode.num_built == 1 + 1

    _lease_both(decode, prefills["p3"], "t4")  # over capacity: p2 is least recently used
    assert len(decode) == 2
    assert decode.cached("p2") is None and decode.cached("p1") is d_p1
    assert decode.cached("p3") is not None

    # p2 still holds generation 1; the decode has none: both agree on a new generation.
    stale = prefills["p2"].cached("d0")
    d_p2, p2_new = _lease_both(decode, prefills["p2"], "t5")
    assert d_p2.generation == p2_new.generation == 2
    assert stale.state == CommState.EVICTED and stale.group.is_shut_down
    assert decode.cached("p1") is None  # p1 was least recently used this time


def test_failed_transfer_drops_the_group_and_the_next_one_rebuilds():
    store = HashStore()
    store.set_timeout(timedelta(seconds=5))
    decode = CommunicatorPool("d0", "decode", store, _fake_factory)
    prefill = CommunicatorPool("p0", "prefill", store, _fake_factory)
    _lease_both(decode, prefill, "t1")
    comm = decode.cached("p0")

    errors = []

    def failing_transfer() -> None:
        try:
            with decode.lease("p0", "t2"):
                raise KVTransferError("peer vanished")
        except KVTransferError as e:
            errors.append(e)

    thread = threading.Thread(target=failing_transfer)
    thread.start()
    with prefill.lease("d0", "t2"):
        pass
    thread.join(10)
    assert errors and comm.state == CommState.BROKEN and comm.group.is_shut_down
    assert decode.cached("p0") is None
    d, p = _lease_both(decode, prefill, "t3")
    assert d.generation == p.generation == 2


# -- real gloo, two processes ----------------------------------------------------------
LAYOUT = SegmentLayout(layer_names=["l0", "l1", "l2"], bytes_per_block=[4096, 4096, 8192],
                       num_blocks=16, num_tokens=250, block_size=16)


def _payload(seed: int, nbytes: int) -> torch.Tensor:
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def _stage(staging: Path, request_id: str, seed: int, complete: bool = True) -> Path:
    path = segment_path(staging, "p0", request_id)
    seg = StagingSegment.create(path, LAYOUT)
    payload = seg.buffer()[4096:]
    payload[:] = _payload(seed, len(payload)).numpy().tobytes()
    payload.release()
    if complete:
        seg.mark_complete()
    seg.close()
    return path


def _worker(rank: int, store_port: int, workdir: str) -> None:
    """Rank 0 is the prefill p0, rank 1 the decode d0; every step runs on both in order."""
    store = TCPStore("127.0.0.1", store_port, is_master=False, timeout=timedelta(seconds=30))
    role = "prefill" if rank == 0 else "decode"
    me = DistTransport("p0" if rank == 0 else "d0", role, store, backend="gloo", timeout_s=30)
    peer = "d0" if rank == 0 else "p0"
    staging, inbox = Path(workdir) / "prefill", Path(workdir) / "decode"

    # 1. A raw payload, byte-exact; a second transfer reuses the pair's group.
    for i, nbytes in enumerate([3 << 20, 1000]):
        if rank == 0:
            me.send(peer, f"raw-{i}", _payload(i, nbytes))
        else:
            assert torch.equal(me.recv(peer, f"raw-{i}"), _payload(i, nbytes))
    assert me.pool.num_built == 1 and me.pool.cached(peer).generation == 1

    # 2. A staged segment: the decode's copy is the producer's file; the producer unlinks
    #    its segment once acked.
    if rank == 0:
        src = _stage(staging, "req-1", seed=7)
        expected = src.read_bytes()
        assert me.send_segment(peer, "seg-1", src) == len(expected)
        assert not src.exists()
    else:
        dest = inbox / "req-1"
        nbytes = me.recv_segment(peer, "seg-1", dest)
        seg = StagingSegment.open(dest)
        assert seg.header.is_complete and seg.header.layout == LAYOUT and nbytes == dest.stat().st_size
        assert bytes(seg.buffer()[4096:]) == _payload(7, nbytes - 4096).numpy().tobytes()
        seg.close()

    # 3. An incomplete segment is refused on both ends; the producer keeps it, the
    #    decode has no file, and the pair's group stays usable.
    if rank == 0:
        src = _stage(staging, "req-2", seed=8, complete=False)
        try:
            me.send_segment(peer, "seg-2", src)
            raise AssertionError("an incomplete segment was sent")
        except KVTransferError:
            pass
        assert src.exists()
    else:
        try:
            me.recv_segment(peer, "seg-2", inbox / "req-2")
            raise AssertionError("an incomplete segment was received")
        except KVTransferError as e:
            assert "refused" in str(e)
        assert not (inbox / "req-2").exists()
    assert me.pool.cached(peer).generation == 1 and me.pool.num_built == 1

    # 4. The decode evicts its half (as its LRU would); the next transfer agrees on a new
    #    generation on both ends and is still byte-exact.
    if rank == 1:
        assert me.pool.evict(peer)
    if rank == 0:
        me.send(peer, "raw-after-evict", _payload(9, 12345))
    else:
        assert torch.equal(me.recv(peer, "raw-after-evict"), _payload(9, 12345))
    assert me.pool.cached(peer).generation == 2 and me.pool.num_built == 2
    me.close()


def test_gloo_transfers_between_two_processes(tmp_path):
    (tmp_path / "prefill").mkdir()
    (tmp_path / "decode").mkdir()
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                     timeout=timedelta(seconds=30))
    mp.spawn(_worker, args=(store.port, str(tmp_path)), nprocs=2, join=True)
    assert sorted(p.name for p in (tmp_path / "decode").iterdir()) == ["req-1"]
    assert [p.name for p in (tmp_path / "prefill").iterdir()] == [
        segment_path(tmp_path, "p0", "req-2").name]  # refused: still the producer's
