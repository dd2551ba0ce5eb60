"""Shared fixtures of the KV-transfer tests: staged segments with known bytes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kvtransfer.staging import SegmentLayout, StagingSegment, segment_path


def fill_pattern(seg: StagingSegment, seed: int) -> bytes:
    """Write deterministic random bytes into every layer; returns the whole payload."""
    rng = np.random.default_rng(seed)
    payload = bytearray()
    for i in range(len(seg.header.layout.layer_names)):
        view = seg.layer_view(i)
        data = rng.integers(0, 256, len(view), dtype=np.uint8).tobytes()
        view[:] = data
        view.release()
        payload += data
    return bytes(payload)


@pytest.fixture
def make_segment(tmp_path: Path):
    """make_segment(request_id, complete=True, engine_id="p0") -> (path, payload bytes)."""

    def make(request_id: str, *, complete: bool = True, engine_id: str = "p0",
             layout: SegmentLayout | None = None, staging_dir: Path = tmp_path,
             seed: int = 0) -> tuple[Path, bytes]:
        layout = layout or SegmentLayout(layer_names=["layer.0", "layer.1"],
                                         bytes_per_block=[256, 512], num_blocks=3,
                                         num_tokens=40, block_size=16)
        path = segment_path(staging_dir, engine_id, request_id)
        seg = StagingSegment.create(path, layout)
        payload = fill_pattern(seg, seed)
        if complete:
            seg.mark_complete()
        seg.close()
        return path, payload

    return make
