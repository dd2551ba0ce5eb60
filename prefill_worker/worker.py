"""A prefill instance: computes a prompt's KV and its first token, and stages the KV.

Request lifecycle on this worker::

    received ──engine prefill (max_tokens=1), KV saved layer by layer──▶ STAGED
    STAGED ──decode fetches / loads the segment──▶ (ownership passes to decode)
    STAGED ──release_kv (request ended at its first token, or was cancelled)──▶ freed
    STAGED ──abort (the router gave up before the answer reached it)──▶ freed
    received ──cancelled (the router closed its channel), or aborted and the engine's final
               output names no segment──▶ abandoned: what the engine staged, or stages
               after the abort reached it, is released by request id (no handle exists)
    STAGED ──nobody claims it within the lease──▶ reclaimed by ProducerService's sweeper
                                                   (recorded as an "expired" transfer)
    received ──abort──▶ aborted (partial segment discarded by the connector; the result
                        says finish_reason="abort", or PrefillAborted is raised when no
                        token was produced: there is no first token to report)

A plain class: the launcher wraps it with ``ray.remote``; tests drive it directly.
"""

from __future__ import annotations

import collections
import logging
import time

from cluster.config import KVTransferSettings
from cluster.engine_host import (
    EngineHost,
    EngineSpec,
    is_cuda_available,
    to_sampling_params,
    token_logprobs,
)
from cluster.wire import EngineRequest, KVHandle, PrefillResult, TokenLogprob, WorkerStats
from kvtransfer.params import PARAM_HOST_STAGING
from kvtransfer.service import ProducerService

log = logging.getLogger(__name__)

MAX_ANSWERED_REMEMBERED = 4096  # answered prefills whose staged KV a late abort can release


class PrefillAborted(RuntimeError):
    """The router aborted this prefill before it produced a token: there is no result
    (and nobody waits for one)."""


class PrefillWorker:
    role = "prefill"

    def __init__(self, instance_id: str, spec: EngineSpec, kv: KVTransferSettings,
                 advertise_host: str = "127.0.0.1"):
        self.instance_id = instance_id
        self._kv = ProducerService(instance_id, kv, advertise_host)
        spec = EngineSpec(
            model_path=spec.model_path, model=spec.model, pool=spec.pool,
            instance_index=spec.instance_index,
            kv_transfer_config=self._kv.engine_kv_config(),
            device_arena_bytes=self._kv.engine_arena_bytes(on_gpu=is_cuda_available()),
        )
        self._engine = EngineHost(spec)
        self._queued_prompt_tokens = 0
        self._in_flight: set[str] = set()
        self._aborted: set[str] = set()  # aborted while their prefill was in flight
        # The latest answered prefills' staged KV, by request id: an abort that arrives once
        # the answer was computed (the router gave up on a frozen instance, whose reply was
        # ready or became ready as it thawed) releases it at once instead of leaving it to
        # the lease (kv_transfer.lease_s). The router never aborts a prefill whose answer it
        # received, so no decode holds such a handle. Bounded: most entries are never asked for.
        self._answered: collections.OrderedDict[str, KVHandle] = collections.OrderedDict()
        self._channel = None  # cluster.channel.ChannelServer once open_channel ran

    async def start(self) -> str:
        await self._engine.start()
        return self.instance_id

    async def prefill(self, req: EngineRequest) -> PrefillResult:
        """Compute the prompt; returns the first token and a handle to the staged KV."""
        # n > 1: several decodes claim this KV, which a device slab cannot serve (one claim).
        host = {PARAM_HOST_STAGING: True} if req.num_kv_claims > 1 else None
        sp = to_sampling_params(req.sampling, max_tokens=1, min_tokens=min(req.sampling.min_tokens, 1),
                                kv_transfer_params=host)
        started = time.time()
        first_token: int | None = None
        first_logprob: TokenLogprob | None = None
        final = None
        engine_request_id = f"{req.request_id}-prefill"
        self._queued_prompt_tokens += len(req.prompt_token_ids)
        self._in_flight.add(req.request_id)
        try:
            async for out in self._engine.stream(engine_request_id, list(req.prompt_token_ids), sp):
                if out.outputs and out.outputs[0].token_ids and first_token is None:
                    first_token = out.outputs[0].token_ids[0]
                    if req.sampling.num_logprobs is not None:  # the first token's, from prefill
                        first_logprob = token_logprobs(out.outputs[0], req.sampling.num_logprobs)[0]
                final = out
        except BaseException:
            # Cancelled (the channel server cancels a prefill whose router went away) or
            # failed: no handle will exist, yet the engine may have saved the prompt's KV
            # (the step that completed it ran before the cancellation reached it).
            self._kv.abandon(engine_request_id)
            self._aborted.discard(req.request_id)  # an abort that came first is spent too
            raise
        finally:
            self._queued_prompt_tokens -= len(req.prompt_token_ids)
            self._in_flight.discard(req.request_id)
        handle = (self._kv.handle_for(final.kv_transfer_params, req.request_id)
                  if final is not None else None)
        if req.request_id in self._aborted:
            # The router gave up while the prompt finished: nobody will claim this KV.
            self._aborted.discard(req.request_id)
            if handle is not None:
                self._kv.release(handle)
            else:  # vLLM's abort output names no segment, though the engine may have staged one
                self._kv.abandon(engine_request_id)
            log.info("[%s] prefill aborted; staged KV released", req.request_id)
            if first_token is None:
                raise PrefillAborted(f"prefill of {req.request_id} was aborted before its first token")
            return PrefillResult(
                request_id=req.request_id, first_token_id=first_token, finish_reason="abort",
                kv_handle=None, num_prompt_tokens=len(req.prompt_token_ids), num_cached_tokens=0,
                prefill_start_s=started, prefill_end_s=time.time())
        if final is None or first_token is None:
            raise RuntimeError(f"prefill of {req.request_id} produced no token")
        kv_claims: tuple[KVHandle, ...] = ()
        if handle is not None and req.num_kv_claims > 1:  # n > 1: one claim per decode
            try:
                kv_claims = self._kv.claims_for(handle, req.num_kv_claims, req.request_id)
            except BaseException:
                self._kv.release(handle)
                raise
            handle = None
        if handle is not None:
            self._answered[req.request_id] = handle
            while len(self._answered) > MAX_ANSWERED_REMEMBERED:
                self._answered.popitem(last=False)
        return PrefillResult(
            request_id=req.request_id,
            first_token_id=first_token,
            finish_reason=None,
            kv_handle=handle,
            num_prompt_tokens=len(req.prompt_token_ids),
            num_cached_tokens=int(final.num_cached_tokens or 0),
            prefill_start_s=started,
            prefill_end_s=time.time(),
            first_token_logprob=first_logprob,
            kv_claims=kv_claims,
        )

    async def release_kv(self, handle: KVHandle) -> bool:
        return self._kv.release(handle)

    async def abort(self, request_id: str) -> None:
        if request_id in self._in_flight:
            self._aborted.add(request_id)
        answered = self._answered.pop(request_id, None)
        if answered is not None and self._kv.release(answered):
            log.info("[%s] aborted after its prefill was answered; staged KV released", request_id)
        await self._engine.abort(f"{request_id}-prefill")

    def num_staged_segments(self) -> int:
        """KV segments staged here and not yet claimed. Unlike `stats()` it hands over
        nothing: the transfer records stay for the router's next poll (a draining replica
        reads this while routers still count its transfers)."""
        return self._kv.num_staged()

    async def stats(self) -> WorkerStats:
        load = self._engine.load
        return WorkerStats(
            instance_id=self.instance_id, role="prefill", is_ready=self._engine.is_ready,
            num_running_reqs=load.num_running_reqs, num_waiting_reqs=load.num_waiting_reqs,
            kv_cache_usage=load.kv_cache_usage, num_kv_blocks=self._engine.num_kv_blocks,
            block_size=self._engine.block_size,
            queued_prompt_tokens=self._queued_prompt_tokens,
            num_staged_segments=self._kv.num_staged(),
            transfers=load.take_transfers() + self._kv.take_transfers(),
        )

    async def open_channel(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve this worker to routers over a worker channel (cluster/channel.py) on this
        process's event loop; returns its "host:port". Called once, after `start()`."""
        from cluster.channel import ChannelServer
        from kvtransfer.auth import kv_secret

        # Routers prove the deployment's secret (the one KV transfers use) before any call.
        self._channel = ChannelServer(self, host, port, secret=kv_secret(self._kv.settings))
        return await self._channel.start()

    async def shutdown(self) -> None:
        if self._channel is not None:
            await self._channel.close()
        self._kv.close()  # also stops its lease sweeper
        self._engine.shutdown()
