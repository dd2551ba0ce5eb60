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
segment nobody claimed) unlinks it.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
import tempfile
import time
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


class SegmentHeader(msgspec.Struct, frozen=True):
    layout: SegmentLayout
    is_complete: bool
    created_at: float


def default_staging_dir() -> Path:
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return shm
    return Path(tempfile.gettempdir())


def segment_nbytes(layout: SegmentLayout) -> int:
    return HEADER_BYTES + layout.num_blocks * sum(layout.bytes_per_block)


class StagingSegment:
    """A mapped segment file. Create with `create`, attach with `open`."""

    def __init__(self, path: Path, mm: mmap.mmap, header: SegmentHeader):
        self.path = path
        self._mm = mm
        self.header = header

    # -- life cycle -------------------------------------------------------------------
    @classmethod
    def create(cls, path: Path, layout: SegmentLayout) -> "StagingSegment":
        nbytes = segment_nbytes(layout)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, nbytes)
            mm = mmap.mmap(fd, nbytes)
        finally:
            os.close(fd)
        seg = cls(path, mm, SegmentHeader(layout=layout, is_complete=False, created_at=time.time()))
        seg._write_header()
        return seg

    @classmethod
    def open(cls, path: Path) -> "StagingSegment":
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError as e:
            raise KVTransferError(f"staged KV segment {path.name} does not exist") from e
        try:
            size = os.fstat(fd).st_size
            if size < HEADER_BYTES:
                raise KVTransferError(f"staged KV segment {path.name} is truncated")
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        header = cls._read_header(mm, path)
        if size != segment_nbytes(header.layout):
            mm.close()
            raise KVTransferError(f"staged KV segment {path.name} has the wrong size")
        return cls(path, mm, header)

    def close(self) -> None:
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
            mm.close()
            raise KVTransferError(f"staged KV segment {path.name} has no valid header")
        try:
            return msgspec.msgpack.decode(mm[_LEN.size : _LEN.size + length], type=SegmentHeader)
        except msgspec.DecodeError as e:
            mm.close()
            raise KVTransferError(f"staged KV segment {path.name} has a corrupt header") from e

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

    def buffer(self) -> memoryview:
        return memoryview(self._mm)


_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def owner_tag(engine_id: str) -> str:
    """The file-name-safe prefix that marks one engine incarnation's segments."""
    return _UNSAFE.sub("_", engine_id)


def segment_path(staging_dir: Path, engine_id: str, request_id: str) -> Path:
    return Path(staging_dir) / f"{SEGMENT_PREFIX}{owner_tag(engine_id)}-{_UNSAFE.sub('_', request_id)}"


def list_segments(staging_dir: Path, tag: str = "") -> list[Path]:
    """Segments in `staging_dir`, optionally only those of one owner tag."""
    # The "-" that `segment_path` puts after the tag: engine "p1" must not match "p10".
    return sorted(Path(staging_dir).glob(f"{SEGMENT_PREFIX}{tag}-*" if tag else f"{SEGMENT_PREFIX}*"))


def reclaim_expired(staging_dir: Path, lease_s: float, engine_id: str, now: float | None = None) -> int:
    """Unlink this engine's segments older than the lease; returns how many were reclaimed."""
    now = time.time() if now is None else now
    reclaimed = 0
    for path in list_segments(staging_dir, owner_tag(engine_id)):
        try:
            if now - path.stat().st_mtime > lease_s:
                path.unlink()
                reclaimed += 1
        except FileNotFoundError:
            continue
    return reclaimed
