"""The connector's scheduler half: which prompt blocks to stage (producer) or load (consumer).

Per-request state lives in one object per request, whose `Lifecycle` checks every move
against the tables in `lifecycle.py`::

    producer  SAVING ──request_finished, prompt complete──▶ STAGED   (StagedKV in the output)
              SAVING ──request_finished, early or aborted─▶ DISCARDED (the worker unlinks)

    consumer  MATCHED ──update_state_after_alloc──▶ PLANNED ──step ran──▶ LOADED
              MATCHED ──nothing to load──▶ RECOMPUTE        └─load errors──▶ FAILED
              (no usable segment: no state at all, 0 external tokens, the engine recomputes)

The consumer reports how each request's KV was obtained (`KVLoadReport`) in the
kv_transfer_params of the request's final output (`request_finished`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vllm.v1.request import RequestStatus

from cluster.wire import KVTransferError
from kvtransfer.handle import decode_ticket
from kvtransfer.lifecycle import LOAD_TRANSITIONS, SAVE_TRANSITIONS, Lifecycle, LoadState, SaveState
from kvtransfer.metadata import LoadSpec, PdserveConnectorMetadata, SaveSpec
from kvtransfer.names import segment_path
from kvtransfer.params import KVLoadReport, StagedKV, wants_host_staging
from kvtransfer.segment import segment_is_usable

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger(__name__)


@dataclass
class ProducerRequest:
    request_id: str
    num_prompt_tokens: int
    block_ids: list[int]  # all of the request's blocks so far
    host_only: bool = False  # params.PARAM_HOST_STAGING
    lifecycle: Lifecycle[SaveState] = field(init=False)

    def __post_init__(self) -> None:
        self.lifecycle = Lifecycle(SAVE_TRANSITIONS, SaveState.SAVING, self.request_id)


class ProducerScheduler:
    """Producer (prefill): every step, a save spec per request for the prompt tokens it
    computes; at request_finished, the StagedKV (or a discard)."""

    def __init__(self, staging_dir: Path, engine_id: str, block_size: int):
        self.staging_dir = staging_dir
        self.engine_id = engine_id
        self.block_size = block_size
        self.requests: dict[str, ProducerRequest] = {}
        self._pending_discards: list[str] = []

    def segment_path(self, req_id: str) -> Path:
        return segment_path(self.staging_dir, self.engine_id, req_id)

    def build(self, meta: PdserveConnectorMetadata, out: "SchedulerOutput") -> None:
        meta.discards, self._pending_discards = self._pending_discards, []
        num_scheduled = out.num_scheduled_tokens
        for new_req in out.scheduled_new_reqs:
            prompt_len = len(new_req.prompt_token_ids or ())
            req = self.requests[new_req.req_id] = ProducerRequest(
                new_req.req_id, prompt_len, list(new_req.block_ids[0]),
                host_only=wants_host_staging(new_req.sampling_params))
            end = min(new_req.num_computed_tokens + num_scheduled[new_req.req_id], prompt_len)
            # A new request's locally cached prefix blocks are copied too: the segment
            # must hold the whole prompt.
            self._add_save(meta, req, first_token=0, end_token=end)
        cached = out.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            req = self.requests.get(req_id)
            if req is None:
                continue
            new_blocks = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                req.block_ids = list(new_blocks[0]) if new_blocks else []
                first = 0
            else:
                if new_blocks:
                    req.block_ids.extend(new_blocks[0])
                first = cached.num_computed_tokens[i]
            if first >= req.num_prompt_tokens:
                continue  # prompt already staged; decoding tokens are not transferred
            end = min(cached.num_computed_tokens[i] + num_scheduled[req_id], req.num_prompt_tokens)
            self._add_save(meta, req, first_token=first, end_token=end)

    def _add_save(self, meta: PdserveConnectorMetadata, req: ProducerRequest, first_token: int,
                  end_token: int) -> None:
        num_blocks = -(-end_token // self.block_size)
        meta.saves.append(SaveSpec(
            request_id=req.request_id,
            segment_path=str(self.segment_path(req.request_id)),
            block_ids=tuple(req.block_ids[:num_blocks]),
            first_block=first_token // self.block_size,
            end_token=end_token,
            num_prompt_tokens=req.num_prompt_tokens,
            host_only=req.host_only,
        ))

    def request_finished(self, request: "Request") -> dict[str, Any] | None:
        req = self.requests.pop(request.request_id, None)
        if req is None:
            return None
        path = str(self.segment_path(req.request_id))
        if (request.num_computed_tokens < req.num_prompt_tokens
                or request.status == RequestStatus.FINISHED_ABORTED):
            req.lifecycle.move_to(SaveState.DISCARDED)
            self._pending_discards.append(path)
            log.info("[%s] prefill ended before its prompt was staged; segment discarded",
                     req.request_id)
            return None
        # The worker marked the segment complete in the step that computed the last
        # prompt token, before this call; the engine's own blocks can be freed now.
        req.lifecycle.move_to(SaveState.STAGED)
        return StagedKV(segment_path=path, num_tokens=req.num_prompt_tokens).to_params()


@dataclass
class ConsumerRequest:
    request_id: str
    staged: StagedKV
    num_local_tokens: int  # computed locally (prefix cache) when the match was made
    num_external_tokens: int = 0
    dst_block_ids: tuple[int, ...] = ()
    lifecycle: Lifecycle[LoadState] = field(init=False)

    def __post_init__(self) -> None:
        self.lifecycle = Lifecycle(LOAD_TRANSITIONS, LoadState.MATCHED, self.request_id)


class ConsumerScheduler:
    """Consumer (decode): decides whether a request's staged KV is usable, plans its load
    into the blocks the scheduler allocated, and reports the outcome."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.requests: dict[str, ConsumerRequest] = {}
        self._planned: list[LoadSpec] = []

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> int:
        staged = StagedKV.from_params(request.kv_transfer_params)
        if staged is None:
            return 0
        num_prompt = len(request.prompt_token_ids or ())
        # The consumer's prompt is the producer's prompt plus its first token, or (when the
        # router has decode sample the first token again) the producer's prompt itself: at
        # least the last prompt token is computed here, so it loads at most num_prompt - 1.
        if not 0 < staged.num_tokens <= num_prompt:
            return 0
        if staged.slab is not None:
            # The device path: the slab sits in the prefill's device memory and is checked
            # when loaded (a load error then takes the recompute-or-fail path).
            if not self._slab_is_usable(staged, request.request_id):
                return 0
        elif not segment_is_usable(Path(staged.segment_path), staged.num_tokens, self.block_size):
            log.info("[%s] staged KV unusable (gone, incomplete or another layout); recomputing",
                     request.request_id)
            return 0  # recompute; no state, so the report says recomputed
        self.requests[request.request_id] = ConsumerRequest(
            request.request_id, staged, num_local_tokens=num_computed_tokens)
        return max(0, min(staged.num_tokens, num_prompt - 1) - num_computed_tokens)

    def _slab_is_usable(self, staged: StagedKV, request_id: str) -> bool:
        try:
            ticket = decode_ticket(staged.slab or b"")
        except KVTransferError as e:
            log.info("[%s] %s; recomputing", request_id, e)
            return False
        if ticket.block_size != self.block_size or ticket.num_tokens != staged.num_tokens:
            log.info("[%s] staged slab has another block size or length; recomputing", request_id)
            return False
        return staged.slab_transport is not None

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks",
                                 num_external_tokens: int) -> None:
        req = self.requests.get(request.request_id)
        if req is None:
            return
        if num_external_tokens <= 0:
            req.lifecycle.move_to(LoadState.RECOMPUTE)
            return
        num_local = req.num_local_tokens
        num_tokens = num_local + num_external_tokens
        first_block = num_local // self.block_size
        end_block = -(-num_tokens // self.block_size)
        block_ids = blocks.get_block_ids()[0]
        req.num_external_tokens = num_external_tokens
        req.dst_block_ids = tuple(block_ids[first_block:end_block])
        req.lifecycle.move_to(LoadState.PLANNED)
        self._planned.append(LoadSpec(
            request_id=req.request_id, segment_path=req.staged.segment_path,
            dst_block_ids=req.dst_block_ids, first_block=first_block,
            slab=req.staged.slab, slab_transport=req.staged.slab_transport))

    def build(self, meta: PdserveConnectorMetadata) -> None:
        meta.loads, self._planned = self._planned, []

    def update_connector_output(self, output: "KVConnectorOutput") -> None:
        """The worker half's load errors (block ids): those requests' loads FAILED."""
        failed = set(output.invalid_block_ids or ())
        if not failed:
            return
        for req in self.requests.values():
            if req.lifecycle.state is LoadState.PLANNED and failed.intersection(req.dst_block_ids):
                req.lifecycle.move_to(LoadState.FAILED)
                log.warning("[%s] KV load failed on %d block(s)", req.request_id,
                            len(failed.intersection(req.dst_block_ids)))

    def request_finished(self, request: "Request") -> dict[str, Any] | None:
        req = self.requests.pop(request.request_id, None)
        self._planned = [p for p in self._planned if p.request_id != request.request_id]
        if req is None:
            if StagedKV.from_params(request.kv_transfer_params) is None:
                return None  # not a disaggregated request: nothing to report
            return KVLoadReport(served_by="recomputed", num_local_tokens=0, num_loaded_tokens=0,
                                reason="staged KV unusable").to_params()
        if req.lifecycle.state is LoadState.PLANNED:
            if request.status == RequestStatus.FINISHED_ERROR:
                # Policy "fail": vLLM finishes a request whose load failed in the same update
                # that carries the load errors, before it calls update_connector_output.
                req.lifecycle.move_to(LoadState.FAILED)
            else:
                # Loads are synchronous in start_load_kv of the step they are planned for,
                # which ran before the request could finish; no load error came back.
                req.lifecycle.move_to(LoadState.LOADED)
        state = req.lifecycle.state
        if state is LoadState.LOADED:
            report = KVLoadReport(served_by="transferred", num_local_tokens=req.num_local_tokens,
                                  num_loaded_tokens=req.num_external_tokens)
        elif state is LoadState.RECOMPUTE:
            # The decode's own prefix cache already held every staged token: nothing was
            # loaded, and nothing of the prompt is recomputed either.
            report = KVLoadReport(served_by="transferred", num_local_tokens=req.num_local_tokens,
                                  num_loaded_tokens=0, reason="prefix cached on the decode")
        else:  # FAILED, or MATCHED (finished before its blocks were allocated)
            reason = "load failed" if state is LoadState.FAILED else "finished before the load"
            report = KVLoadReport(served_by="recomputed", num_local_tokens=req.num_local_tokens,
                                  num_loaded_tokens=0, reason=reason)
        return report.to_params()
