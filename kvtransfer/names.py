"""Names of staged segments and pools: which engine incarnation owns a file, by its name.

Segment names carry the engine id (``producer_id-epoch``), so each incarnation's lease
sweeper (`reclaim.py`) reclaims only its own, and a name received from a peer can be
checked before it is joined to a directory.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

SEGMENT_PREFIX = "pdserve-kv-"
POOL_PREFIX = "pdserve-pool-"
SLAB_PREFIX = "pdserve-slab-"  # device path: a slab's record (device_connector.py), not a segment

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def owner_tag(engine_id: str) -> str:
    """The file-name-safe prefix that marks one engine incarnation's segments."""
    return _UNSAFE.sub("_", engine_id)


def is_segment_name(name: str) -> bool:
    """Whether `name` (a bare file name, e.g. from a peer) can name a staged segment."""
    return name.startswith(SEGMENT_PREFIX) and "/" not in name and name != SEGMENT_PREFIX


def segment_path(staging_dir: Path, engine_id: str, request_id: str) -> Path:
    return Path(staging_dir) / f"{SEGMENT_PREFIX}{owner_tag(engine_id)}-{_UNSAFE.sub('_', request_id)}"


def slab_record_path(segment_path: Path) -> Path:
    """Where the device path publishes the slab of the request whose segment would be
    `segment_path` (same directory and owner tag; never matched by `list_segments`)."""
    segment_path = Path(segment_path)
    return segment_path.with_name(SLAB_PREFIX + segment_path.name.removeprefix(SEGMENT_PREFIX))


def list_segments(staging_dir: Path, tag: str = "") -> list[Path]:
    """Segments in `staging_dir`, optionally only those of one owner tag."""
    # The "-" that `segment_path` puts after the tag: engine "p1" must not match "p10".
    return sorted(Path(staging_dir).glob(f"{SEGMENT_PREFIX}{tag}-*" if tag else f"{SEGMENT_PREFIX}*"))



def pool_dir_for(staging_dir: Path, engine_id: str) -> Path:
    return Path(staging_dir) / f"{POOL_PREFIX}{owner_tag(engine_id)}"


def process_alive(pid: int) -> bool:
    """Whether a process of this pid exists on this host (one we may not signal counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
