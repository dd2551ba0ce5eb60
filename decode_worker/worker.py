"""A decode instance (or, with no KV handles, an ordinary colocated instance).

Request lifecycle on this worker::

    received ──handle given──▶ FETCHING_KV ──local segment ready──▶ LOADING (inside the engine,
        │                          │                                  before its first step)
        │                          └─fetch failed──▶ policy "fail": FAILED (error delta)
        │                                            policy "recompute": RECOMPUTING
        └─no handle (colocated)──▶ RUNNING
    LOADING / RECOMPUTING ──first step──▶ RUNNING ──EOS / stop id / max_tokens──▶ FINISHED
    any state ──abort (client gone)──▶ ABORTED (engine frees the blocks; this worker
                                        removes a segment the engine did not consume)

This worker owns a request's staged KV from the moment it receives the handle (the router
let go of it): whatever way the request ends, a segment its engine did not consume (the
request ended before the load, the engine chose to recompute, or the request was
cancelled while the fetch ran) is removed here, never left to a lease that does not cover
it (a fetched copy belongs to no producer).

The states and their allowed moves are `kvtransfer.lifecycle.DECODE_KV_TRANSITIONS`;
`generate` moves a checked `Lifecycle` through them, so a wrong move raises.

How the prompt's KV was obtained (`served_by`) and how many prompt tokens the engine
computed itself (1 when the KV moved: prefill's first token; the whole prompt when it was
recomputed): the first delta says what this worker knows then (the KV was delivered to
the engine, or the fetch failed); the final delta carries the consumer connector's own
report (`KVLoadReport`: loaded, or recomputed because the segment was unusable or its load
failed), which the router takes as the last word. A plain class; the launcher wraps it
with ``ray.remote``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any, Literal

from cluster.config import KVTransferSettings
from cluster.engine_host import EngineHost, EngineSpec, to_sampling_params, token_logprobs
from cluster.wire import (
    EngineRequest,
    KVHandle,
    KVTransferError,
    ServedBy,
    TokenDelta,
    TransferStat,
    WorkerStats,
)
from kvtransfer.lifecycle import DECODE_KV_TRANSITIONS, DecodeKVState, Lifecycle
from kvtransfer.service import ConsumerService, MaterializedKV

log = logging.getLogger(__name__)


class DecodeWorker:
    def __init__(self, instance_id: str, spec: EngineSpec, kv: KVTransferSettings,
                 role: Literal["decode", "colocated"] = "decode"):
        self.instance_id = instance_id
        self.role = role
        self._kv = ConsumerService(kv)
        if role == "decode":
            spec = EngineSpec(
                model_path=spec.model_path, model=spec.model, pool=spec.pool,
                instance_index=spec.instance_index,
                kv_transfer_config=self._kv.engine_kv_config(f"{instance_id}-consumer"),
            )
        self._engine = EngineHost(spec)
        self._queued_prompt_tokens = 0
        self._fetch_transfers: list[TransferStat] = []
        self._channel = None  # cluster.channel.ChannelServer once open_channel ran

    async def start(self) -> str:
        await self._engine.start()
        return self.instance_id

    async def generate(self, req: EngineRequest) -> AsyncIterator[TokenDelta]:
        """Stream the request's output tokens. For decode, prompt_token_ids ends with the
        prefill's first token and the handle covers every prompt id before it."""
        materialized: MaterializedKV | None = None
        kv_params = None
        kv_load_s = None
        served_by: ServedBy = "colocated"
        state = Lifecycle(DECODE_KV_TRANSITIONS, DecodeKVState.RECEIVED, req.request_id)
        if req.kv_handle is not None:
            state.move_to(DecodeKVState.FETCHING_KV)
            try:
                materialized = await self._materialize(req.kv_handle, req.request_id)
            except KVTransferError as e:
                self._fetch_transfers.append(self._kv.failed_fetch(req.kv_handle, e, req.request_id))
                if self._kv.settings.on_failure == "fail":
                    state.move_to(DecodeKVState.FAILED)
                    yield TokenDelta(token_ids=(), finish_reason="error",
                                     error=f"KV transfer failed: {e}")
                    return
                log.info("[%s] KV fetch failed; recomputing the prompt: %s", req.request_id, e)
                state.move_to(DecodeKVState.RECOMPUTING)
                served_by = "recomputed"
            except asyncio.CancelledError:
                state.move_to(DecodeKVState.ABORTED)
                raise
            else:
                state.move_to(DecodeKVState.LOADING)
                kv_params = materialized.kv_transfer_params
                kv_load_s = materialized.stat.duration_s
                self._fetch_transfers.append(materialized.stat)
                served_by = "transferred"
        num_prompt = len(req.prompt_token_ids)
        first = True
        self._queued_prompt_tokens += num_prompt
        try:
            sp = to_sampling_params(req.sampling, kv_transfer_params=kv_params)
            async for out in self._engine.stream(req.request_id, list(req.prompt_token_ids), sp):
                completion = out.outputs[0] if out.outputs else None
                token_ids = tuple(completion.token_ids) if completion else ()
                logprobs = (token_logprobs(completion, req.sampling.num_logprobs)
                            if completion is not None and req.sampling.num_logprobs is not None
                            else None)
                finish = _finish_reason(completion.finish_reason if completion else None,
                                        out.finished)
                # The connector's account of the prompt's KV comes with the final output.
                report = (self._kv_report(out, num_prompt, kv_load_s)
                          if materialized is not None else {})
                if first:
                    first = False
                    state.move_to(DecodeKVState.RUNNING)
                    self._queued_prompt_tokens -= num_prompt
                    num_cached = int(out.num_cached_tokens or 0)
                    first_kv = {"served_by": served_by, "kv_load_s": kv_load_s,
                                "num_prompt_tokens_computed": num_prompt - num_cached, **report}
                    yield TokenDelta(token_ids=token_ids, finish_reason=finish,
                                     logprobs=logprobs, **first_kv)
                else:
                    yield TokenDelta(token_ids=token_ids, finish_reason=finish, logprobs=logprobs,
                                     **report)
                if out.finished:
                    state.move_to(DecodeKVState.FINISHED)
        finally:
            if not state.is_final:
                state.move_to(DecodeKVState.ABORTED)
            if first:
                self._queued_prompt_tokens -= num_prompt
            if materialized is not None:
                self._kv.discard(materialized)

    def _kv_report(self, out: Any, num_prompt: int, kv_load_s: float | None) -> dict[str, Any]:
        """served_by and prompt tokens computed, from the consumer connector's report on a
        finished output (empty before the end, or when it reported nothing); kv_load_s
        rides along, since the router reads all three from a delta that has served_by."""
        report = self._kv.load_report(out.kv_transfer_params) if out.finished else None
        if report is None:
            return {}
        computed = num_prompt - report.num_local_tokens - report.num_loaded_tokens
        if report.served_by == "recomputed":
            log.info("[%s] decode recomputed the prompt: %s", out.request_id, report.reason)
        return {"served_by": report.served_by, "num_prompt_tokens_computed": computed,
                "kv_load_s": kv_load_s}

    async def _materialize(self, handle: KVHandle, request_id: str) -> MaterializedKV:
        """Make the handle's KV local (a fetch runs in a thread). A fetch cannot be
        interrupted, so when the request is cancelled meanwhile, the fetch runs on and
        what it brings is discarded as it lands."""
        fetch = asyncio.ensure_future(asyncio.to_thread(self._kv.materialize, handle, request_id))
        try:
            return await asyncio.shield(fetch)
        except asyncio.CancelledError:
            fetch.add_done_callback(self._discard_when_fetched)
            raise

    def _discard_when_fetched(self, fetch: asyncio.Future) -> None:
        if not fetch.cancelled() and fetch.exception() is None:
            self._kv.discard(fetch.result())

    async def abort(self, request_id: str) -> None:
        await self._engine.abort(request_id)

    async def stats(self) -> WorkerStats:
        load = self._engine.load
        fetches, self._fetch_transfers = tuple(self._fetch_transfers), []
        return WorkerStats(
            instance_id=self.instance_id, role=self.role, is_ready=self._engine.is_ready,
            num_running_reqs=load.num_running_reqs, num_waiting_reqs=load.num_waiting_reqs,
            kv_cache_usage=load.kv_cache_usage, num_kv_blocks=self._engine.num_kv_blocks,
            block_size=self._engine.block_size,
            queued_prompt_tokens=self._queued_prompt_tokens,
            transfers=fetches + load.take_transfers(),
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
        self._engine.shutdown()
        self._kv.close()  # transports' connections (dist pair groups)


def _finish_reason(reason: str | None, finished: bool):
    if not finished:
        return None
    if reason in ("stop", "length", "abort"):
        return reason
    return "error" if reason == "error" else "stop"
