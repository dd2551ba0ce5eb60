"""Reclaiming staged KV nobody claimed: expired leases and dead producers' leftovers.

`reclaim_expired` gives back one engine incarnation's segments older than the lease;
`reclaim_orphans` removes the pools and segments of producers on this host whose process
is gone. `Sweeper` runs both on a timer for one producer and is the only thing that does
so: it records a `TransferStat(outcome="expired")` for each segment it takes back, so
the expired count is exact even on an idle prefill (no engine step needed).

`Sweeper.abandon` is for a prefill that ended without handing out a handle (cancelled,
or aborted while its engine finished it): what its engine staged is released at once,
and what the engine stages for it later (its last step can finish after the abort
reached the worker, and vLLM then drops the output that named the segment) at each sweep
until the lease would have taken it anyway. Released, not expired: nothing is recorded.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Collection
from pathlib import Path

from cluster.wire import KVTransferError, TransferStat
from kvtransfer.names import (
    POOL_PREFIX,
    SEGMENT_PREFIX,
    list_segments,
    owner_tag,
    pool_dir_for,
    process_alive,
    staged_for_requests,
)
from kvtransfer.pool import OWNER_FILE
from kvtransfer.recycle import recycle
from kvtransfer.segment import StagingSegment

log = logging.getLogger(__name__)

MAX_ABANDONED = 4096  # abandoned prefills a sweeper watches for late-staged KV


def reclaim_expired(staging_dir: Path, lease_s: float, engine_id: str, now: float | None = None
                    ) -> int:
    """Take back this engine's segments older than the lease; returns how many."""
    return len(reclaim_expired_segments(staging_dir, lease_s, engine_id, now))


def reclaim_expired_segments(staging_dir: Path, lease_s: float, engine_id: str,
                             now: float | None = None) -> list[tuple[Path, int]]:
    """Take back this engine's segments older than the lease: (path, file bytes) of each."""
    now = time.time() if now is None else now
    tag = owner_tag(engine_id)
    pool_dir = pool_dir_for(staging_dir, engine_id)
    reclaimed: list[tuple[Path, int]] = []
    for path in list_segments(staging_dir, tag):
        try:
            if now - path.stat().st_mtime <= lease_s:
                continue
            nbytes = _segment_bytes(path)
            recycle(path, pool_dir)
            reclaimed.append((path, nbytes))
        except FileNotFoundError:
            continue
    return reclaimed


def release_staged(staging_dir: Path, engine_id: str, request_ids: Collection[str]) -> int:
    """Unlink what this engine incarnation staged for these engine requests; returns how
    many files. Unlinked, never pooled: the engine may still be writing a segment (its step
    ran before the abort), and a pooled file could be handed out and overwritten under it."""
    released = 0
    for path in staged_for_requests(staging_dir, engine_id, request_ids):
        try:
            path.unlink()
            released += 1
        except FileNotFoundError:
            continue
    return released


def _segment_bytes(path: Path) -> int:
    """What the segment holds (from its header), 0 when it has no readable header."""
    try:
        seg = StagingSegment.open(path)
    except KVTransferError:
        return 0
    try:
        return seg.nbytes
    finally:
        seg.close()


def reclaim_orphans(staging_dir: Path) -> int:
    """Remove pools, and the segments, of producers on this host that died without
    cleaning up (their owner process is gone). Returns how many pools were removed."""
    removed = 0
    for pool in Path(staging_dir).glob(f"{POOL_PREFIX}*"):
        try:
            pid = int((pool / OWNER_FILE).read_text().strip())
        except (OSError, ValueError):
            continue
        if process_alive(pid):
            continue
        tag = pool.name.removeprefix(POOL_PREFIX)
        for seg in list_segments(staging_dir, tag):
            seg.unlink(missing_ok=True)
        shutil.rmtree(pool, ignore_errors=True)
        removed += 1
    return removed


class Sweeper:
    """The one lease sweeper of a producer: every `interval_s`, takes back this engine
    incarnation's expired segments and dead producers' leftovers, and records each
    expired segment as a `TransferStat` (direction "save", outcome "expired").

    Runs on a daemon thread (`start`), or step by step (`sweep`, for tests and callers
    with their own timer). `take_records` hands the records over once.
    """

    def __init__(self, staging_dir: Path, engine_id: str, lease_s: float,
                 transport: str = "shm", interval_s: float | None = None):
        self.staging_dir = Path(staging_dir)
        self.engine_id = engine_id
        self.lease_s = lease_s
        self.transport = transport
        self.interval_s = interval_s if interval_s is not None else min(lease_s / 4, 5.0)
        self._records: list[TransferStat] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.num_expired = 0
        # Engine request ids of abandoned prefills -> wall time until which sweeps release
        # what is staged for them. Bounded: an entry lives one lease at most.
        self._abandoned: dict[str, float] = {}

    def abandon(self, request_id: str, now: float | None = None) -> int:
        """The prefill of engine request `request_id` ended without a handle: release what
        is staged for it now (returns how many files) and at each sweep within the lease."""
        now = time.time() if now is None else now
        with self._lock:
            self._abandoned[request_id] = now + self.lease_s
            while len(self._abandoned) > MAX_ABANDONED:
                del self._abandoned[next(iter(self._abandoned))]
        try:
            return release_staged(self.staging_dir, self.engine_id, (request_id,))
        except OSError as e:  # a vanished staging dir: the next sweep logs it
            log.warning("[%s] releasing the KV of an abandoned prefill failed: %s", request_id, e)
            return 0

    def _release_abandoned(self, now: float) -> None:
        with self._lock:
            for request_id in [r for r, until in self._abandoned.items() if until < now]:
                del self._abandoned[request_id]
            request_ids = list(self._abandoned)
        released = release_staged(self.staging_dir, self.engine_id, request_ids)
        if released:
            log.info("released %d staged KV file(s) of abandoned prefills", released)

    def sweep(self, now: float | None = None, lease_s: float | None = None) -> int:
        """One pass (with `lease_s`, that lease instead of the sweeper's own); returns how
        many expired segments it took back."""
        started = time.perf_counter()
        lease_s = self.lease_s if lease_s is None else lease_s
        self._release_abandoned(time.time() if now is None else now)
        reclaim_orphans(self.staging_dir)
        reclaimed = reclaim_expired_segments(self.staging_dir, lease_s, self.engine_id, now)
        duration = time.perf_counter() - started
        with self._lock:
            for path, nbytes in reclaimed:
                request_id = path.name.removeprefix(f"{SEGMENT_PREFIX}{owner_tag(self.engine_id)}-")
                log.info("[%s] staged KV expired after %.0f s unclaimed; reclaimed %d bytes",
                         request_id, lease_s, nbytes)
                self._records.append(TransferStat(
                    transport=self.transport, direction="save", num_bytes=nbytes,
                    duration_s=duration, outcome="expired", request_id=request_id))
            self.num_expired += len(reclaimed)
            del self._records[:-10_000]  # bounded if nobody collects
        return len(reclaimed)

    def take_records(self) -> tuple[TransferStat, ...]:
        with self._lock:
            taken, self._records = tuple(self._records), []
        return taken

    def start(self) -> "Sweeper":
        self._thread = threading.Thread(target=self._run, name="pdserve-kv-sweeper", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sweep()
            except OSError as e:  # a vanished staging dir must not end the sweeper
                log.warning("lease sweep of %s failed: %s", self.staging_dir, e)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
