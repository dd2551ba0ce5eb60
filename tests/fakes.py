"""In-process fake workers with the same protocol as the real ones (no engine, no Ray).

Deterministic: the token after a sequence is a hash of it, so the disaggregated path
(prefill's first token, then decode continuing from prompt + first token) and the
colocated path produce the same ids, exactly as real engines must. Each fake tracks the KV
it holds, so tests can check that every path returns to zero.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterator

from cluster.wire import (
    EngineRequest,
    KVHandle,
    PrefillResult,
    TokenDelta,
    TransferStat,
    WorkerStats,
)

VOCAB = 1000


def next_token(ids: tuple[int, ...] | list[int]) -> int:
    h = 1469598103934665603
    for i in ids:
        h = ((h ^ i) * 1099511628211) & 0xFFFFFFFFFFFF
    return 10 + h % (VOCAB - 10)  # never a special id below 10


class FakePrefillWorker:
    def __init__(self, instance_id: str = "prefill-0", delay_s: float = 0.0, fail: bool = False):
        self.instance_id = instance_id
        self.delay_s = delay_s
        self.fail = fail
        self.staged: dict[bytes, tuple[int, ...]] = {}  # handle data -> prompt
        self.aborted: list[str] = []
        self.running = 0
        self.num_prefills = 0
        # The latest prefills asked of it (bounded: a soak runs these fakes for minutes).
        self.requests: collections.deque[EngineRequest] = collections.deque(maxlen=64)

    async def prefill(self, req: EngineRequest) -> PrefillResult:
        started = time.time()
        self.running += 1
        try:
            await asyncio.sleep(self.delay_s)
            if self.fail:
                raise RuntimeError("injected prefill failure")
        finally:
            self.running -= 1
        self.num_prefills += 1
        self.requests.append(req)
        key = f"{self.instance_id}/{req.request_id}".encode()
        claims: tuple[KVHandle, ...] = ()
        if req.num_kv_claims > 1:  # one staged prompt, one claim per decode (n > 1)
            claims = tuple(KVHandle(producer_id=self.instance_id, data=key + b"#%d" % i)
                           for i in range(req.num_kv_claims))
            for claim in claims:
                self.staged[claim.data] = req.prompt_token_ids
        else:
            self.staged[key] = req.prompt_token_ids
        return PrefillResult(
            request_id=req.request_id, first_token_id=next_token(req.prompt_token_ids),
            finish_reason=None,
            kv_handle=None if claims else KVHandle(producer_id=self.instance_id, data=key),
            num_prompt_tokens=len(req.prompt_token_ids), num_cached_tokens=0,
            prefill_start_s=started, prefill_end_s=time.time(), kv_claims=claims)

    def claim(self, handle: KVHandle) -> tuple[int, ...] | None:
        return self.staged.pop(handle.data, None)

    async def release_kv(self, handle: KVHandle) -> bool:
        return self.staged.pop(handle.data, None) is not None

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def stats(self) -> WorkerStats:
        return WorkerStats(instance_id=self.instance_id, role="prefill", is_ready=True,
                           num_running_reqs=self.running, num_waiting_reqs=0,
                           kv_cache_usage=0.0, num_kv_blocks=1000,
                           num_staged_segments=len(self.staged), block_size=16)


class FakeDecodeWorker:
    """Decode (claims KV from its prefill peers) or colocated (computes everything)."""

    def __init__(self, instance_id: str = "decode-0", role: str = "decode",
                 prefills: list[FakePrefillWorker] | None = None, token_delay_s: float = 0.0,
                 eos_after: int | None = None, eos_token_id: int = 1):
        self.instance_id = instance_id
        self.role = role
        self.prefills = prefills or []
        self.token_delay_s = token_delay_s
        self.eos_after = eos_after  # emit EOS as the n-th generated token
        self.eos_token_id = eos_token_id
        self.active: set[str] = set()
        self.aborted: list[str] = []
        self.lose_kv = False  # simulate a handle whose KV is gone: recompute
        # The latest requests asked of it (bounded, as above).
        self.requests: collections.deque[EngineRequest] = collections.deque(maxlen=64)
        self.pending_transfers: list[TransferStat] = []

    async def generate(self, req: EngineRequest) -> AsyncIterator[TokenDelta]:
        served_by = "colocated"
        computed = len(req.prompt_token_ids)
        self.requests.append(req)
        if req.kv_handle is not None:
            owner = next((p for p in self.prefills if p.instance_id == req.kv_handle.producer_id), None)
            prompt = owner.claim(req.kv_handle) if owner is not None else None
            if prompt is None or self.lose_kv:
                served_by = "recomputed"
                self.pending_transfers.append(TransferStat("shm", "fetch", 0, 0.0, "failed"))
            else:
                served_by = "transferred"
                computed = 1
                self.pending_transfers.append(TransferStat("shm", "fetch", 4096, 0.001, "ok"))
        self.active.add(req.request_id)
        ids = list(req.prompt_token_ids)
        try:
            for n in range(req.sampling.max_tokens):
                await asyncio.sleep(self.token_delay_s)
                if self.eos_after is not None and n + 1 == self.eos_after and not req.sampling.ignore_eos:
                    tok = self.eos_token_id
                else:
                    tok = next_token(ids)
                ids.append(tok)
                is_last = tok == self.eos_token_id or n + 1 == req.sampling.max_tokens
                finish = None if not is_last else ("stop" if tok == self.eos_token_id else "length")
                yield TokenDelta(token_ids=(tok,), finish_reason=finish,
                                 served_by=served_by if n == 0 else None,
                                 num_prompt_tokens_computed=computed if n == 0 else None,
                                 kv_load_s=0.001 if n == 0 and served_by == "transferred" else None)
                if is_last:
                    return
        finally:
            self.active.discard(req.request_id)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        self.active.discard(request_id)

    async def stats(self) -> WorkerStats:
        transfers, self.pending_transfers = tuple(self.pending_transfers), []
        return WorkerStats(instance_id=self.instance_id, role=self.role, is_ready=True,
                           num_running_reqs=len(self.active), num_waiting_reqs=0,
                           kv_cache_usage=len(self.active) / 100, num_kv_blocks=100,
                           transfers=transfers, block_size=16)


def make_fake_deployment(mode: str = "disaggregated", *, num_prefill: int = 1, num_decode: int = 1,
                         num_colocated: int = 1, slo=None, router_config=None, **decode_kwargs):
    """A router app over fake workers. Returns (app, deps, prefills, decodes)."""
    from cluster.config import RouterConfig, ServeConfig, SLOConfig
    from cluster.tiny_model import ensure_tiny_model
    from router.build import build_router
    from router.tokenizer import ModelTokenizer

    slo = slo or SLOConfig(ttft_s=1.0, tpot_s=0.1)
    router_config = router_config or RouterConfig(stats_interval_s=0.05)
    config = ServeConfig(mode=mode, slo=slo, router=router_config,
                         prefill={"num_instances": num_prefill}, decode={"num_instances": num_decode},
                         colocated={"num_instances": num_colocated})
    tokenizer = ModelTokenizer(ensure_tiny_model("tiny"))
    if mode == "disaggregated":
        prefills = [FakePrefillWorker(f"prefill-{i}") for i in range(num_prefill)]
        decodes = [FakeDecodeWorker(f"decode-{i}", prefills=prefills, **decode_kwargs)
                   for i in range(num_decode)]
        app, deps = build_router(config, tokenizer, "pdserve-tiny", prefill=prefills, decode=decodes)
    else:
        prefills = []
        decodes = [FakeDecodeWorker(f"colocated-{i}", role="colocated", **decode_kwargs)
                   for i in range(num_colocated)]
        app, deps = build_router(config, tokenizer, "pdserve-tiny", colocated=decodes)
    return app, deps, prefills, decodes


@contextlib.asynccontextmanager
async def serving(app):
    """`app` under a real uvicorn on a free loopback port (lifespan on: the pool polls)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            await task
            raise RuntimeError("uvicorn did not start")
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


async def settle_pool(pool) -> None:
    """Let a pool's background clean-up (aborts, KV releases) finish."""
    for _ in range(3):
        await asyncio.sleep(0)
    if pool._background:
        await asyncio.wait(list(pool._background), timeout=5)


def assert_nothing_held(pool, prefills, decodes) -> None:
    """The leak check every abort path ends in: no staged KV, no running decode, no
    in-flight accounting, no background task."""
    assert all(not p.staged for p in prefills), "staged KV leaked"
    assert all(not d.active for d in decodes), "a decode still runs the request"
    for view in pool.all():
        assert view.inflight_requests == 0 and view.inflight_prompt_tokens == 0, view.instance_id
    assert not pool._background
