"""A producer's pool of recycled segment files, by size class, with their mappings kept.

In steady state a transfer touches only resident, already-mapped pages: the pool hands
out files whose pages are already faulted in and mapped (`MappingCache`). The pool is
bounded (`max_bytes`); a producer that exits removes it, and `reclaim.reclaim_orphans`
removes the pools and segments of producers that died. Ownership: the rename out of the
pool is done only by the producer, the rename into it (`recycle`) only by the current
owner of a segment, and `rename(2)` is atomic.
"""

from __future__ import annotations

import mmap
import os
import shutil
from pathlib import Path

from kvtransfer.mapping import MappingCache
from kvtransfer.names import pool_dir_for
from kvtransfer.recycle import size_class

OWNER_FILE = "owner"  # holds the producer's pid, for `reclaim_orphans`


class SegmentPool:
    """A producer's free list of segment files, by size class, with their mappings kept.

    Only the producer takes files out (`acquire`); consumers and the producer's transfer
    server put them back with `recycle`. Bounded by `max_bytes` of pooled files (without
    a pool, `StagingSegment.create` makes a new file per segment, unlinked after use).
    """

    def __init__(self, staging_dir: Path, engine_id: str, max_bytes: int = 1 << 30):
        if max_bytes <= 0:
            raise ValueError("a segment pool needs max_bytes > 0")
        self.dir = pool_dir_for(staging_dir, engine_id)
        self.max_bytes = max_bytes
        self.maps = MappingCache(max_bytes=max(2 * max_bytes, 1 << 30))
        self.dir.mkdir(mode=0o700, exist_ok=True)
        (self.dir / OWNER_FILE).write_text(f"{os.getpid()}\n")
        self.num_reused = 0
        self.num_created = 0

    def acquire(self, path: Path, nbytes: int) -> mmap.mmap:
        """A writable mapping of a file now at `path` (which must not exist), >= nbytes."""
        cls = size_class(nbytes)
        free = self._free_files()
        for candidate in free.get(cls, ()):
            try:
                os.rename(candidate, path)  # raced with nothing: only we take files out
            except FileNotFoundError:
                continue
            fd = os.open(path, os.O_RDWR)
            try:
                os.utime(fd)  # the lease counts from now, not from the file's first use
                mm = self.maps.get(fd)
            finally:
                os.close(fd)
            self.num_reused += 1
            return mm
        self._trim(free, keep_room_for=cls)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, cls)
            mm = self.maps.get(fd)
        finally:
            os.close(fd)
        self.num_created += 1
        return mm

    def pooled_bytes(self) -> int:
        return sum(size * len(paths) for size, paths in self._free_files().items())

    def _free_files(self) -> dict[int, list[Path]]:
        free: dict[int, list[Path]] = {}
        try:
            entries = list(os.scandir(self.dir))
        except FileNotFoundError:
            self.dir.mkdir(mode=0o700, exist_ok=True)
            return free
        for e in entries:
            size, _, _ = e.name.partition("-")
            if size.isdigit():
                free.setdefault(int(size), []).append(Path(e.path))
        return free

    def _trim(self, free: dict[int, list[Path]], keep_room_for: int) -> None:
        """Unlink pooled files (largest first) until the pool plus a new file fits."""
        total = sum(size * len(paths) for size, paths in free.items())
        for size in sorted(free, reverse=True):
            for p in free[size]:
                if total + keep_room_for <= self.max_bytes:
                    return
                try:
                    st = p.stat()
                    p.unlink()
                    self.maps.forget(st)
                except FileNotFoundError:
                    pass
                total -= size

    def close(self) -> None:
        """Remove the pool (the producer is going away); segments still out are unlinked
        by whoever recycles them."""
        self.maps.close()
        shutil.rmtree(self.dir, ignore_errors=True)
