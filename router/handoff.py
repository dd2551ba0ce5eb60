"""One request's journey through the pools, as the router drives it.

Disaggregated (sequential dispatch: decode is chosen once prefill has finished)::

    QUEUED ──pick prefill──▶ PREFILLING ──first token──▶ HANDOFF ──pick decode──▶ DECODING
      │                          │                          │                        │
      │                          │                          ├─first token ends it────┤
      │                          │                          │ (EOS, stop id, max=1): │
      │                          │                          │ release staged KV      ▼
      │                          └─────────── error ────────┴──────────────────▶ FINISHED
      └──conditional disaggregation: prefill on the decode instance──▶ DECODING (local_prefill)
    any non-final state ──client gone / stop string──▶ ABORTED (abort the active worker;
                                                       release KV not yet claimed)
    any non-final state ──worker error──▶ FAILED (same clean-up)

Colocated::

    QUEUED ──pick instance──▶ GENERATING ──▶ FINISHED | ABORTED | FAILED

`TRANSITIONS` is that picture as data; `RequestTrace.move_to` refuses any other move. The
router never reads the KV handle; it only carries it from prefill to decode and hands it
back to its producer if nobody will claim it. Clean-up runs in tasks the request's own
cancellation cannot interrupt (`WorkerPool.in_background`).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import msgspec

from cluster.wire import (
    EngineRequest,
    FinishReason,
    KVHandle,
    LifecycleEvent,
    SamplingSpec,
    ServedBy,
    TokenDelta,
)
from router.pool import InstanceView, PathChoice, RouteRequest, WorkerPool


class RequestState(enum.Enum):
    QUEUED = "queued"
    PREFILLING = "prefilling"
    HANDOFF = "handoff"
    DECODING = "decoding"
    GENERATING = "generating"
    FINISHED = "finished"
    ABORTED = "aborted"
    FAILED = "failed"

    @property
    def is_final(self) -> bool:
        return self in (RequestState.FINISHED, RequestState.ABORTED, RequestState.FAILED)


_ENDS = frozenset({RequestState.FINISHED, RequestState.ABORTED, RequestState.FAILED})
TRANSITIONS: dict[RequestState, frozenset[RequestState]] = {
    RequestState.QUEUED: frozenset({RequestState.PREFILLING, RequestState.DECODING,
                                    RequestState.GENERATING}) | _ENDS,
    RequestState.PREFILLING: frozenset({RequestState.HANDOFF}) | _ENDS,
    RequestState.HANDOFF: frozenset({RequestState.DECODING}) | _ENDS,
    RequestState.DECODING: _ENDS,
    RequestState.GENERATING: _ENDS,
    RequestState.FINISHED: frozenset(),
    RequestState.ABORTED: frozenset(),
    RequestState.FAILED: frozenset(),
}


class InvalidTransition(RuntimeError):
    """A request was moved along an edge the lifecycle does not have (a router bug)."""


class RequestFailed(RuntimeError):
    """A worker failed the request; the message is safe to show the client."""


@dataclass
class RequestTrace:
    """Lifecycle events of one request (wall-clock seconds), for metrics and debugging."""

    request_id: str
    num_prompt_tokens: int
    arrival_s: float = field(default_factory=time.time)
    events: dict[str, float] = field(default_factory=dict)
    state: RequestState = RequestState.QUEUED
    path: str | None = None  # "disaggregated", "local_prefill" or "colocated"
    path_reason: str | None = None
    num_prefix_matched_tokens: int = 0  # believed cached on the instance that computed the prompt
    prefill_instance: str | None = None
    decode_instance: str | None = None
    served_by: ServedBy | None = None
    num_prompt_tokens_computed_on_decode: int | None = None
    kv_load_s: float | None = None
    num_output_tokens: int = 0
    finish_reason: FinishReason | None = None
    error: str | None = None

    def mark(self, event: LifecycleEvent, at: float | None = None) -> None:
        self.events.setdefault(event.value, time.time() if at is None else at)

    def move_to(self, state: RequestState) -> None:
        if state not in TRANSITIONS[self.state]:
            raise InvalidTransition(f"request {self.request_id}: {self.state.value} -> {state.value}")
        self.state = state
        self.mark(LifecycleEvent(state.value))

    def to_dict(self) -> dict:
        return {
            "request_id": self.request_id, "state": self.state.value,
            "arrival_s": self.arrival_s, "events": dict(self.events),
            "num_prompt_tokens": self.num_prompt_tokens, "num_output_tokens": self.num_output_tokens,
            "path": self.path, "path_reason": self.path_reason,
            "num_prefix_matched_tokens": self.num_prefix_matched_tokens,
            "prefill_instance": self.prefill_instance, "decode_instance": self.decode_instance,
            "served_by": self.served_by,
            "num_prompt_tokens_computed_on_decode": self.num_prompt_tokens_computed_on_decode,
            "kv_load_s": self.kv_load_s, "finish_reason": self.finish_reason, "error": self.error,
        }


class Handoff:
    def __init__(self, pool: WorkerPool, eos_token_ids: frozenset[int], request_id: str,
                 prompt_token_ids: list[int], sampling: SamplingSpec, trace: RequestTrace):
        self.pool = pool
        self.eos_token_ids = eos_token_ids
        self.request_id = request_id
        self.prompt_token_ids = tuple(prompt_token_ids)
        self.sampling = sampling
        self.trace = trace
        self.route = RouteRequest(self.prompt_token_ids)
        self._active: InstanceView | None = None  # the instance computing right now
        self._held_kv: tuple[InstanceView, KVHandle] | None = None
        self._is_worker_done = False  # the active worker reported the request finished

    @property
    def state(self) -> RequestState:
        return self.trace.state

    def stop_early(self) -> None:
        """The front end matched a stop string: a normal finish, but the worker still runs."""
        self.trace.finish_reason = "stop"
        self.trace.move_to(RequestState.FINISHED)

    async def tokens(self) -> AsyncIterator[TokenDelta]:
        """Output tokens as deltas, in groups as the workers produce them. Closing the
        iterator early (client gone, stop string) aborts the request on the worker
        computing it."""
        try:
            if self.pool.is_disaggregated:
                async for delta in self._disaggregated():
                    yield delta
            else:
                async for delta in self._colocated():
                    yield delta
            if not self.state.is_final:
                self.trace.move_to(RequestState.FINISHED)
        except RequestFailed as e:
            self.trace.error = str(e)
            self.trace.finish_reason = "error"
            if not self.state.is_final:
                self.trace.move_to(RequestState.FAILED)
            raise
        finally:
            if not self.state.is_final:
                self.trace.move_to(RequestState.ABORTED)
                self.trace.finish_reason = self.trace.finish_reason or "abort"
            self._clean_up()

    def _clean_up(self) -> None:
        if self._active is not None and not self._is_worker_done:
            self.pool.in_background(self._active.client.abort(self.request_id))
        if self._held_kv is not None:
            view, handle = self._held_kv
            self._held_kv = None
            self.pool.in_background(view.client.release_kv(handle))  # type: ignore[attr-defined]
        if self._active is not None:
            self.pool.end(self._active)
            self._active = None

    def _note_prefix(self, view: InstanceView) -> None:
        """`view` computes this prompt: record what it was believed to hold, then that it
        holds this prompt's blocks from now on."""
        self.trace.num_prefix_matched_tokens = view.num_cached_tokens(self.route)
        view.remember_prefix(self.route)

    def _ends_at_first_token(self, token_id: int) -> FinishReason | None:
        s = self.sampling
        if token_id in s.stop_token_ids:
            return "stop"
        if token_id in self.eos_token_ids and not s.ignore_eos and s.min_tokens <= 1:
            return "stop"
        if s.max_tokens <= 1:
            return "length"
        return None

    async def _disaggregated(self) -> AsyncIterator[TokenDelta]:
        choice = self.pool.choose_path(self.route)
        self.trace.path, self.trace.path_reason = choice.kind, choice.reason
        if choice.kind == "local_prefill":
            async for delta in self._local_prefill(choice):
                yield delta
            return
        num_prompt = len(self.prompt_token_ids)
        view = self.pool.pick_prefill(self.route)
        self.trace.prefill_instance = view.instance_id
        self._note_prefix(view)
        self.pool.begin(view, num_prompt)
        self._active = view
        self.trace.move_to(RequestState.PREFILLING)
        try:
            result = await view.client.prefill(EngineRequest(  # type: ignore[attr-defined]
                request_id=self.request_id, prompt_token_ids=self.prompt_token_ids,
                sampling=self.sampling))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            raise RequestFailed(f"prefill failed on {view.instance_id}: {e}") from e
        finally:
            self.pool.prompt_done(view, num_prompt)
        self.pool.end(view)
        self._active = None
        self.trace.mark(LifecycleEvent.PREFILL_START, result.prefill_start_s)
        self.trace.mark(LifecycleEvent.PREFILL_END, result.prefill_end_s)
        if result.kv_handle is not None:
            self._held_kv = (view, result.kv_handle)
        self.trace.move_to(RequestState.HANDOFF)
        first = result.first_token_id
        self.trace.mark(LifecycleEvent.FIRST_TOKEN)
        self.trace.num_output_tokens = 1
        first_logprobs = (result.first_token_logprob,) if result.first_token_logprob else None
        yield TokenDelta(token_ids=(first,), logprobs=first_logprobs)

        finish = self._ends_at_first_token(first)
        if finish is not None:
            self.trace.finish_reason = finish
            self.trace.served_by = "prefill_only"
            return  # tokens()'s clean-up releases the staged KV
        if self._held_kv is None:
            raise RequestFailed(f"prefill on {view.instance_id} staged no KV")
        async for delta in self._decode(first):
            yield delta

    async def _decode(self, first_token: int) -> AsyncIterator[TokenDelta]:
        assert self._held_kv is not None
        _, handle = self._held_kv
        s = self.sampling
        # Every sampling field carries over; only the budget shrinks by the first token.
        decode_sampling = msgspec.structs.replace(
            s, max_tokens=s.max_tokens - 1, min_tokens=max(0, s.min_tokens - 1))
        prompt = self.prompt_token_ids + (first_token,)
        replayed_first: int | None = None
        if s.depends_on_output:
            # Penalties, bad words and grammars must see prefill's token as *output*: decode
            # gets the prompt alone (KV for all but its last token), samples the first token
            # again under the same seed and constraint, and the router drops that copy.
            decode_sampling, prompt, replayed_first = s, self.prompt_token_ids, first_token
        view = self.pool.pick_decode(self.route)
        self.trace.decode_instance = view.instance_id
        self.pool.begin(view, len(self.prompt_token_ids) + 1)
        self._active = view
        # From here the decode worker owns the staged KV (it consumes or frees it).
        self._held_kv = None
        self.trace.move_to(RequestState.DECODING)
        req = EngineRequest(request_id=self.request_id, prompt_token_ids=prompt,
                            sampling=decode_sampling, kv_handle=handle)
        async for delta in self._stream(view, req, replayed_first):
            yield delta

    async def _local_prefill(self, choice: PathChoice) -> AsyncIterator[TokenDelta]:
        """Conditional disaggregation: the decode instance computes the prompt itself."""
        assert choice.decode is not None
        async for delta in self._whole_request(choice.decode, RequestState.DECODING):
            yield delta

    async def _colocated(self) -> AsyncIterator[TokenDelta]:
        self.trace.path, self.trace.path_reason = "colocated", "default"
        async for delta in self._whole_request(self.pool.pick_prefill(self.route),
                                               RequestState.GENERATING):
            yield delta

    async def _whole_request(self, view: InstanceView, state: RequestState) -> AsyncIterator[TokenDelta]:
        """Prompt and every output token on one instance (colocated, or local prefill)."""
        self._note_prefix(view)
        self.trace.decode_instance = view.instance_id
        self.pool.begin(view, len(self.prompt_token_ids))
        self._active = view
        self.trace.move_to(state)
        req = EngineRequest(request_id=self.request_id, prompt_token_ids=self.prompt_token_ids,
                            sampling=self.sampling)
        async for delta in self._stream(view, req):
            if self.trace.num_output_tokens == len(delta.token_ids):
                self.trace.mark(LifecycleEvent.FIRST_TOKEN)
            yield delta

    async def _stream(self, view: InstanceView, req: EngineRequest,
                      replayed_first: int | None = None) -> AsyncIterator[TokenDelta]:
        num_prompt = len(req.prompt_token_ids)
        prompt_pending = True
        try:
            async with contextlib.aclosing(view.client.generate(req)) as deltas:  # type: ignore[attr-defined]
                async for delta in deltas:
                    if delta.served_by is not None:
                        self.trace.served_by = ("local_prefill" if self.trace.path == "local_prefill"
                                                else delta.served_by)
                        self.trace.num_prompt_tokens_computed_on_decode = delta.num_prompt_tokens_computed
                        self.trace.kv_load_s = delta.kv_load_s
                    if prompt_pending:
                        prompt_pending = False
                        self.pool.prompt_done(view, num_prompt)
                        if self.state == RequestState.DECODING:
                            self.trace.mark(LifecycleEvent.DECODE_FIRST_TOKEN)
                    if delta.error is not None:
                        raise RequestFailed(delta.error)
                    if replayed_first is not None and delta.token_ids:
                        delta = _without_replayed_first(delta, replayed_first)
                        replayed_first = None
                    if delta.finish_reason is not None:
                        self._is_worker_done = True
                        self.trace.finish_reason = delta.finish_reason
                    if delta.token_ids:
                        self.trace.num_output_tokens += len(delta.token_ids)
                        yield delta
                    if delta.finish_reason is not None:
                        return
        except (asyncio.CancelledError, GeneratorExit, RequestFailed):
            raise
        except Exception as e:
            raise RequestFailed(f"{view.role} instance {view.instance_id} failed: {e}") from e
        finally:
            if prompt_pending:
                self.pool.prompt_done(view, num_prompt)
        raise RequestFailed(f"{view.role} instance {view.instance_id} ended the stream early")


def _without_replayed_first(delta: TokenDelta, first_token: int) -> TokenDelta:
    """Decode's copy of prefill's first token, dropped (the client already has it)."""
    if delta.token_ids[0] != first_token:
        raise RequestFailed(
            f"decode sampled first token {delta.token_ids[0]}, prefill sampled {first_token}: "
            "the engines disagree (non-deterministic sampling)")
    return msgspec.structs.replace(
        delta, token_ids=delta.token_ids[1:],
        logprobs=delta.logprobs[1:] if delta.logprobs is not None else None)
