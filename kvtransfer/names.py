"""Names of staged segments and pools: which engine incarnation owns a file, by its name.

Segment names carry the engine id (``producer_id-epoch``), so each incarnation's lease
sweeper (`reclaim.py`) reclaims only its own, and a name received from a peer can be
checked before it is joined to a directory.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection
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


# vLLM runs a request under the id it was given plus "-" and 8 random characters
# (`InputProcessor.assign_request_id`); the connector stages it under that internal id.
_ENGINE_ID_SUFFIX_LEN = 9


def staged_for_requests(staging_dir: Path, engine_id: str, request_ids: Collection[str]
                        ) -> list[Path]:
    """The files one engine incarnation staged for the engine requests it was given as
    `request_ids`: segments and, on the device path, slab records; under vLLM's internal
    id, or under the id itself (request id randomization off). One directory scan."""
    wanted = {_UNSAFE.sub("_", r) for r in request_ids}
    tag = owner_tag(engine_id)
    prefixes = (f"{SEGMENT_PREFIX}{tag}-", f"{SLAB_PREFIX}{tag}-")
    found: list[Path] = []
    if not wanted:
        return found
    with os.scandir(staging_dir) as entries:
        for entry in entries:
            prefix = next((p for p in prefixes if entry.name.startswith(p)), None)
            if prefix is None:
                continue
            rest = entry.name[len(prefix):]
            internal = (len(rest) > _ENGINE_ID_SUFFIX_LEN and rest[-_ENGINE_ID_SUFFIX_LEN] == "-"
                        and rest[:-_ENGINE_ID_SUFFIX_LEN] in wanted)
            if rest in wanted or internal:
                found.append(Path(entry.path))
    return sorted(found)


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
