"""Staged KV segments: one request's prompt KV, laid out contiguously in a shared-memory file.

A segment is a file in the staging directory (``/dev/shm`` by default) holding a fixed
header followed by the KV of every layer for the request's prompt blocks::

    [ header (HEADER_BYTES) | layer 0: block 0 .. block n-1 | layer 1: ... | ... ]

Each layer region is ``num_blocks * bytes_per_block`` bytes, where a block's bytes are
exactly what the engine's paged KV tensor holds for that block (the standardized per-layer
view has blocks at dim 0, so ``kv_layer[block_ids]`` is the whole payload whatever the
backend's inner layout). The same bytes land in the consumer's blocks unchanged, so both
sides must have the same per-block layout; the header records it and the reader checks it.

Ownership: a segment has one owner at a time. The producer engine writes it and marks it
complete in the header only after the last prompt layer is written; a reader never uses a
segment whose header is not complete. The consumer (or the producer's lease sweeper, for a
segment nobody claimed) gives it back with `recycle`.

Recycling: writing a freshly created tmpfs file costs a page allocation and a page fault
per 4 KiB (about 1-2 GB/s here, a tenth of memcpy), and so does mapping a file for the first
time. So segment files are never thrown away while their producer lives: `recycle` renames
a consumed file into its producer's pool directory (named in the header), the producer's
`SegmentPool` renames it back out for a later request of the same size class, and both
sides keep their mappings of a file (`MappingCache`, keyed by inode), so in steady state a
transfer touches only resident, already-mapped pages. A segment file can therefore be
larger than its segment: readers size everything from the header (`segment_nbytes`).
The pool is bounded (`max_bytes`); a producer that exits removes it, and `reclaim_orphans`
removes the pools and segments of producers that died.
"""

from __future__ import annotations

import itertools
import mmap
import os
import re
import shutil
import struct
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import msgspec

from cluster.wire import KVTransferError

HEADER_BYTES = 4096
SEGMENT_PREFIX = "pdserve-kv-"
_LEN = struct.Struct("<I")


class SegmentLayout(msgspec.Struct, frozen=True):
    """What a reader needs to interpret a segment, and to check it fits its own cache."""

    layer_names: list[str]
    bytes_per_block: list[int]  # per layer
    num_blocks: int
    num_tokens: int
    block_size: int
    trailer_nbytes: int = 0  # room after the payload (block checksums, when enabled)


class SegmentHeader(msgspec.Struct, frozen=True):
    layout: SegmentLayout
    is_complete: bool
    created_at: float
    pool_dir: str = ""  # where a consumed file goes back to (empty: unlink it)


def default_staging_dir() -> Path:
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return shm
    return Path(tempfile.gettempdir())


def create_mapped_file(path: Path, nbytes: int, *, exclusive: bool = True) -> mmap.mmap:
    """A new file of `nbytes` at `path`, mapped shared and writable (fresh pages: every
    first touch faults; `SegmentPool` is how to avoid that). Not exclusive: replaces it."""
    flags = os.O_RDWR | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, 0o600)
    try:
        os.ftruncate(fd, nbytes)
        return mmap.mmap(fd, nbytes)
    finally:
        os.close(fd)


def payload_nbytes(layout: SegmentLayout) -> int:
    return layout.num_blocks * sum(layout.bytes_per_block)


def segment_nbytes(layout: SegmentLayout) -> int:
    """Bytes of the segment itself (header, payload, trailer); its file may be larger."""
    return HEADER_BYTES + payload_nbytes(layout) + layout.trailer_nbytes


class StagingSegment:
    """A mapped segment file. Create with `create`, attach with `open`."""

    def __init__(self, path: Path, mm: mmap.mmap, header: SegmentHeader):
        self.path = path
        self._mm = mm
        self.header = header
        self._shared_map = False  # the mapping belongs to a pool or cache, not to us
        self._file_size = len(mm)  # the whole file is mapped

    # -- life cycle -------------------------------------------------------------------
    @classmethod
    def create(cls, path: Path, layout: SegmentLayout, pool: "SegmentPool | None" = None
               ) -> "StagingSegment":
        """A new, incomplete segment at `path`: a recycled file from `pool` when it has one."""
        nbytes = segment_nbytes(layout)
        if pool is not None:
            mm = pool.acquire(Path(path), nbytes)
            pool_dir = str(pool.dir)
        else:
            mm = create_mapped_file(path, nbytes)
            pool_dir = ""
        seg = cls(path, mm, SegmentHeader(layout=layout, is_complete=False,
                                          created_at=time.time(), pool_dir=pool_dir))
        seg._shared_map = pool is not None
        seg._write_header()
        return seg

    @classmethod
    def open(cls, path: Path, maps: "MappingCache | None" = None) -> "StagingSegment":
        """Attach to an existing segment; with `maps`, reuse (and keep) this file's mapping."""
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError as e:
            raise KVTransferError(f"staged KV segment {path.name} does not exist") from e
        try:
            st = os.fstat(fd)
            if st.st_size < HEADER_BYTES:
                raise KVTransferError(f"staged KV segment {path.name} is truncated")
            mm = maps.get(fd, st) if maps is not None else mmap.mmap(fd, st.st_size)
        finally:
            os.close(fd)
        try:
            header = cls._read_header(mm, path)
        except KVTransferError:
            if maps is None:
                mm.close()
            raise
        if st.st_size < segment_nbytes(header.layout):
            if maps is None:
                mm.close()
            raise KVTransferError(f"staged KV segment {path.name} has the wrong size")
        seg = cls(path, mm, header)
        seg._shared_map = maps is not None
        return seg

    @property
    def nbytes(self) -> int:
        """Bytes of the segment (what a transport moves), from its header."""
        return segment_nbytes(self.header.layout)

    def close(self) -> None:
        if self._shared_map:
            return
        if not self._mm.closed:
            try:
                self._mm.close()
            except BufferError:
                # A tensor view still maps it; the mapping goes when that view does.
                pass

    def unlink(self) -> None:
        self.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def recycle(self) -> None:
        """Give the file back to its producer's pool (or unlink it); the segment is gone."""
        self.close()
        recycle(self.path, self.header.pool_dir, self._file_size)

    # -- header -----------------------------------------------------------------------
    def _write_header(self) -> None:
        body = msgspec.msgpack.encode(self.header)
        if len(body) + _LEN.size > HEADER_BYTES:
            raise KVTransferError("segment header too large (too many layers)")
        self._mm[: _LEN.size] = _LEN.pack(len(body))
        self._mm[_LEN.size : _LEN.size + len(body)] = body

    @staticmethod
    def _read_header(mm: mmap.mmap, path: Path) -> SegmentHeader:
        (length,) = _LEN.unpack(mm[: _LEN.size])
        if length == 0 or length > HEADER_BYTES - _LEN.size:
            raise KVTransferError(f"staged KV segment {path.name} has no valid header")
        try:
            return msgspec.msgpack.decode(mm[_LEN.size : _LEN.size + length], type=SegmentHeader)
        except msgspec.DecodeError as e:
            raise KVTransferError(f"staged KV segment {path.name} has a corrupt header") from e

    def adopt(self, pool: "SegmentPool") -> None:
        """Make `pool` the one this segment's file goes back to once consumed (a consumer
        that fetched it into a file of its own pool)."""
        self.header = msgspec.structs.replace(self.header, pool_dir=str(pool.dir))
        self._write_header()

    def mark_complete(self) -> None:
        """Publish the segment: written last, after every layer's bytes are in place."""
        self.header = msgspec.structs.replace(self.header, is_complete=True)
        self._write_header()

    # -- payload ----------------------------------------------------------------------
    def layer_view(self, layer_index: int) -> memoryview:
        """Writable bytes of one layer's region: [num_blocks * bytes_per_block]."""
        layout = self.header.layout
        start = HEADER_BYTES + layout.num_blocks * sum(layout.bytes_per_block[:layer_index])
        return memoryview(self._mm)[start : start + layout.num_blocks * layout.bytes_per_block[layer_index]]

    def trailer_view(self) -> memoryview:
        """The `trailer_nbytes` after the payload."""
        start = HEADER_BYTES + payload_nbytes(self.header.layout)
        return memoryview(self._mm)[start : start + self.header.layout.trailer_nbytes]

    def buffer(self) -> memoryview:
        """The segment's bytes (header, payload, trailer), not the file's slack."""
        return memoryview(self._mm)[: self.nbytes]


_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def owner_tag(engine_id: str) -> str:
    """The file-name-safe prefix that marks one engine incarnation's segments."""
    return _UNSAFE.sub("_", engine_id)


def is_segment_name(name: str) -> bool:
    """Whether `name` (a bare file name, e.g. from a peer) can name a staged segment."""
    return name.startswith(SEGMENT_PREFIX) and "/" not in name and name != SEGMENT_PREFIX


def segment_path(staging_dir: Path, engine_id: str, request_id: str) -> Path:
    return Path(staging_dir) / f"{SEGMENT_PREFIX}{owner_tag(engine_id)}-{_UNSAFE.sub('_', request_id)}"


def list_segments(staging_dir: Path, tag: str = "") -> list[Path]:
    """Segments in `staging_dir`, optionally only those of one owner tag."""
    # The "-" that `segment_path` puts after the tag: engine "p1" must not match "p10".
    return sorted(Path(staging_dir).glob(f"{SEGMENT_PREFIX}{tag}-*" if tag else f"{SEGMENT_PREFIX}*"))


def reclaim_expired(staging_dir: Path, lease_s: float, engine_id: str, now: float | None = None) -> int:
    """Take back this engine's segments older than the lease; returns how many."""
    now = time.time() if now is None else now
    tag = owner_tag(engine_id)
    reclaimed = 0
    for path in list_segments(staging_dir, tag):
        try:
            if now - path.stat().st_mtime > lease_s:
                recycle(path, str(pool_dir_for(staging_dir, engine_id)))
                reclaimed += 1
        except FileNotFoundError:
            continue
    return reclaimed


# ----------------------------------------------------------------------------- recycling
POOL_PREFIX = "pdserve-pool-"
_OWNER_FILE = "owner"
_MIN_CLASS = 64 << 10


def size_class(nbytes: int) -> int:
    """Round up to one of four sizes per power of two (at most 25% slack), page aligned."""
    if nbytes <= _MIN_CLASS:
        return _MIN_CLASS
    top = 1 << (nbytes - 1).bit_length()  # next power of two >= nbytes
    step = top // 8  # classes top/2 + k*top/8: 5/8, 6/8, 7/8, 8/8 of top
    return -(-nbytes // step) * step


def pool_dir_for(staging_dir: Path, engine_id: str) -> Path:
    return Path(staging_dir) / f"{POOL_PREFIX}{owner_tag(engine_id)}"


_pool_names = itertools.count()


def recycle(path: Path, pool_dir: str, file_size: int | None = None) -> None:
    """Move a consumed segment file into `pool_dir` for reuse, or unlink it when there is
    no pool (it was never pooled, or its producer is gone). `file_size`, when the caller
    knows it, saves a stat."""
    if file_size is None:
        try:
            file_size = os.stat(path).st_size
        except FileNotFoundError:
            return  # taken back already
    if pool_dir:
        try:
            # Unique among every process that recycles into this pool.
            name = f"{file_size:014d}-{os.getpid()}-{next(_pool_names)}-{time.monotonic_ns()}"
            os.rename(path, os.path.join(pool_dir, name))
            return
        except FileNotFoundError:
            if not os.path.exists(path):
                return  # taken back already
        except OSError:
            pass  # pool gone (its producer exited): drop the file
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


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
        (self.dir / _OWNER_FILE).write_text(f"{os.getpid()}\n")
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


def reclaim_orphans(staging_dir: Path) -> int:
    """Remove pools, and the segments, of producers on this host that died without
    cleaning up (their owner process is gone). Returns how many pools were removed."""
    removed = 0
    for pool in Path(staging_dir).glob(f"{POOL_PREFIX}*"):
        try:
            pid = int((pool / _OWNER_FILE).read_text().strip())
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


def process_alive(pid: int) -> bool:
    """Whether a process of this pid exists on this host (one we may not signal counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
