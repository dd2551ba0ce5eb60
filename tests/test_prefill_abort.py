"""The prefill worker's abort, over a fake engine and a fake KV service: an abort that
arrives after the prompt was answered (the router gave up on a frozen instance whose reply
was ready) releases the staged KV at once instead of leaving it to the lease."""

from __future__ import annotations

import collections
from types import SimpleNamespace

from cluster.wire import EngineRequest, SamplingSpec
from prefill_worker.worker import MAX_ANSWERED_REMEMBERED, PrefillWorker


class _Engine:
    async def stream(self, request_id, prompt_token_ids, sampling_params):
        yield SimpleNamespace(outputs=[SimpleNamespace(token_ids=[7])], kv_transfer_params={"k": 1},
                              num_cached_tokens=0)

    async def abort(self, request_id):
        pass


class _KV:
    def __init__(self):
        self.staged: set[bytes] = set()

    def handle_for(self, params, request_id):
        handle = f"segment-of-{request_id}".encode()
        self.staged.add(handle)
        return handle

    def release(self, handle) -> bool:
        existed = handle in self.staged
        self.staged.discard(handle)
        return existed


def _worker() -> PrefillWorker:
    worker = PrefillWorker.__new__(PrefillWorker)  # no engine, no KV service: fakes below
    worker.instance_id = "prefill-0"
    worker._kv, worker._engine = _KV(), _Engine()
    worker._queued_prompt_tokens = 0
    worker._in_flight, worker._aborted = set(), set()
    worker._answered = collections.OrderedDict()
    return worker


def _req(rid: str) -> EngineRequest:
    return EngineRequest(request_id=rid, prompt_token_ids=(1, 2, 3),
                         sampling=SamplingSpec(max_tokens=8, temperature=0.0))


async def test_an_abort_after_the_answer_releases_the_staged_kv():
    worker = _worker()
    result = await worker.prefill(_req("req-1"))
    assert result.kv_handle in worker._kv.staged
    await worker.abort("req-1")  # the router never got the answer
    assert not worker._kv.staged
    await worker.abort("req-1")  # a second abort: nothing left, nothing fails


async def test_an_answer_nobody_aborts_stays_for_its_decode_and_memory_is_bounded():
    worker = _worker()
    for i in range(MAX_ANSWERED_REMEMBERED + 5):
        await worker.prefill(_req(f"req-{i}"))
    assert len(worker._kv.staged) == MAX_ANSWERED_REMEMBERED + 5  # nothing released by itself
    assert len(worker._answered) == MAX_ANSWERED_REMEMBERED
    await worker.abort("req-0")  # forgotten: its segment waits for the lease
    assert len(worker._kv.staged) == MAX_ANSWERED_REMEMBERED + 5
    await worker.abort("req-10")
    assert len(worker._kv.staged) == MAX_ANSWERED_REMEMBERED + 4


async def test_an_aborted_prefill_that_then_fails_leaves_no_abort_mark_behind():
    """An abort marks a prefill in flight; if the prefill then ends in an exception (the
    engine's abort raised, or the channel cancelled it), the mark must go with it, or the
    set grows by one id per such request for ever."""
    worker = _worker()
    released = []
    worker._kv.abandon = released.append

    class _FailingEngine(_Engine):
        async def stream(self, request_id, prompt_token_ids, sampling_params):
            await worker.abort("req-1")  # the router gives up while the prompt computes
            raise RuntimeError("engine failed")
            yield  # an async generator

    worker._engine = _FailingEngine()
    try:
        await worker.prefill(_req("req-1"))
    except RuntimeError:
        pass
    else:
        raise AssertionError("the engine's failure must reach the caller")
    assert worker._aborted == set() and worker._in_flight == set()
    assert released == ["req-1-prefill"]  # what it may have staged is released
