"""Claims on one staged segment: several decodes load the same prompt KV (n > 1).

A request with `n` choices is prefilled once and decoded `n` times. Its segment is staged
once and then split into `n` *claims*: claim 0 is the segment's own name, claims 1..n-1 are
hard links to the same file (``<segment name>+claim<i>``; ``+`` never occurs in a name
`names.segment_path` makes, so a claim name cannot collide with a request's segment). Each
claim is an ordinary segment name: one decode owns it, loads it and gives it back, the
router releases it, or the lease reclaims it, exactly as for a single-claimant segment
(docs/kvtransfer.md, "Ownership").

**The claim count is the file's link count.** Every way a claim ends (consumed, released,
expired, unlinked by a decode that did not load it) removes that claim's name and only it;
the file's bytes are freed, or go back to the producer's pool, when the last name goes.
`recycle.recycle` therefore pools a file only when it holds the last link (`st_nlink == 1`)
and otherwise just unlinks the claimant's name: pooling a file another claimant may still
read would let the producer overwrite it under that reader. The count lives in the file
system, not in a process, so it survives any claimant (or the producer) dying, and needs no
message between the claimants: a decode killed mid-load leaves one name, which the lease
reclaims.

Per claim (`lifecycle.CLAIM_TRANSITIONS`)::

    OUTSTANDING ──a decode opens it (shm) or the TCP fetch is acked──▶ TAKEN
         │ ──────the router gives it back (choice ended, request aborted)──▶ RELEASED
         └──────nobody came within the lease (the sweeper)──────────────────▶ EXPIRED

Per segment: ``SHARED`` (links > 1) ──a claim ends──▶ ... ──▶ ``LAST`` (one link) ──its
claim ends──▶ pooled or freed. Two claimants ending at the same instant may both see
another link and both unlink: the file is then freed instead of pooled (a lost reuse, never
a file reused under a reader).
"""

from __future__ import annotations

import os
from pathlib import Path

from cluster.wire import KVTransferError
from kvtransfer.names import SEGMENT_PREFIX, is_segment_name

CLAIM_MARK = "+claim"


def claim_path(segment: Path, index: int) -> Path:
    """The name of claim `index` of `segment` (claim 0 is the segment itself)."""
    return segment if index == 0 else segment.with_name(f"{segment.name}{CLAIM_MARK}{index}")


def is_claim_name(name: str) -> bool:
    """Whether `name` is an extra claim (1..n-1) on some segment."""
    return name.startswith(SEGMENT_PREFIX) and CLAIM_MARK in name


def split(segment: Path, num_claims: int) -> list[Path]:
    """Split a complete, staged `segment` into `num_claims` claims (the segment's own name
    plus `num_claims - 1` hard links); returns their paths, claim 0 first.

    All or nothing: when a link cannot be made, the links made so far are removed and the
    segment keeps its single claim. Raises KVTransferError when the segment is gone (it
    expired or was released before it could be split)."""
    if num_claims < 1:
        raise ValueError(f"a segment needs at least one claim, not {num_claims}")
    if not is_segment_name(segment.name) or is_claim_name(segment.name):
        raise ValueError(f"{segment.name} is not a staged segment")
    made: list[Path] = []
    try:
        for i in range(1, num_claims):
            link = claim_path(segment, i)
            os.link(segment, link)
            made.append(link)
    except FileNotFoundError as e:
        _undo(made)
        raise KVTransferError(f"staged KV {segment.name} is gone; cannot split it: {e}") from e
    except OSError:
        _undo(made)
        raise
    return [segment, *made]


def num_claimants(path: Path) -> int:
    """How many claims on the file `path` names are still outstanding (0: none)."""
    try:
        return os.stat(path).st_nlink
    except FileNotFoundError:
        return 0


def _undo(links: list[Path]) -> None:
    for link in links:
        link.unlink(missing_ok=True)
