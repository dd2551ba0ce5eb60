"""Mappings of segment files kept across transfers (both sides), keyed by inode."""

from __future__ import annotations

import mmap
import os
from collections import OrderedDict


class MappingCache:
    """Mappings of segment files kept across transfers, keyed by inode.

    A cached mapping holds its file open, so the inode number cannot be reused while the
    entry lives: the same (device, inode) is always the same file. Entries whose file has
    been deleted everywhere (link count 0) are dropped on the next sweep, and the cache is
    bounded by total mapped bytes (least recently used first).
    """

    def __init__(self, max_bytes: int = 4 << 30, populate: bool = True):
        self.max_bytes = max_bytes
        self._populate = populate
        self._maps: OrderedDict[tuple[int, int], tuple[int, mmap.mmap]] = OrderedDict()
        self._bytes = 0
        self._gets = 0

    def get(self, fd: int, st: os.stat_result | None = None) -> mmap.mmap:
        st = st or os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        entry = self._maps.get(key)
        if entry is not None and not entry[1].closed and len(entry[1]) == st.st_size:
            self._maps.move_to_end(key)
            return entry[1]
        if entry is not None:
            self._drop(key)
        flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if self._populate else 0)
        mm = mmap.mmap(fd, st.st_size, flags=flags)
        self._maps[key] = (os.dup(fd), mm)
        self._bytes += st.st_size
        self._gets += 1
        if self._gets % 64 == 0:
            self.sweep()
        while self._bytes > self.max_bytes and len(self._maps) > 1:
            self._drop(next(iter(self._maps)))
        return mm

    def sweep(self) -> None:
        """Drop mappings of files that no longer exist anywhere."""
        for key, (fd, _) in list(self._maps.items()):
            try:
                gone = os.fstat(fd).st_nlink == 0
            except OSError:
                gone = True
            if gone:
                self._drop(key)

    def forget(self, st: os.stat_result) -> None:
        key = (st.st_dev, st.st_ino)
        if key in self._maps:
            self._drop(key)

    def _drop(self, key: tuple[int, int]) -> None:
        fd, mm = self._maps.pop(key)
        self._bytes -= len(mm)
        try:
            mm.close()
        except BufferError:
            pass  # a view still uses it; it goes when that view does
        os.close(fd)

    def __len__(self) -> int:
        return len(self._maps)

    def close(self) -> None:
        for key in list(self._maps):
            self._drop(key)
