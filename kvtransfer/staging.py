"""Host staging, as one import: re-exports the modules that each hold one of its concepts.

Kept so that code written against the former single module keeps importing; new code
imports the concept's own module:

    segment.py   the segment format (header, layout, StagingSegment)
    names.py     segment and pool names, owner tags, process liveness
    recycle.py   size classes and giving a consumed file back to its pool
    mapping.py   MappingCache, kept mappings keyed by inode
    pool.py      SegmentPool, a producer's recycled files
    reclaim.py   expired leases, dead producers' leftovers, and the one Sweeper
"""

from kvtransfer.mapping import MappingCache
from kvtransfer.names import (
    POOL_PREFIX,
    SEGMENT_PREFIX,
    is_segment_name,
    list_segments,
    owner_tag,
    pool_dir_for,
    process_alive,
    segment_path,
)
from kvtransfer.pool import SegmentPool
from kvtransfer.reclaim import Sweeper, reclaim_expired, reclaim_orphans
from kvtransfer.recycle import recycle, size_class
from kvtransfer.segment import (
    HEADER_BYTES,
    SegmentHeader,
    SegmentLayout,
    StagingSegment,
    create_mapped_file,
    default_staging_dir,
    payload_nbytes,
    segment_nbytes,
)

__all__ = [
    "HEADER_BYTES", "POOL_PREFIX", "SEGMENT_PREFIX", "MappingCache", "SegmentHeader",
    "SegmentLayout", "SegmentPool", "StagingSegment", "Sweeper", "create_mapped_file",
    "default_staging_dir", "is_segment_name", "list_segments", "owner_tag", "payload_nbytes",
    "pool_dir_for", "process_alive", "reclaim_expired", "reclaim_orphans", "recycle",
    "segment_nbytes", "segment_path", "size_class",
]
