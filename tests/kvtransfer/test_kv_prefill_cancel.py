"""A prefill that ends without handing out a handle releases what its engine staged, at
once instead of at the end of the lease: the real `ProducerService` and staging directory,
a prefill worker over a fake engine that stages as vLLM's connector does (under vLLM's
internal request id, `<id>-prefill-<8 characters>`), and the real worker channel.

The fault it covers (bench/results/faults-cpu-2core, SIGSTOP of a prefill): the router gave
up on the frozen instance and closed its channel; the worker, thawed, finished the prompt
for nobody, and 2-3 segments waited for the 120 s lease."""

from __future__ import annotations

import asyncio
import collections
from types import SimpleNamespace

import pytest

from cluster.channel import ChannelError, ChannelServer, WorkerChannelClient
from cluster.config import KVTransferSettings
from cluster.wire import EngineRequest, SamplingSpec
from kvtransfer.service import ProducerService
from kvtransfer.staging import list_segments
from prefill_worker.worker import PrefillAborted, PrefillWorker

VLLM_SUFFIX = "-0a1b2c3d"  # what vLLM appends to the request id it is given


class _Engine:
    """Stages the prompt's segment (complete) as the connector would, then holds the final
    output back (the worker is frozen, or the output is on its way). An abort ends the
    stream with vLLM's abort output, which names no segment."""

    def __init__(self, make_segment, engine_id: str):
        self._make_segment = make_segment
        self._engine_id = engine_id
        self.staged = asyncio.Event()
        self._aborted = asyncio.Event()

    async def stream(self, request_id, prompt_token_ids, sampling_params):
        self._make_segment(request_id + VLLM_SUFFIX, engine_id=self._engine_id)
        self.staged.set()
        await self._aborted.wait()
        yield SimpleNamespace(outputs=[SimpleNamespace(token_ids=[])], kv_transfer_params=None,
                              num_cached_tokens=0)

    async def abort(self, request_id):
        self._aborted.set()


@pytest.fixture
def service(tmp_path):
    kv = ProducerService("prefill-0", KVTransferSettings(staging_dir=tmp_path, lease_s=120.0),
                         "127.0.0.1", sweep=False)
    yield kv
    kv.close()


def _worker(service: ProducerService, engine: _Engine) -> PrefillWorker:
    worker = PrefillWorker.__new__(PrefillWorker)  # no engine process: the fake above
    worker.instance_id = "prefill-0"
    worker._kv, worker._engine = service, engine
    worker._queued_prompt_tokens = 0
    worker._in_flight, worker._aborted = set(), set()
    worker._answered = collections.OrderedDict()
    worker._channel = None
    return worker


def _req(rid: str) -> EngineRequest:
    return EngineRequest(request_id=rid, prompt_token_ids=(1, 2, 3),
                         sampling=SamplingSpec(max_tokens=8, temperature=0.0))


async def test_a_prefill_cancelled_after_its_kv_was_saved_releases_it(tmp_path, service, make_segment):
    make_segment("other-prefill" + VLLM_SUFFIX, engine_id=service.engine_id)  # a neighbour's
    engine = _Engine(make_segment, service.engine_id)
    task = asyncio.create_task(_worker(service, engine).prefill(_req("req-1")))
    await engine.staged.wait()
    assert len(list_segments(tmp_path)) == 2
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [p.name for p in list_segments(tmp_path)] == [
        f"pdserve-kv-{service.engine_id}-other-prefill{VLLM_SUFFIX}"]  # only the neighbour's


async def test_kv_staged_after_the_cancellation_goes_at_the_next_sweep(tmp_path, service,
                                                                       make_segment):
    engine = _Engine(make_segment, service.engine_id)
    task = asyncio.create_task(_worker(service, engine).prefill(_req("req-1")))
    await engine.staged.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert list_segments(tmp_path) == []
    # The engine's last step ran after the cancellation reached the worker: it stages again
    # (vLLM drops the output that would have named it). Beside it, a live request's.
    make_segment("req-1-prefill-9f8e7d6c", engine_id=service.engine_id)
    make_segment("req-2-prefill" + VLLM_SUFFIX, engine_id=service.engine_id)
    assert service.reclaim_expired() == 0  # one sweep now, well within the 120 s lease
    assert [p.name for p in list_segments(tmp_path)] == [
        f"pdserve-kv-{service.engine_id}-req-2-prefill{VLLM_SUFFIX}"]


async def test_an_abort_whose_final_output_names_no_segment_releases_what_was_staged(
        tmp_path, service, make_segment):
    engine = _Engine(make_segment, service.engine_id)
    worker = _worker(service, engine)
    task = asyncio.create_task(worker.prefill(_req("req-1")))
    await engine.staged.wait()
    await worker.abort("req-1")
    with pytest.raises(PrefillAborted):
        await task
    assert list_segments(tmp_path) == []


async def test_a_router_that_closes_its_channel_leaves_no_staged_kv(tmp_path, service,
                                                                    make_segment):
    """The path of the fault: the router closes the channel of a prefill whose KV is saved
    but whose answer has not been sent; the channel server cancels the call at EOF."""
    engine = _Engine(make_segment, service.engine_id)
    worker = _worker(service, engine)
    server = ChannelServer(worker)
    client = WorkerChannelClient(await server.start(), "prefill-0", "prefill")
    try:
        call = asyncio.create_task(client.prefill(_req("req-1")))
        await asyncio.wait_for(engine.staged.wait(), timeout=5)
        await client.close()  # the router gave up on this instance
        with pytest.raises(ChannelError):
            await call
        for _ in range(200):
            if not list_segments(tmp_path) and server.num_active_requests == 0:
                break
            await asyncio.sleep(0.01)
        assert list_segments(tmp_path) == []
        assert server.num_active_requests == 0 and worker._in_flight == set()
    finally:
        await server.close()
