"""The decode worker's KV parts with a stand-in engine: the connector's report is the last word
on served_by, the lifecycle ends in a final state, and unconsumed KV is discarded whatever way
the request ends."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cluster.config import KVTransferSettings
from cluster.wire import EngineRequest, SamplingSpec
from decode_worker.worker import DecodeWorker
from kvtransfer.params import KVLoadReport
from kvtransfer.service import ConsumerService

pytest.importorskip("vllm")  # to_sampling_params builds vLLM's SamplingParams


@dataclass
class _Completion:
    token_ids: list[int]
    finish_reason: str | None = None


@dataclass
class _Output:
    request_id: str
    outputs: list[_Completion]
    finished: bool = False
    num_cached_tokens: int = 0
    kv_transfer_params: dict | None = None


@dataclass
class _Engine:
    """Yields `outputs` for any request; records what the worker handed it."""

    outputs: list[_Output]
    seen_params: list = field(default_factory=list)

    async def stream(self, request_id, prompt_token_ids, sampling_params):
        self.seen_params.append((sampling_params.extra_args or {}).get("kv_transfer_params"))
        for out in self.outputs:
            yield out


def _worker(settings: KVTransferSettings, engine: _Engine) -> DecodeWorker:
    worker = DecodeWorker.__new__(DecodeWorker)  # its KV parts, without an engine host
    worker.instance_id, worker.role = "decode-0", "decode"
    worker._kv = ConsumerService(settings)
    worker._engine = engine
    worker._queued_prompt_tokens = 0
    worker._fetch_transfers = []
    return worker


def _request(handle, num_prompt: int = 41) -> EngineRequest:
    return EngineRequest(request_id="r1", prompt_token_ids=tuple(range(num_prompt)),
                         sampling=SamplingSpec(max_tokens=3), kv_handle=handle)


async def test_the_connectors_report_overrides_the_first_deltas_served_by(producer, make_segment):
    path, _ = make_segment("r1", engine_id=producer.engine_id, staging_dir=producer.staging_dir)
    handle = producer.handle_for({"pdserve_segment_path": str(path), "pdserve_num_tokens": 40})
    report = KVLoadReport(served_by="recomputed", num_local_tokens=16, num_loaded_tokens=0,
                          reason="staged KV unusable")
    engine = _Engine([_Output("r1", [_Completion([7])], num_cached_tokens=40),
                      _Output("r1", [_Completion([8], "length")], finished=True,
                              kv_transfer_params=report.to_params())])
    worker = _worker(KVTransferSettings(transport="shm", staging_dir=producer.staging_dir), engine)

    deltas = [d async for d in worker.generate(_request(handle))]

    assert engine.seen_params == [{"pdserve_segment_path": str(path), "pdserve_num_tokens": 40}]
    assert deltas[0].served_by == "transferred"  # the KV was delivered to the engine
    assert deltas[-1].served_by == "recomputed"  # ... which the connector says it recomputed
    assert deltas[-1].num_prompt_tokens_computed == 41 - 16
    assert deltas[-1].kv_load_s == deltas[0].kv_load_s is not None
    assert not Path(path).exists()  # not consumed by the engine: the worker discarded it
    (fetch,) = worker._fetch_transfers
    assert fetch.outcome == "ok" and fetch.request_id == "r1" and fetch.transport == "shm"


async def test_a_cancelled_stream_discards_the_kv(producer, make_segment):
    path, _ = make_segment("r1", engine_id=producer.engine_id, staging_dir=producer.staging_dir)
    handle = producer.handle_for({"pdserve_segment_path": str(path), "pdserve_num_tokens": 40})
    engine = _Engine([_Output("r1", [_Completion([7])], num_cached_tokens=40),
                      _Output("r1", [_Completion([8])])])
    worker = _worker(KVTransferSettings(transport="shm", staging_dir=producer.staging_dir), engine)
    stream = worker.generate(_request(handle))
    first = await anext(stream)
    assert first.served_by == "transferred" and first.num_prompt_tokens_computed == 1
    await stream.aclose()  # the client went away: RUNNING -> ABORTED
    assert not Path(path).exists() and worker._queued_prompt_tokens == 0


async def test_a_failed_fetch_is_recorded_with_its_error(producer, make_segment):
    path, _ = make_segment("r1", engine_id=producer.engine_id, staging_dir=producer.staging_dir)
    handle = producer.handle_for({"pdserve_segment_path": str(path), "pdserve_num_tokens": 40})
    producer.release(handle)
    worker = _worker(KVTransferSettings(transport="shm", staging_dir=producer.staging_dir,
                                        on_failure="fail"), _Engine([]))
    (delta,) = [d async for d in worker.generate(_request(handle))]
    assert delta.finish_reason == "error" and "gone" in delta.error
    (fetch,) = worker._fetch_transfers
    assert fetch.outcome == "failed" and fetch.request_id == "r1" and "gone" in fetch.error
