"""Recycling segment files: give a consumed file back to its producer's pool, by size class.

Writing a freshly created tmpfs file costs a page allocation and a page fault per 4 KiB
(about 1-2 GB/s here, a tenth of memcpy), and so does mapping a file for the first time.
So segment files are never thrown away while their producer lives: `recycle` renames a
consumed file into the pool directory its header names, and the producer's `SegmentPool`
(`pool.py`) renames it back out for a later request of the same size class.
"""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path

_MIN_CLASS = 64 << 10


def size_class(nbytes: int) -> int:
    """Round up to one of four sizes per power of two (at most 25% slack), page aligned."""
    if nbytes <= _MIN_CLASS:
        return _MIN_CLASS
    top = 1 << (nbytes - 1).bit_length()  # next power of two >= nbytes
    step = top // 8  # classes top/2 + k*top/8: 5/8, 6/8, 7/8, 8/8 of top
    return -(-nbytes // step) * step



_pool_names = itertools.count()


def recycle(path: Path, pool_dir: str | Path | None, file_size: int | None = None) -> None:
    """Move a consumed segment file into `pool_dir` for reuse, or unlink it when there is
    no pool (it was never pooled, or its producer is gone). `file_size`, when the caller
    knows it, is used as the pooled file's size class.

    A file with several claims (`claims.py`: n > 1 decodes of one prefill) has one name per
    claim; only the holder of the last name pools it. Any other claimant drops its own
    name: pooling a file another claimant may still be reading would let the producer
    overwrite it under that reader."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return  # taken back already
    if st.st_nlink > 1:
        _unlink(path)
        return
    if file_size is None:
        file_size = st.st_size
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
    _unlink(path)


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass

