"""One request's journey through the pools, as the router drives it.

(Over ~350 lines on purpose: one state machine. Its states, its transition table and every
move of a request (prefill, retry, handoff, decode, migration, n > 1 claims, clean-up) are
read together; the policies it consults live elsewhere: `router/recovery.py`,
`router/pool.py`, `router/fanout.py`.)

Disaggregated (sequential dispatch: decode is chosen once prefill has finished)::

    QUEUED ──pick prefill──▶ PREFILLING ──first token──▶ HANDOFF ──pick decode──▶ DECODING
      │                       │     ▲                       │                    │      ▲
      │      instance fault,  │     │ pick another          ├─first token ends it┤      │
      │      attempts left    ▼     │ (after backoff)       │ (EOS, stop id,     │      │ continue on
      │                      RETRYING                       │  max=1): release   │      │ another decode
      │                                                     │  staged KV         │      │
      │                          error / attempts spent ────┴────────▶ FINISHED  ▼      │
      │                                            instance fault, migration allowed: MIGRATING
      └──conditional disaggregation: prefill on the decode instance──▶ DECODING (local_prefill)
    any non-final state ──client gone / stop string──▶ ABORTED (abort the active worker;
                                                       release KV not yet claimed)
    any non-final state ──worker error──▶ FAILED (same clean-up)

Colocated::

    QUEUED ──pick instance──▶ GENERATING ──▶ FINISHED | ABORTED | FAILED
                                │    ▲
           instance fault,      ▼    │ continue on another colocated instance
           migration allowed:  MIGRATING

Recovery (router/recovery.py). An *instance fault* (connection lost, instance unreachable,
stalled past `router.stream_stall_timeout_s`) before the first token retries the prefill
on another prefill instance (PREFILLING ─▶ RETRYING ─▶ PREFILLING, at most
`router.prefill_max_attempts` attempts, backoff between them); after it, the stream
migrates (DECODING|GENERATING ─▶ MIGRATING ─▶ the same state on another instance) with
`continuation(req, emitted)`: prompt + every token the client already has, so the client
sees neither a repeat nor a gap, at most `router.migration_limit` times. In RETRYING and
MIGRATING no instance holds the request. Anything the worker reports about the request
itself fails it as before. Each retry and migration is recorded on the trace
(`num_prefill_retries`, `migrations`) and counted by reason (router/metrics.py).

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
    WorkerUnavailable,
)
from router.pool import InstanceView, PathChoice, RouteRequest, WorkerPool
from router.recovery import (
    StreamStalled,
    continuation,
    fault_reason,
    is_instance_fault,
    prefill_with_retries,
    stalled_instead_of_cancelled,
)


class RequestState(enum.Enum):
    QUEUED = "queued"
    PREFILLING = "prefilling"
    RETRYING = "retrying"  # a prefill instance failed; waiting to try another
    HANDOFF = "handoff"
    DECODING = "decoding"
    GENERATING = "generating"
    MIGRATING = "migrating"  # the stream's instance failed; moving to another
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
    RequestState.PREFILLING: frozenset({RequestState.HANDOFF, RequestState.RETRYING}) | _ENDS,
    RequestState.RETRYING: frozenset({RequestState.PREFILLING}) | _ENDS,
    RequestState.HANDOFF: frozenset({RequestState.DECODING}) | _ENDS,
    RequestState.DECODING: frozenset({RequestState.MIGRATING}) | _ENDS,
    RequestState.GENERATING: frozenset({RequestState.MIGRATING}) | _ENDS,
    RequestState.MIGRATING: frozenset({RequestState.DECODING, RequestState.GENERATING}) | _ENDS,
    RequestState.FINISHED: frozenset(),
    RequestState.ABORTED: frozenset(),
    RequestState.FAILED: frozenset(),
}


class Migration(msgspec.Struct, frozen=True):
    """One move of a stream to another instance, as the trace keeps it."""

    reason: str  # recovery.fault_reason: instance_lost, stalled, timeout, unavailable
    from_instance: str
    to_instance: str
    num_tokens_emitted: int  # tokens the client had; the continuation's prompt grew by them
    at_s: float  # wall clock


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
    max_tokens: int | None = None  # the request's output limit (the re-planner's estimate in flight)
    finish_reason: FinishReason | None = None
    error: str | None = None
    prefill_retry_reasons: tuple[str, ...] = ()  # one reason per retry (recovery.fault_reason)
    migrations: tuple[Migration, ...] = ()

    @property
    def num_prefill_retries(self) -> int:
        return len(self.prefill_retry_reasons)

    @property
    def num_migrations(self) -> int:
        return len(self.migrations)

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
            "num_prefill_retries": self.num_prefill_retries,
            "prefill_retry_reasons": list(self.prefill_retry_reasons),
            "num_migrations": self.num_migrations,
            "migrations": [msgspec.structs.asdict(m) for m in self.migrations],
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
        # Staged KV handed to a decode: released to its producer if that decode fails as an
        # instance before its first delta (it may never have claimed it).
        self._handed_kv: tuple[InstanceView, KVHandle] | None = None
        self._is_worker_done = False  # the active worker reported the request finished

    @property
    def state(self) -> RequestState:
        return self.trace.state

    def stop_early(self) -> None:
        """The front end matched a stop string: a normal finish, but the worker still runs."""
        self.trace.finish_reason = "stop"
        self.trace.move_to(RequestState.FINISHED)

    def tokens(self) -> AsyncIterator[TokenDelta]:
        """Output tokens as deltas, in groups as the workers produce them. Closing the
        iterator early (client gone, stop string) aborts the request on the worker
        computing it."""
        return self._ended(self._disaggregated() if self.pool.is_disaggregated
                           else self._colocated())

    async def _ended(self, deltas: AsyncIterator[TokenDelta]) -> AsyncIterator[TokenDelta]:
        """`deltas`, then the request's end: FINISHED, FAILED (a worker's error) or ABORTED
        (closed early), and the clean-up every way of ending needs."""
        try:
            async for delta in deltas:
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

    def _let_go(self, view: InstanceView) -> None:
        """`view` failed as an instance: stop it computing this request (it may be frozen,
        not dead) and forget it; the request itself goes on elsewhere or fails."""
        self.pool.in_background(view.client.abort(self.request_id))
        self.pool.end(view)
        self._active = None

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
        recovery = self.pool.recovery
        try:
            view, result = await prefill_with_retries(
                lambda tried: self.pool.pick_prefill(self.route, tried), self._prefill_on,
                recovery.retry, recovery.breakers, on_retry=self._on_prefill_retry)
        except (asyncio.CancelledError, WorkerUnavailable):
            raise
        except Exception as e:
            raise RequestFailed(f"prefill failed on {self.trace.prefill_instance}: {e}") from e
        self.trace.mark(LifecycleEvent.PREFILL_START, result.prefill_start_s)
        self.trace.mark(LifecycleEvent.PREFILL_END, result.prefill_end_s)
        if result.kv_handle is not None:
            self._held_kv = (view, result.kv_handle)
        self.trace.move_to(RequestState.HANDOFF)
        first = result.first_token_id
        finish = self._ends_at_first_token(first)
        # The decode is chosen before the first token goes out: with none available the
        # client gets a clean 503 (WorkerUnavailable), not a token and then a dropped
        # stream; the clean-up releases the staged KV.
        decode = None if finish is not None or self._held_kv is None else \
            self.pool.pick_decode(self.route, near=view)
        self.trace.mark(LifecycleEvent.FIRST_TOKEN)
        self.trace.num_output_tokens = 1
        first_logprobs = (result.first_token_logprob,) if result.first_token_logprob else None
        yield TokenDelta(token_ids=(first,), logprobs=first_logprobs)

        if finish is not None:
            self.trace.finish_reason = finish
            self.trace.served_by = "prefill_only"
            return  # tokens()'s clean-up releases the staged KV
        if decode is None:
            raise RequestFailed(f"prefill on {view.instance_id} staged no KV")
        async for delta in self._decode(first, decode):
            yield delta

    async def _prefill_on(self, view: InstanceView):
        """One prefill attempt on `view`. On any failure the attempt lets go of `view`
        (the retry loop decides what follows); on cancellation (client gone) the request's
        clean-up does."""
        num_prompt = len(self.prompt_token_ids)
        self.trace.prefill_instance = view.instance_id
        self._note_prefix(view)
        self.pool.begin(view, num_prompt)
        self._active = view
        self.trace.move_to(RequestState.PREFILLING)
        watch = self.pool.recovery.stall_watch
        w = watch.watch(view, self.trace, is_prompt_phase=True)
        try:
            try:
                result = await view.client.prefill(EngineRequest(  # type: ignore[attr-defined]
                    request_id=self.request_id, prompt_token_ids=self.prompt_token_ids,
                    sampling=self.sampling))
            except asyncio.CancelledError:
                if not stalled_instead_of_cancelled(w):
                    raise
                raise StreamStalled(f"prefill instance {view.instance_id} gave no answer for "
                                    f"{watch.timeout_s} s and fails its stats poll") from None
            finally:
                watch.unwatch(w)
                self.pool.prompt_done(view, num_prompt)
        except Exception:
            self._let_go(view)
            raise
        self.pool.end(view)
        self._active = None
        return result

    def _on_prefill_retry(self, view: InstanceView, fault: BaseException) -> None:
        self.trace.prefill_retry_reasons += (fault_reason(fault),)
        self.trace.move_to(RequestState.RETRYING)

    async def _decode(self, first_token: int, view: InstanceView) -> AsyncIterator[TokenDelta]:
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
        self.trace.decode_instance = view.instance_id
        self.pool.begin(view, len(prompt))  # what _stream will count done: this request's prompt
        self._active = view
        # From here the decode worker owns the staged KV (it consumes or frees it).
        self._handed_kv, self._held_kv = self._held_kv, None
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
        """`req`'s deltas from `view`; on an instance fault, migrated to another instance
        of the same role while the budget allows (module docstring, "Recovery")."""
        recovery = self.pool.recovery
        watch = recovery.stall_watch
        resume_state = self.state  # DECODING or GENERATING: where a migration returns to
        # Replayed-first requests depend on earlier output: never migrated (recovery.py).
        may_migrate = (recovery.migration_limit > 0 and replayed_first is None
                       and not self.sampling.depends_on_output)
        while True:
            num_prompt = len(req.prompt_token_ids)
            prompt_pending = True
            is_first_yield = True
            emitted: list[int] | None = [] if may_migrate else None  # what the client got
            fault: Exception | None = None
            w = watch.watch(view, self.trace, is_prompt_phase=True)
            try:
                async with contextlib.aclosing(view.client.generate(req)) as deltas:  # type: ignore[attr-defined]
                    async for delta in deltas:
                        if delta.served_by is not None and not self.trace.migrations:
                            self.trace.served_by = ("local_prefill" if self.trace.path == "local_prefill"
                                                    else delta.served_by)
                            self.trace.num_prompt_tokens_computed_on_decode = delta.num_prompt_tokens_computed
                            self.trace.kv_load_s = delta.kv_load_s
                        if prompt_pending:
                            prompt_pending = False
                            w.is_prompt_phase = False
                            self.pool.prompt_done(view, num_prompt)
                            recovery.breakers.record_success(view.instance_id)
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
                            if emitted is not None:
                                emitted.extend(delta.token_ids)
                            w.is_waiting = False  # handing on, not waiting on the worker
                            yield delta
                            w.is_waiting = True
                            if is_first_yield:
                                # The consumer may change task once: the front end's start()
                                # takes a request's first delta, chunks() the rest. Asking
                                # for the task per delta would cost more than the rest of
                                # this loop.
                                is_first_yield = False
                                w.task = asyncio.current_task()
                        if delta.finish_reason is not None:
                            return
            except asyncio.CancelledError:
                if not stalled_instead_of_cancelled(w):
                    raise
                fault = StreamStalled(f"no output for {watch.timeout_s} s")
            except (GeneratorExit, RequestFailed):
                raise
            except Exception as e:
                if not is_instance_fault(e):
                    raise RequestFailed(f"{view.role} instance {view.instance_id} failed: {e}") from e
                fault = e
            finally:
                watch.unwatch(w)
                if prompt_pending:
                    self.pool.prompt_done(view, num_prompt)
            if fault is None:
                raise RequestFailed(f"{view.role} instance {view.instance_id} ended the stream early")
            view, req = self._migrate(view, req, emitted, fault, resume_state,
                                      had_output=not prompt_pending)

    def _migrate(self, view: InstanceView, req: EngineRequest, emitted: list[int] | None,
                 fault: Exception, resume_state: RequestState,
                 had_output: bool) -> tuple[InstanceView, EngineRequest]:
        """`view` failed as an instance under `req` after the client got `emitted`: the
        instance and request to continue with, or RequestFailed when migration is not
        allowed (then the request's clean-up lets go of `view`)."""
        recovery = self.pool.recovery
        reason = fault_reason(fault)
        recovery.breakers[view.instance_id].record_failure(time.monotonic())
        what = f"{view.role} instance {view.instance_id} failed ({reason}): {fault}"
        if not had_output and self._handed_kv is not None:
            # The failed decode may never have claimed the staged KV: hand it back to its
            # producer (a claimed segment is no longer the producer's: release finds nothing).
            producer, handle = self._handed_kv
            self.pool.in_background(producer.client.release_kv(handle))  # type: ignore[attr-defined]
        self._handed_kv = None
        if emitted is None or self.trace.num_migrations >= recovery.migration_limit:
            raise RequestFailed(what) from fault
        if len(emitted) >= req.sampling.max_tokens:
            raise RequestFailed(f"{what} (after its last token)") from fault
        self.trace.move_to(RequestState.MIGRATING)
        self._let_go(view)
        pick = self.pool.pick_decode if view.role == "decode" else self.pool.pick_prefill
        try:
            new = pick(self.route, (view.instance_id,))
        except WorkerUnavailable as e:
            raise RequestFailed(f"{what}; no other instance to continue on: {e}") from fault
        next_req = continuation(req, emitted)
        self.trace.migrations += (Migration(reason, view.instance_id, new.instance_id,
                                            self.trace.num_output_tokens, time.time()),)
        self.trace.decode_instance = new.instance_id
        self.pool.begin(new, len(next_req.prompt_token_ids))
        self._active = new
        self.trace.move_to(resume_state)
        return new, next_req

    def tokens_from_claim(self, prefill: InstanceView, claim: KVHandle,
                                prefill_span_s: tuple[float, float]) -> AsyncIterator[TokenDelta]:
        """n > 1 (`router/fanout.py`): this request is one choice of several whose prompt
        one prefill (on `prefill`, from `prefill_span_s[0]` to `[1]`, its worker's clock)
        computed once and staged with one claim per choice. Decode gets the prompt alone and this choice's claim: its connector loads
        the KV of every prompt token but the last, and the engine computes that one and
        samples this choice's own first token with this choice's seed (the path of
        `_decode` for output-dependent sampling, with no first token to compare: prefill's
        belongs to no choice). Clean-up as `tokens()`: a claim not yet handed to a decode
        is released, a running decode aborted."""
        return self._ended(self._from_claim(prefill, claim, prefill_span_s))

    async def _from_claim(self, prefill: InstanceView, claim: KVHandle,
                          prefill_span_s: tuple[float, float]) -> AsyncIterator[TokenDelta]:
        self._held_kv = (prefill, claim)
        self.trace.path, self.trace.path_reason = "disaggregated", "n_choices"
        self.trace.prefill_instance = prefill.instance_id
        self.trace.move_to(RequestState.PREFILLING)
        self.trace.mark(LifecycleEvent.PREFILL_START, prefill_span_s[0])
        self.trace.mark(LifecycleEvent.PREFILL_END, prefill_span_s[1])
        self.trace.move_to(RequestState.HANDOFF)
        view = self.pool.pick_decode(self.route, near=prefill)
        self.trace.decode_instance = view.instance_id
        self.pool.begin(view, len(self.prompt_token_ids))
        self._active = view
        # From here the decode worker owns the claim (it consumes or frees it).
        self._handed_kv, self._held_kv = self._held_kv, None
        self.trace.move_to(RequestState.DECODING)
        req = EngineRequest(request_id=self.request_id, prompt_token_ids=self.prompt_token_ids,
                            sampling=self.sampling, kv_handle=claim)
        async for delta in self._stream(view, req):
            if self.trace.num_output_tokens == len(delta.token_ids):
                self.trace.mark(LifecycleEvent.FIRST_TOKEN)
            yield delta


def _without_replayed_first(delta: TokenDelta, first_token: int) -> TokenDelta:
    """Decode's copy of prefill's first token, dropped (the client already has it)."""
    if delta.token_ids[0] != first_token:
        raise RequestFailed(
            f"decode sampled first token {delta.token_ids[0]}, prefill sampled {first_token}: "
            "the engines disagree (non-deterministic sampling)")
    return msgspec.structs.replace(
        delta, token_ids=delta.token_ids[1:],
        logprobs=delta.logprobs[1:] if delta.logprobs is not None else None)
