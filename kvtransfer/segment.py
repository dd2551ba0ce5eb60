"""The staged-KV segment format: one request's prompt KV, contiguous, in a shared-memory file.

A segment is a file in the staging directory (``/dev/shm`` by default) holding a fixed
header followed by the KV of every layer for the request's prompt blocks::

    [ header (HEADER_BYTES) | layer 0: block 0 .. block n-1 | layer 1: ... | ... | trailer ]

Each layer region is ``num_blocks * bytes_per_block`` bytes, where a block's bytes are
exactly what the engine's paged KV tensor holds for that block (every vLLM 0.32 attention
backend pdserve runs on keeps a block's bytes in one contiguous run, see `copy.py`), so
the same bytes land in the consumer's blocks unchanged: both sides must have the same
per-block layout; the header records it and the reader checks it.

Ownership: a segment has one owner at a time. The producer engine writes it and marks it
complete in the header only after the last prompt layer is written; a reader never uses a
segment whose header is not complete. The consumer (or the producer's lease sweeper, for a
segment nobody claimed) gives it back with `recycle.recycle` (into its producer's pool,
see `pool.py`). A segment file can be larger than its segment (a recycled file of a size
class): readers size everything from the header (`segment_nbytes`).
"""

from __future__ import annotations

import mmap
import os
import struct
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from cluster.wire import KVTransferError
from kvtransfer.recycle import recycle

if TYPE_CHECKING:
    from kvtransfer.mapping import MappingCache
    from kvtransfer.pool import SegmentPool

HEADER_BYTES = 4096
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
    pool_dir: str | None = None  # the pool a consumed file goes back to; None: unlink it


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
            pool_dir = None
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

    def adopt(self, pool: "SegmentPool | None") -> None:
        """Make `pool` the one this segment's file goes back to once consumed (a consumer
        that fetched it into a file of its own pool); None: unlink it once consumed (a
        copy that belongs to no pool)."""
        pool_dir = str(pool.dir) if pool is not None else None
        self.header = msgspec.structs.replace(self.header, pool_dir=pool_dir)
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


def segment_is_usable(path: Path, num_tokens: int, block_size: int) -> bool:
    """Whether `path` holds a complete segment of `num_tokens` prompt tokens in blocks of
    `block_size` (what a consumer checks before it promises the scheduler those tokens)."""
    try:
        seg = StagingSegment.open(path)
    except KVTransferError:
        return False
    try:
        layout = seg.header.layout
        return (seg.header.is_complete and layout.num_tokens == num_tokens
                and layout.block_size == block_size)
    finally:
        seg.close()
