"""Shared fixtures of the KV-transfer tests: staged segments with known bytes."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from cluster.config import KVTransferSettings
from kvtransfer.service import ProducerService
from kvtransfer.staging import SegmentLayout, StagingSegment, segment_path


def wait_until(predicate, timeout_s: float = 5.0) -> bool:
    """Poll `predicate` until it holds (True) or `timeout_s` passes (False)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


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


@pytest.fixture
def producer(tmp_path):
    staging = tmp_path / "producer"
    staging.mkdir()
    service = ProducerService("prefill-0", KVTransferSettings(staging_dir=staging), "127.0.0.1")
    yield service
    service.close()
