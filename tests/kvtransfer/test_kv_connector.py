"""The vLLM connector without an engine: both halves driven by hand with stand-in configs.

vLLM hands the worker half one paged tensor per layer with blocks at dim 0; here a layer
is [num_blocks, 2, num_kv_heads, block_size, head_dim] = [8, 2, 2, 32, 4] on the prefill.
The scheduler half sees only stand-ins of the fields it reads (request ids, prompt ids,
block ids, token counts), so every step of the producer → consumer handoff runs on a CPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from vllm.v1.request import RequestStatus

from kvtransfer.connector import (
    PARAM_NUM_TOKENS,
    PARAM_SEGMENT,
    LoadSpec,
    PdserveConnector,
    PdserveConnectorMetadata,
    SaveSpec,
)
from kvtransfer.staging import StagingSegment, list_segments, segment_path
from kvtransfer.testing import (
    allocated_blocks,
    cached_requests,
    engine_request,
    finished_request,
    make_connector,
    new_request,
    paged_caches,
    run_load_step,
    run_save_step,
    scheduler_output,
)

BLOCK_SIZE = 32
LAYERS = ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"]
NUM_PROMPT_TOKENS = 70  # not a multiple of the block size: the last block is partial


def _connector(role: str, staging: Path, engine_id: str, role_half="worker",
               **extra) -> PdserveConnector:
    return make_connector(role, staging, engine_id, BLOCK_SIZE, half=role_half, **extra)


def _caches(num_blocks: int, fill: str) -> dict[str, torch.Tensor]:
    return paged_caches(LAYERS, num_blocks, (2, 2, BLOCK_SIZE, 4), fill=fill)


_run_save_step = run_save_step


def _consumer(staging: Path, caches: dict[str, torch.Tensor] | None = None
              ) -> tuple[PdserveConnector, dict[str, torch.Tensor]]:
    """A decode's worker half over `caches` (default: 10 zeroed blocks per layer)."""
    consumer = _connector("kv_consumer", staging, "decode-0")
    dst = caches if caches is not None else _caches(10, "zeros")
    consumer.register_kv_caches(dst)
    return consumer, dst


def _load(worker: PdserveConnector, load: LoadSpec) -> None:
    run_load_step(worker, load)


def _stage_two_steps(tmp_path: Path, **extra) -> tuple[Path, dict[str, torch.Tensor]]:
    tmp_path.mkdir(exist_ok=True)
    producer = _connector("kv_producer", tmp_path, "prefill-0", **extra)
    src = _caches(8, "random")
    producer.register_kv_caches(src)
    path = str(segment_path(tmp_path, "prefill-0", "req-1"))
    # step 1 computes tokens 0..39 (blocks 5, 1); step 2 tokens 40..69 (rewrites block 1, adds 6)
    _run_save_step(producer, src, PdserveConnectorMetadata(saves=[SaveSpec(
        request_id="req-1", segment_path=path, block_ids=(5, 1), first_block=0, end_token=40,
        num_prompt_tokens=NUM_PROMPT_TOKENS)]))
    seg = StagingSegment.open(Path(path))
    assert not seg.header.is_complete  # not published mid-prompt
    seg.close()
    _run_save_step(producer, src, PdserveConnectorMetadata(saves=[SaveSpec(
        request_id="req-1", segment_path=path, block_ids=(5, 1, 6), first_block=1, end_token=70,
        num_prompt_tokens=NUM_PROMPT_TOKENS)]))
    return Path(path), src


@pytest.fixture
def staged(tmp_path):
    """A prompt staged in two chunked-prefill steps from non-contiguous blocks (5, 1, 6)."""
    path, src = _stage_two_steps(tmp_path)
    return path, src, (5, 1, 6)


def _payload(path: Path) -> bytes:
    seg = StagingSegment.open(path)
    try:
        return b"".join(bytes(seg.layer_view(i)) for i in range(len(LAYERS)))
    finally:
        seg.close()


def test_staging_after_the_forward_writes_the_same_segment_as_layer_by_layer(tmp_path):
    torch.manual_seed(0)
    layerwise_path, _ = _stage_two_steps(tmp_path / "a")
    torch.manual_seed(0)
    after_path, _ = _stage_two_steps(tmp_path / "b", layerwise=False)
    assert _payload(after_path) == _payload(layerwise_path)


def test_checksummed_segment_loads_and_a_damaged_block_is_refused(tmp_path):
    path, src = _stage_two_steps(tmp_path, checksums="crc32")
    assert StagingSegment.open(path).header.layout.trailer_nbytes > 0
    consumer, dst = _consumer(tmp_path)
    _load(consumer, LoadSpec(request_id="req-1", segment_path=str(path), dst_block_ids=(7, 2, 9),
                          first_block=0))
    assert consumer.get_block_ids_with_load_errors() == set()
    assert torch.equal(dst[LAYERS[1]][9], src[LAYERS[1]][6])

    path, _ = _stage_two_steps(tmp_path / "again", checksums="crc32")
    seg = StagingSegment.open(path)
    view = seg.layer_view(1)
    view[len(view) - 1] ^= 0xFF  # flip one byte of layer 1's last block
    view.release()
    seg.close()
    dst = _caches(10, "zeros")
    consumer.register_kv_caches(dst)
    _load(consumer, LoadSpec(request_id="req-1", segment_path=str(path), dst_block_ids=(7, 2, 9),
                          first_block=0))
    assert consumer.get_block_ids_with_load_errors() == {7, 2, 9}
    assert not any(kv.any() for kv in dst.values())  # nothing loaded from damaged KV


def test_save_then_load_copies_blocks_between_non_contiguous_ids(staged, tmp_path):
    path, src, src_blocks = staged
    seg = StagingSegment.open(path)
    assert seg.header.is_complete
    assert seg.header.layout.num_blocks == 3 and seg.header.layout.num_tokens == NUM_PROMPT_TOKENS
    seg.close()

    consumer, dst = _consumer(tmp_path)
    _load(consumer, LoadSpec(request_id="req-1", segment_path=str(path), dst_block_ids=(7, 2, 9),
                             first_block=0))

    assert consumer.get_block_ids_with_load_errors() == set()
    for name in LAYERS:
        for d, s in zip((7, 2, 9), src_blocks):
            assert torch.equal(dst[name][d], src[name][s])
        untouched = [b for b in range(10) if b not in (7, 2, 9)]
        assert not dst[name][untouched].any()
    assert not path.exists()  # the consumer owned the segment once it opened it
    stats = consumer.get_kv_connector_stats()
    assert stats.reduce() == {"num_transfers": 1, "num_failed": 0,
                              "num_bytes": 3 * 2 * 2 * 2 * BLOCK_SIZE * 4 * 4}


def test_load_after_a_local_prefix_hit_starts_mid_segment(staged, tmp_path):
    path, src, _ = staged
    consumer, dst = _consumer(tmp_path)
    # The decode already had block 0's 32 tokens cached: it loads segment blocks 1 and 2.
    _load(consumer, LoadSpec(request_id="req-1", segment_path=str(path), dst_block_ids=(4, 0),
                             first_block=1))
    for name in LAYERS:
        assert torch.equal(dst[name][4], src[name][1]) and torch.equal(dst[name][0], src[name][6])


def test_incomplete_segment_reports_its_blocks_as_load_errors(tmp_path):
    producer = _connector("kv_producer", tmp_path, "prefill-0")
    src = _caches(8, "random")
    producer.register_kv_caches(src)
    path = str(segment_path(tmp_path, "prefill-0", "req-1"))
    _run_save_step(producer, src, PdserveConnectorMetadata(saves=[SaveSpec(
        request_id="req-1", segment_path=path, block_ids=(5, 1), first_block=0, end_token=40,
        num_prompt_tokens=NUM_PROMPT_TOKENS)]))  # the prefill never got to token 70

    consumer, dst = _consumer(tmp_path)
    _load(consumer, LoadSpec(request_id="req-1", segment_path=path, dst_block_ids=(7, 2, 9),
                             first_block=0))

    assert consumer.get_block_ids_with_load_errors() == {7, 2, 9}
    assert consumer.get_block_ids_with_load_errors() == set()  # reported once
    assert not any(kv.any() for kv in dst.values())  # nothing computed on partial KV
    assert consumer.get_kv_connector_stats().reduce()["num_failed"] == 1


def test_blocks_numpy_cannot_view_are_loaded_through_torch(staged, tmp_path):
    """A cache whose blocks are not byte-contiguous rows (here: the innermost dims
    transposed) takes torch's copy instead of numpy's, with the same result."""
    path, src, src_blocks = staged
    caches = {name: torch.zeros(10, 2, 2, 4, BLOCK_SIZE).transpose(-1, -2) for name in LAYERS}
    consumer, dst = _consumer(tmp_path, caches)
    _load(consumer, LoadSpec(request_id="req-1", segment_path=str(path), dst_block_ids=(7, 2, 9),
                             first_block=0))
    assert consumer.get_block_ids_with_load_errors() == set()
    for name in LAYERS:
        for d, s in zip((7, 2, 9), src_blocks):
            assert torch.equal(dst[name][d], src[name][s])


def test_layout_mismatch_is_a_load_error(staged, tmp_path):
    path, _, _ = staged
    consumer = _connector("kv_consumer", tmp_path, "decode-0")
    consumer.register_kv_caches({name: torch.zeros(10, 2, 4, BLOCK_SIZE, 4) for name in LAYERS})
    _load(consumer, LoadSpec(request_id="req-1", segment_path=str(path), dst_block_ids=(1, 2, 3),
                             first_block=0))
    assert consumer.get_block_ids_with_load_errors() == {1, 2, 3}


# -- the scheduler halves, end to end ---------------------------------------------------
_scheduler_output = scheduler_output


def test_scheduler_halves_hand_a_chunked_prefill_to_a_decode(tmp_path):
    sched_p = _connector("kv_producer", tmp_path, "prefill-0", "scheduler")
    worker_p = _connector("kv_producer", tmp_path, "prefill-0")
    src = _caches(8, "random")
    worker_p.register_kv_caches(src)

    # Step 1: 40 of the 70 prompt tokens, blocks 5 and 1.
    new = new_request("r", 70, [5, 1])
    _run_save_step(worker_p, src, sched_p.build_connector_meta(
        _scheduler_output([new], num_scheduled={"r": 40})))
    # Step 2: the remaining 30 tokens; the scheduler adds block 6.
    cached = cached_requests(("r", [6], 40))
    _run_save_step(worker_p, src, sched_p.build_connector_meta(
        _scheduler_output(cached=cached, num_scheduled={"r": 30})))
    finished = finished_request("r", 71, RequestStatus.FINISHED_LENGTH_CAPPED)
    delay_free, params = sched_p.request_finished(finished, [5, 1, 6])
    assert delay_free is False  # the segment holds its own copy: blocks free at once
    assert params[PARAM_NUM_TOKENS] == 70 and Path(params[PARAM_SEGMENT]).exists()

    # The decode's prompt is the prefill's plus its first token.
    sched_d = _connector("kv_consumer", tmp_path, "decode-0", "scheduler")
    worker_d = _connector("kv_consumer", tmp_path, "decode-0")
    dst = _caches(10, "zeros")
    worker_d.register_kv_caches(dst)
    request = engine_request("r", 71, params)
    assert sched_d.get_num_new_matched_tokens(request, 0) == (70, False)
    blocks = allocated_blocks([3, 8, 0])
    sched_d.update_state_after_alloc(request, blocks, 70)
    worker_d.bind_connector_metadata(sched_d.build_connector_meta(_scheduler_output()))
    worker_d.start_load_kv(None)
    worker_d.clear_connector_metadata()

    assert worker_d.get_block_ids_with_load_errors() == set()
    for name in LAYERS:
        for d, s in zip((3, 8, 0), (5, 1, 6)):
            assert torch.equal(dst[name][d], src[name][s])
    assert list_segments(tmp_path) == []  # consumed: nothing left staged


def test_consumer_recomputes_when_the_segment_is_gone(tmp_path):
    sched_d = _connector("kv_consumer", tmp_path, "decode-0", "scheduler")
    params = {PARAM_SEGMENT: str(tmp_path / "pdserve-kv-gone"), PARAM_NUM_TOKENS: 70}
    request = engine_request("r", 71, params)
    assert sched_d.get_num_new_matched_tokens(request, 0) == (0, False)


def test_aborted_prefill_discards_its_partial_segment(tmp_path):
    sched_p = _connector("kv_producer", tmp_path, "prefill-0", "scheduler")
    worker_p = _connector("kv_producer", tmp_path, "prefill-0")
    src = _caches(8, "random")
    worker_p.register_kv_caches(src)
    new = new_request("r", 70, [5, 1])
    _run_save_step(worker_p, src, sched_p.build_connector_meta(
        _scheduler_output([new], num_scheduled={"r": 40})))
    assert len(list_segments(tmp_path)) == 1  # partially written, open in the worker

    aborted = finished_request("r", 40, RequestStatus.FINISHED_ABORTED)
    assert sched_p.request_finished(aborted, [5, 1]) == (False, None)
    # The next step's metadata carries the discard to the worker, which unlinks.
    _run_save_step(worker_p, src, sched_p.build_connector_meta(_scheduler_output()))
    assert list_segments(tmp_path) == []


def test_the_stats_aggregate_vllm_keeps_between_logs_is_bounded():
    """vLLM's logging stat logger aggregates every step's transfer records until
    do_log_stats(), which nothing in a pdserve worker calls: unbounded, it grew the worker
    replicas ~0.7 MiB/min in the 20-minute soak (bench/results/soak-cpu-2core)."""
    from kvtransfer.metadata import MAX_AGGREGATED_RECORDS, PdserveConnectorStats

    total = PdserveConnectorStats(data={"transfers": []})
    for i in range(3 * MAX_AGGREGATED_RECORDS):
        step = PdserveConnectorStats(data={"transfers": [
            {"num_bytes": 1, "outcome": "ok", "request_id": f"r{i}"}]})
        total = total.aggregate(step)
    records = total.data["transfers"]
    assert len(records) == MAX_AGGREGATED_RECORDS
    assert records[-1]["request_id"] == f"r{3 * MAX_AGGREGATED_RECORDS - 1}"  # the newest kept
    assert total.reduce()["num_transfers"] == MAX_AGGREGATED_RECORDS
