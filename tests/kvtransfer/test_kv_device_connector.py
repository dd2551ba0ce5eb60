"""The vLLM connector on the device path, without an engine, on the CPU (issue 15).

`device_path: force` makes the connector stage into a `DeviceArena` on whatever device the
caches are on; here the CPU, with the slab moved over `dist` with gloo: the same code a CUDA
engine runs (`device_connector.py`), minus streams and CUDA IPC. Both connector halves of a
prefill and a decode are driven by hand (as in test_kv_connector.py) on paged caches in vLLM
0.32's CUDA layout (`harness.vllm_cuda_kv_caches`: [blocks, heads, block_size, 2 * head]
views of one [layers, blocks, block_size, heads, 2 * head] allocation), with the real
`ProducerService` and `ConsumerService` in between (handle, slab ticket, transport choice).
Every test ends with the arena empty and no slab record left: no leak.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from vllm.v1.request import RequestStatus

from cluster.config import KVTransferSettings
from cluster.engine_host import to_sampling_params
from cluster.wire import KVTransferError, SamplingSpec
from kvtransfer.device_path import device_transport_for, engine_arena_bytes, staging_medium
from kvtransfer.device_staging import SlabState
from kvtransfer.handle import decode_handle
from kvtransfer.harness import ModelShape, vllm_cuda_kv_caches
from kvtransfer.names import SLAB_PREFIX, list_segments, slab_record_path
from kvtransfer.params import PARAM_HOST_STAGING, PARAM_SLAB, ConnectorSettings, vllm_kv_transfer_config
from kvtransfer.service import ConsumerService, ProducerService
from kvtransfer.testing import (
    allocated_blocks,
    cached_requests,
    engine_request,
    finished_request,
    make_connector,
    new_request,
    run_save_step,
    scheduler_output,
)
from tests.kvtransfer.conftest import wait_until
from tests.net import free_port

SHAPE = ModelShape(num_layers=3, num_kv_heads=4, head_size=16, block_size=16, num_blocks=12)
NUM_PROMPT_TOKENS = 40  # 3 blocks of 16, the last one partial
SRC_BLOCKS = (5, 1, 9)  # the prefill's blocks: two in step 1, one more in step 2
DST_BLOCKS = (7, 2, 10)  # the decode's own blocks


@pytest.fixture
def store():
    from torch.distributed import TCPStore

    port = free_port()
    master = TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False,
                      timeout=timedelta(seconds=30))
    yield port
    del master


def _settings(tmp_path: Path, store_port: int, **kw) -> KVTransferSettings:
    values = dict(staging_dir=tmp_path, transport="auto", device_path="force",
                  dist_store_host="127.0.0.1", dist_store_port=store_port, lease_s=60,
                  connect_timeout_s=20, device_staging_gib=1 / 1024)  # a 1 MiB arena
    values.update(kw)
    return KVTransferSettings(**values)


def _extra(settings: KVTransferSettings, tmp_path: Path) -> dict:
    """kv_connector_extra_config as the services build it (make_connector adds staging_dir)."""
    extra = ConnectorSettings.from_settings(settings, tmp_path).to_extra_config()
    del extra["staging_dir"]
    return extra


def _random_caches() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    caches = vllm_cuda_kv_caches(SHAPE, SHAPE.num_kv_heads, "cpu")
    for kv in caches.values():
        kv.copy_(torch.randn(kv.shape, dtype=kv.dtype))
    return caches


class Prefill:
    """A prefill: its producer service and both halves of its connector."""

    def __init__(self, settings: KVTransferSettings, tmp_path: Path):
        self.service = ProducerService("prefill", settings, "127.0.0.1", sweep=False)
        extra = _extra(settings, tmp_path)
        engine_id = self.service.engine_id
        self.sched = make_connector("kv_producer", tmp_path, engine_id, SHAPE.block_size,
                                    half="scheduler", **extra)
        self.worker = make_connector("kv_producer", tmp_path, engine_id, SHAPE.block_size, **extra)
        self.caches = _random_caches()
        self.worker.register_kv_caches(self.caches)

    def prefill_in_two_chunks(self, request_id: str = "r") -> dict:
        """Step 1: tokens 0..19 in blocks 5, 1; step 2: tokens 20..39, block 9 added."""
        run_save_step(self.worker, self.caches, self.sched.build_connector_meta(
            scheduler_output([new_request(request_id, NUM_PROMPT_TOKENS, SRC_BLOCKS[:2])],
                             num_scheduled={request_id: 20})))
        run_save_step(self.worker, self.caches, self.sched.build_connector_meta(
            scheduler_output(cached=cached_requests((request_id, SRC_BLOCKS[2:], 20)),
                             num_scheduled={request_id: 20})))
        _, params = self.sched.request_finished(
            finished_request(request_id, NUM_PROMPT_TOKENS + 1, RequestStatus.FINISHED_LENGTH_CAPPED),
            list(SRC_BLOCKS))
        return params

    @property
    def arena(self):
        return self.worker.device_producer.arena

    def close(self) -> None:
        self.worker.shutdown()
        self.service.close()


class Decode:
    def __init__(self, settings: KVTransferSettings, tmp_path: Path):
        self.service = ConsumerService(settings, consumer_id="decode-svc")
        self.sched = make_connector("kv_consumer", tmp_path, "decode-0", SHAPE.block_size,
                                    half="scheduler")
        extra = _extra(settings, tmp_path)
        self.worker = make_connector("kv_consumer", tmp_path, "decode-0", SHAPE.block_size, **extra)
        self.caches = vllm_cuda_kv_caches(SHAPE, SHAPE.num_kv_heads, "cpu")
        self.worker.register_kv_caches(self.caches)

    def load(self, kv_transfer_params: dict, request_id: str = "r") -> set[int]:
        """The decode's engine: match, allocate DST_BLOCKS, one step; its load errors."""
        request = engine_request(request_id, NUM_PROMPT_TOKENS + 1, kv_transfer_params)
        matched, _ = self.sched.get_num_new_matched_tokens(request, 0)
        assert matched == NUM_PROMPT_TOKENS
        self.sched.update_state_after_alloc(request, allocated_blocks(DST_BLOCKS), matched)
        self.worker.bind_connector_metadata(self.sched.build_connector_meta(scheduler_output()))
        self.worker.start_load_kv(None)
        self.worker.clear_connector_metadata()
        return self.worker.get_block_ids_with_load_errors()

    def close(self) -> None:
        self.worker.shutdown()
        self.service.close()


def _blocks_equal(src: dict[str, torch.Tensor], dst: dict[str, torch.Tensor]) -> None:
    for name in src:
        for s, d in zip(SRC_BLOCKS, DST_BLOCKS):  # byte for byte, in vLLM's layout
            assert torch.equal(dst[name][d].contiguous().view(torch.uint8),
                               src[name][s].contiguous().view(torch.uint8)), (name, s, d)
        untouched = [b for b in range(SHAPE.num_blocks) if b not in DST_BLOCKS]
        assert dst[name][untouched].count_nonzero() == 0  # no other block written


def _no_slab_left(prefill: Prefill, tmp_path: Path) -> None:
    assert wait_until(lambda: prefill.arena.used_bytes == 0, timeout_s=10)
    assert prefill.arena.num_slabs() == 0
    assert prefill.worker.device_producer.num_published() == 0
    assert list(tmp_path.glob(SLAB_PREFIX + "*")) == []


def test_cpu_engines_keep_the_host_path_by_default(tmp_path):
    assert staging_medium(ConnectorSettings(), cache_is_cuda=False) == "host"
    worker = make_connector("kv_producer", tmp_path, "prefill-0", SHAPE.block_size)
    worker.register_kv_caches(_random_caches())
    assert worker.staging_medium == "host" and worker.device_producer is None
    worker.shutdown()
    # ... and no arena is counted against a CPU engine's memory.
    kwargs = vllm_kv_transfer_config("kv_producer", KVTransferSettings(), "p", tmp_path)
    assert engine_arena_bytes(kwargs, cache_is_cuda=False) == 0


def test_the_one_choice_of_staging_medium_and_device_transport():
    def medium(cuda: bool, **kw) -> str:
        return staging_medium(ConnectorSettings(**kw), cache_is_cuda=cuda)

    store = dict(dist_store_host="10.0.0.1", dist_store_port=29500)
    assert medium(True, transport="cuda_ipc") == "device"
    assert medium(True, transport="dist", **store) == "device"
    assert medium(True, transport="auto", **store) == "device"
    assert medium(True, transport="auto") == "host"  # another host's decode could not reach it
    assert medium(True, transport="shm") == medium(True, transport="tcp") == "host"
    assert medium(True, transport="cuda_ipc", device_path="off") == "host"
    assert medium(False, transport="cuda_ipc") == "host"
    assert medium(False, transport="tcp", device_path="force") == "device"

    assert device_transport_for("auto", True, arena_is_cuda=True, same_node=True) == "cuda_ipc"
    assert device_transport_for("auto", True, arena_is_cuda=True, same_node=False) == "dist"
    assert device_transport_for("auto", True, arena_is_cuda=False, same_node=True) == "dist"
    assert device_transport_for("dist", True, arena_is_cuda=True, same_node=True) == "dist"
    with pytest.raises(KVTransferError):
        device_transport_for("cuda_ipc", True, arena_is_cuda=True, same_node=False)
    with pytest.raises(KVTransferError):
        device_transport_for("auto", False, arena_is_cuda=True, same_node=False)


def test_a_chunked_prefill_is_staged_in_a_slab_and_loaded_block_exact_over_dist(tmp_path, store):
    settings = _settings(tmp_path, store)
    prefill, decode = Prefill(settings, tmp_path), Decode(settings, tmp_path)
    try:
        assert prefill.worker.staging_medium == "device"
        params = prefill.prefill_in_two_chunks()
        assert list_segments(tmp_path) == []  # nothing went through host segments
        slabs = prefill.worker.device_producer.published_slabs()  # the record is written
        assert [s.state for s in slabs] == [SlabState.READY]

        handle = prefill.service.handle_for(params, "r")
        ticket = decode_handle(handle).slab
        assert ticket is not None and ticket.num_tokens == NUM_PROMPT_TOKENS
        kv = decode.service.materialize(handle, "r")
        assert kv.staged.slab_transport == "dist"  # a CPU arena: dist (gloo), never cuda_ipc
        assert PARAM_SLAB in kv.kv_transfer_params

        assert decode.load(kv.kv_transfer_params) == set()
        _blocks_equal(prefill.caches, decode.caches)
        _no_slab_left(prefill, tmp_path)  # the completed send was the ack

        saves = prefill.worker.get_kv_connector_stats().data["transfers"]
        loads = decode.worker.get_kv_connector_stats().data["transfers"]
        assert [(r["direction"], r["outcome"]) for r in saves] == [("save", "ok")]
        assert [(r["direction"], r["transport"], r["outcome"]) for r in loads] == [
            ("load", "dist", "ok")]
        assert loads[0]["num_bytes"] == len(DST_BLOCKS) * sum(
            kv[0].numel() * kv.element_size() for kv in decode.caches.values())
    finally:
        decode.close()
        prefill.close()


def test_a_decode_after_a_local_prefix_hit_loads_the_rest_of_the_slab(tmp_path, store):
    settings = _settings(tmp_path, store)
    prefill, decode = Prefill(settings, tmp_path), Decode(settings, tmp_path)
    try:
        kv = decode.service.materialize(prefill.service.handle_for(prefill.prefill_in_two_chunks()))
        request = engine_request("r", NUM_PROMPT_TOKENS + 1, kv.kv_transfer_params)
        # The decode's prefix cache held the first block: it loads slab blocks 1 and 2.
        matched, _ = decode.sched.get_num_new_matched_tokens(request, SHAPE.block_size)
        assert matched == NUM_PROMPT_TOKENS - SHAPE.block_size
        decode.sched.update_state_after_alloc(request, allocated_blocks(DST_BLOCKS), matched)
        decode.worker.bind_connector_metadata(decode.sched.build_connector_meta(scheduler_output()))
        decode.worker.start_load_kv(None)
        assert decode.worker.get_block_ids_with_load_errors() == set()
        for name in prefill.caches:
            assert decode.caches[name][DST_BLOCKS[0]].count_nonzero() == 0  # its own, untouched
            for s, d in zip(SRC_BLOCKS[1:], DST_BLOCKS[1:]):
                assert torch.equal(decode.caches[name][d], prefill.caches[name][s])
        _no_slab_left(prefill, tmp_path)
    finally:
        decode.close()
        prefill.close()


def test_a_decode_that_never_comes_leaves_the_slab_to_the_lease(tmp_path, store):
    settings = _settings(tmp_path, store, lease_s=30)
    prefill, decode = Prefill(settings, tmp_path), Decode(settings, tmp_path)
    try:
        params = prefill.prefill_in_two_chunks()
        kv = decode.service.materialize(prefill.service.handle_for(params))
        worker = prefill.worker._producer  # the connector's producer worker half
        worker.poll_slabs()  # within the lease: kept
        assert prefill.arena.used_bytes > 0
        worker.poll_slabs(now=time.monotonic() + 31)
        _no_slab_left(prefill, tmp_path)
        records = prefill.worker.get_kv_connector_stats().data["transfers"]
        assert [(r["direction"], r["outcome"], r["request_id"]) for r in records] == [
            ("save", "ok", "r"), ("save", "expired", "r")]
        # A decode that comes late is refused (load errors: recompute or fail), never fed
        # memory that was freed.
        assert decode.load(kv.kv_transfer_params) == set(DST_BLOCKS)
        assert not any(kv.any() for kv in decode.caches.values())
    finally:
        decode.close()
        prefill.close()


def test_a_released_handle_frees_its_slab(tmp_path, store):
    settings = _settings(tmp_path, store)
    prefill = Prefill(settings, tmp_path)
    try:
        handle = prefill.service.handle_for(prefill.prefill_in_two_chunks())
        assert prefill.service.release(handle) is True  # the router gave up on the request
        prefill.worker.device_producer.poll()
        _no_slab_left(prefill, tmp_path)
    finally:
        prefill.close()


def test_an_aborted_prefill_frees_its_slab_while_writing(tmp_path, store):
    prefill = Prefill(_settings(tmp_path, store), tmp_path)
    try:
        run_save_step(prefill.worker, prefill.caches, prefill.sched.build_connector_meta(
            scheduler_output([new_request("r", NUM_PROMPT_TOKENS, SRC_BLOCKS[:2])],
                             num_scheduled={"r": 20})))
        assert prefill.arena.num_slabs() == 1  # WRITING
        aborted = finished_request("r", 20, RequestStatus.FINISHED_ABORTED)
        assert prefill.sched.request_finished(aborted, list(SRC_BLOCKS[:2])) == (False, None)
        run_save_step(prefill.worker, prefill.caches,
                      prefill.sched.build_connector_meta(scheduler_output()))  # carries the discard
        _no_slab_left(prefill, tmp_path)
        assert list_segments(tmp_path) == []
    finally:
        prefill.close()


def test_a_request_the_arena_cannot_hold_takes_the_host_path(tmp_path, store):
    settings = _settings(tmp_path, store, device_staging_gib=1024 / (1 << 30))  # 1 KiB arena
    prefill, decode = Prefill(settings, tmp_path), Decode(settings, tmp_path)
    try:
        params = prefill.prefill_in_two_chunks()
        assert prefill.arena.num_refused == 1 and prefill.arena.used_bytes == 0
        handle = prefill.service.handle_for(params)
        assert decode_handle(handle).slab is None  # a segment, as on the host path
        assert len(list_segments(tmp_path)) == 1
        kv = decode.service.materialize(handle)
        assert kv.staged.slab is None
        assert decode.load(kv.kv_transfer_params) == set()
        _blocks_equal(prefill.caches, decode.caches)
        assert list_segments(tmp_path) == []  # consumed
    finally:
        decode.close()
        prefill.close()


def test_a_request_for_several_decodes_is_staged_in_a_segment_and_split_into_claims(tmp_path, store):
    """n > 1: the prefill worker sets PARAM_HOST_STAGING; a slab serves one decode, so the
    request takes the host path although the arena has room, and its segment splits."""
    settings = _settings(tmp_path, store)
    prefill = Prefill(settings, tmp_path)
    try:
        sp = to_sampling_params(SamplingSpec(max_tokens=1), max_tokens=1,
                                kv_transfer_params={PARAM_HOST_STAGING: True})
        request = dataclasses.replace(new_request("r", NUM_PROMPT_TOKENS, SRC_BLOCKS[:2]),
                                      sampling_params=sp)  # where vLLM's NewRequestData has them
        run_save_step(prefill.worker, prefill.caches, prefill.sched.build_connector_meta(
            scheduler_output([request], num_scheduled={"r": 20})))
        run_save_step(prefill.worker, prefill.caches, prefill.sched.build_connector_meta(
            scheduler_output(cached=cached_requests(("r", SRC_BLOCKS[2:], 20)),
                             num_scheduled={"r": 20})))
        _, params = prefill.sched.request_finished(
            finished_request("r", NUM_PROMPT_TOKENS + 1, RequestStatus.FINISHED_LENGTH_CAPPED),
            list(SRC_BLOCKS))
        assert prefill.arena.num_slabs() == 0 and prefill.arena.num_refused == 0
        handle = prefill.service.handle_for(params)
        assert decode_handle(handle).slab is None
        claims = prefill.service.claims_for(handle, 3, "r")
        assert len(claims) == 3
        for claim in claims:
            decode = Decode(settings, tmp_path)
            try:
                kv = decode.service.materialize(claim)
                assert kv.staged.slab is None
                assert decode.load(kv.kv_transfer_params) == set()
                _blocks_equal(prefill.caches, decode.caches)
            finally:
                decode.close()
        assert list_segments(tmp_path) == []  # the last claim took the segment
    finally:
        prefill.close()


def test_a_claim_on_this_host_lends_the_slab_until_its_ack_or_its_claimants_death(tmp_path, store):
    """The cuda_ipc ownership moves (the claim is a rename of the slab record, the ack the
    unlink of the claim), driven by hand: CUDA IPC itself needs a GPU."""
    prefill = Prefill(_settings(tmp_path, store), tmp_path)
    try:
        producer = prefill.worker.device_producer
        for request_id, claimant_alive in (("a", True), ("b", False)):
            params = prefill.prefill_in_two_chunks(request_id)
            record = slab_record_path(Path(params["pdserve_segment_path"]))
            claimant = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
            claimed = record.with_name(f"{record.name}.claimed-{claimant.pid}")
            record.rename(claimed)  # what DeviceConsumer._load_ipc does first
            producer.poll(now=time.monotonic() + 3600)  # the lease never frees a LENT slab
            (slab,) = producer.published_slabs()
            assert slab.state is SlabState.LENT
            if claimant_alive:
                claimed.unlink()  # the ack
            claimant.kill()
            claimant.wait()
            producer.poll()
            assert slab.state is SlabState.FREE
            _no_slab_left(prefill, tmp_path)
    finally:
        prefill.close()
