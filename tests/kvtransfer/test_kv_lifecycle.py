"""Lifecycles as code: every transition table accepts exactly its moves, and the connector's
consumer half reports how a request's KV was obtained, step by step with stand-ins."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import pytest
from vllm.v1.request import RequestStatus

from cluster.config import KVTransferSettings
from kvtransfer.lifecycle import (
    ALL_TABLES,
    DECODE_KV_TRANSITIONS,
    FETCH_TRANSITIONS,
    LOAD_TRANSITIONS,
    SAVE_TRANSITIONS,
    SEGMENT_WRITE_TRANSITIONS,
    DecodeKVState,
    FetchState,
    IllegalTransition,
    Lifecycle,
    LoadState,
    SaveState,
    check_table,
)
from kvtransfer.params import ConnectorSettings, KVLoadReport, StagedKV
from kvtransfer.testing import (
    ConnectorOutputStandIn,
    allocated_blocks,
    engine_request,
    finished_request,
    make_connector,
    new_request,
    paged_caches,
    run_save_step,
    scheduler_output,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("table", ALL_TABLES, ids=lambda t: next(iter(t)).__class__.__name__)
def test_every_move_of_a_table_is_allowed_and_every_other_is_rejected(table):
    check_table(table)
    for source, target in itertools.product(table, repeat=2):
        life = Lifecycle(table, source, "r1")
        if target in table[source]:
            life.move_to(target)
            assert life.state is target
        else:
            with pytest.raises(IllegalTransition, match=f"r1: {source.name} -> {target.name}"):
                life.move_to(target)
            assert life.state is source  # a rejected move changes nothing


def test_the_tables_say_what_the_protocol_says():
    # A published segment is never discarded, a discarded one never published.
    assert SAVE_TRANSITIONS[SaveState.STAGED] == frozenset()
    assert not Lifecycle(SEGMENT_WRITE_TRANSITIONS, next(iter(SEGMENT_WRITE_TRANSITIONS)),
                         "s").is_final
    # A load is planned before it runs; a request is never loaded twice.
    assert LoadState.LOADED not in LOAD_TRANSITIONS[LoadState.MATCHED]
    assert LOAD_TRANSITIONS[LoadState.LOADED] == frozenset()
    # Decode: KV is fetched before it is loaded; every live state can be aborted.
    assert DecodeKVState.LOADING not in DECODE_KV_TRANSITIONS[DecodeKVState.RECEIVED]
    live = [s for s, moves in DECODE_KV_TRANSITIONS.items() if moves]
    assert all(DecodeKVState.ABORTED in DECODE_KV_TRANSITIONS[s] for s in live)
    # TCP: a lost ack leaves a fetch RECEIVED, which is never FAILED afterwards.
    assert FETCH_TRANSITIONS[FetchState.RECEIVED] == frozenset({FetchState.CONSUMED})


# -- the consumer connector's report --------------------------------------------------------
BLOCK = 16
LAYERS = ["l0", "l1"]


def _staged(tmp_path: Path, num_tokens: int = 40) -> dict:
    """A prompt of `num_tokens` staged by a real producer half: its final kv_transfer_params."""
    sched = make_connector("kv_producer", tmp_path, "p0", BLOCK, half="scheduler")
    worker = make_connector("kv_producer", tmp_path, "p0", BLOCK)
    src = paged_caches(LAYERS, 8, (2, BLOCK, 4), fill="random")
    worker.register_kv_caches(src)
    run_save_step(worker, src, sched.build_connector_meta(
        scheduler_output([new_request("r", num_tokens, [4, 2, 6])], num_scheduled={"r": num_tokens})))
    _, params = sched.request_finished(
        finished_request("r", num_tokens + 1, RequestStatus.FINISHED_LENGTH_CAPPED), [4, 2, 6])
    assert StagedKV.from_params(params).num_tokens == num_tokens
    return params


def test_consumer_reports_transferred_after_a_clean_load(tmp_path):
    params = _staged(tmp_path)
    sched = make_connector("kv_consumer", tmp_path, "d0", BLOCK, half="scheduler")
    req = engine_request("r", 41, params)
    assert sched.get_num_new_matched_tokens(req, 0) == (40, False)
    sched.update_state_after_alloc(req, allocated_blocks([1, 0, 3]), 40)
    assert [load.dst_block_ids for load in sched.build_connector_meta(scheduler_output()).loads] == [(1, 0, 3)]
    _, report = sched.request_finished(
        finished_request("r", 45, RequestStatus.FINISHED_STOPPED, params), [1, 0, 3])
    assert KVLoadReport.from_params(report) == KVLoadReport(
        served_by="transferred", num_local_tokens=0, num_loaded_tokens=40)


def test_consumer_reports_recomputed_when_its_blocks_failed_to_load(tmp_path):
    params = _staged(tmp_path)
    sched = make_connector("kv_consumer", tmp_path, "d0", BLOCK, half="scheduler")
    req = engine_request("r", 41, params)
    sched.get_num_new_matched_tokens(req, 16)  # one block already cached on the decode
    sched.update_state_after_alloc(req, allocated_blocks([7, 1, 0]), 24)
    (load,) = sched.build_connector_meta(scheduler_output()).loads
    assert load.dst_block_ids == (1, 0) and load.first_block == 1
    sched.update_connector_output(ConnectorOutputStandIn(invalid_block_ids={0}))
    _, report = sched.request_finished(
        finished_request("r", 45, RequestStatus.FINISHED_STOPPED, params), [7, 1, 0])
    assert KVLoadReport.from_params(report) == KVLoadReport(
        served_by="recomputed", num_local_tokens=16, num_loaded_tokens=0, reason="load failed")


def test_consumer_reports_a_failed_load_that_vllm_finished_with_an_error(tmp_path):
    """Policy fail: vLLM ends the request (FINISHED_ERROR) before the load errors reach
    update_connector_output; the report must still say the load failed."""
    params = _staged(tmp_path)
    sched = make_connector("kv_consumer", tmp_path, "d0", BLOCK, half="scheduler")
    req = engine_request("r", 41, params)
    sched.get_num_new_matched_tokens(req, 0)
    sched.update_state_after_alloc(req, allocated_blocks([1, 0, 3]), 40)
    sched.build_connector_meta(scheduler_output())
    _, report = sched.request_finished(
        finished_request("r", 0, RequestStatus.FINISHED_ERROR, params), [1, 0, 3])
    assert KVLoadReport.from_params(report).reason == "load failed"


def test_consumer_reports_recomputed_when_the_segment_is_gone(tmp_path):
    params = _staged(tmp_path)
    Path(StagedKV.from_params(params).segment_path).unlink()
    sched = make_connector("kv_consumer", tmp_path, "d0", BLOCK, half="scheduler")
    req = engine_request("r", 41, params)
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)
    _, report = sched.request_finished(
        finished_request("r", 41, RequestStatus.FINISHED_STOPPED, params), [])
    assert KVLoadReport.from_params(report).served_by == "recomputed"
    # An ordinary request (no staged KV) gets no report at all.
    assert sched.request_finished(finished_request("x", 3, RequestStatus.FINISHED_STOPPED), []) == (
        False, None)


def test_producer_half_discards_and_never_publishes_twice(tmp_path):
    sched = make_connector("kv_producer", tmp_path, "p0", BLOCK, half="scheduler")
    sched.build_connector_meta(scheduler_output([new_request("r", 40, [1, 2, 3])],
                                                num_scheduled={"r": 16}))
    assert sched.request_finished(finished_request("r", 16, RequestStatus.FINISHED_ABORTED),
                                  [1, 2, 3]) == (False, None)
    assert sched.build_connector_meta(scheduler_output()).discards  # handed to the worker
    assert sched.request_finished(finished_request("r", 40, RequestStatus.FINISHED_STOPPED),
                                  [1, 2, 3]) == (False, None)  # gone: nothing to publish


# -- typed boundary ------------------------------------------------------------------------------
def test_connector_settings_take_their_defaults_from_kv_transfer_settings(tmp_path):
    defaults = KVTransferSettings()
    assert ConnectorSettings.from_extra_config({}) == ConnectorSettings(
        staging_dir=None, lease_s=defaults.lease_s,
        pool_bytes=int(defaults.staging_pool_gib * (1 << 30)), layerwise=defaults.layerwise,
        checksums=defaults.checksums,
        device_arena_bytes=int(defaults.device_staging_gib * (1 << 30)))
    custom = KVTransferSettings(lease_s=7, staging_pool_gib=0, layerwise=False, checksums="crc32")
    extra = ConnectorSettings.from_settings(custom, tmp_path).to_extra_config()
    assert ConnectorSettings.from_extra_config(extra) == ConnectorSettings(
        staging_dir=str(tmp_path), lease_s=7.0, pool_bytes=0, layerwise=False, checksums="crc32",
        device_arena_bytes=int(custom.device_staging_gib * (1 << 30)))
    with pytest.raises(ValueError, match="lease_sec"):
        ConnectorSettings.from_extra_config({"lease_sec": 5})


def test_the_services_and_the_params_import_neither_torch_nor_vllm():
    code = ("import sys, kvtransfer.service, kvtransfer.params; "
            "print(sorted(m for m in ('torch', 'vllm', 'kvtransfer.connector') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_staged_kv_params_round_trip_and_reject_garbage():
    staged = StagedKV(segment_path="/dev/shm/pdserve-kv-x", num_tokens=12)
    assert StagedKV.from_params(staged.to_params()) == staged
    assert StagedKV.from_params({"unrelated": 1}) is None
    from cluster.wire import KVTransferError
    with pytest.raises(KVTransferError):
        StagedKV.from_params({**staged.to_params(), "pdserve_num_tokens": "many"})
