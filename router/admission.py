"""Admission control: under overload, turn a request away at once (HTTP 429 with
Retry-After) instead of queueing it for minutes.

Per request, after tokenization and before any worker sees it::

    queued requests >= max_queued_requests ────────────────────────▶ reject "queue_full"
    predicted TTFT > ttft_reject_factor x SLO TTFT ────────────────▶ reject "ttft_slo"
    otherwise ─────────────────────────────────────────────────────▶ admit (a Ticket)

Queue. A request is *queued* from admission until its first token exists (or it ends
without one): that is the wait a client feels as TTFT. `Ticket.release()` ends it.

Prediction. Routing sends a prompt to the prefill-stage instance with the fewest queued
prompt tokens (router-side accounting in `WorkerPool` views, exact, no stats lag), so the
predicted TTFT is, minimized over available instances v::

    (v.inflight_prompt_tokens + this prompt's tokens) / throughput(v)

`throughput(v)` is measured, not configured: prompt tokens the instance computed in the
last `WINDOW_S` divided by the time it spent computing them, the union of those requests'
prefill intervals (batched prefills overlap; the union does not count them twice). Until an
instance has been measured nothing is predicted for it, and only the queue bound applies.

Retry-After: the seconds until the queue would be back within the bound at the measured
rate (whole seconds, 1 to `MAX_RETRY_AFTER_S`); 1 s when nothing is measured.

Pure: no I/O, no clock of its own (callers pass `now`), so every rule is unit-tested.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterable
from dataclasses import dataclass

from cluster.config import RouterConfig, SLOConfig
from cluster.wire import LifecycleEvent
from router.handoff import RequestTrace
from router.pool import InstanceView

WINDOW_S = 60.0
MAX_INTERVALS = 512  # per instance
MIN_BUSY_S = 1e-3  # below this an interval says nothing about throughput
MAX_RETRY_AFTER_S = 60
REASONS = ("queue_full", "ttft_slo")


@dataclass(frozen=True)
class Rejection:
    reason: str  # one of REASONS
    message: str
    retry_after_s: int


class ThroughputMeter:
    """Prompt tokens per busy second, per instance, over a sliding window."""

    def __init__(self, window_s: float = WINDOW_S):
        self.window_s = window_s
        self._intervals: dict[str, collections.deque[tuple[float, float, int]]] = {}

    def observe(self, instance_id: str, num_tokens: int, start_s: float, end_s: float) -> None:
        if num_tokens <= 0 or end_s < start_s:
            return
        intervals = self._intervals.setdefault(instance_id, collections.deque(maxlen=MAX_INTERVALS))
        intervals.append((start_s, end_s, num_tokens))

    def tokens_per_s(self, instance_id: str, now: float) -> float | None:
        intervals = self._intervals.get(instance_id)
        if not intervals:
            return None
        while intervals and intervals[0][1] < now - self.window_s:
            intervals.popleft()
        if not intervals:
            return None
        busy = _union_length((s, e) for s, e, _ in intervals)
        if busy < MIN_BUSY_S:
            return None
        return sum(n for _, _, n in intervals) / busy


def _union_length(spans: Iterable[tuple[float, float]]) -> float:
    total, end = 0.0, -math.inf
    for s, e in sorted(spans):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


class Ticket:
    """One admitted request's place in the queue, until its first token (or its end)."""

    def __init__(self, admission: Admission):
        self._admission = admission
        self._is_queued = True

    def release(self) -> None:
        if self._is_queued:
            self._is_queued = False
            self._admission.num_queued -= 1


class Admission:
    def __init__(self, config: RouterConfig, slo: SLOConfig):
        self.config = config
        self.slo = slo
        self.meter = ThroughputMeter()
        self.num_queued = 0

    def decide(self, views: list[InstanceView], num_prompt_tokens: int,
               now: float) -> Rejection | None:
        """None to admit; else why not and when to retry. `views`: the prefill stage."""
        if self.num_queued >= self.config.max_queued_requests:
            return Rejection("queue_full",
                             f"the server is overloaded: {self.num_queued} requests are waiting "
                             f"for their first token (limit {self.config.max_queued_requests}); "
                             "retry later", self._drain_s(views, now, extra_tokens=0))
        factor = self.config.ttft_reject_factor
        if factor is None:
            return None
        predicted = self.predicted_ttft_s(views, num_prompt_tokens, now)
        bound = factor * self.slo.ttft_s
        if predicted is not None and predicted > bound:
            return Rejection("ttft_slo",
                             f"the server is overloaded: the predicted time to first token is "
                             f"{predicted:.1f} s, over {bound:.1f} s ({factor:g} x the TTFT "
                             "SLO); retry later", _clamp(predicted - bound))
        return None

    def admit(self) -> Ticket:
        self.num_queued += 1
        return Ticket(self)

    def predicted_ttft_s(self, views: list[InstanceView], num_prompt_tokens: int,
                         now: float) -> float | None:
        """The shortest predicted TTFT over measured, available instances (None: none)."""
        best: float | None = None
        for v in views:
            if not v.is_available:
                continue
            rate = self.meter.tokens_per_s(v.instance_id, now)
            if rate is None:
                return None  # an unmeasured instance may well be idle: do not guess
            ttft = (v.inflight_prompt_tokens + num_prompt_tokens) / rate
            best = ttft if best is None else min(best, ttft)
        return best

    def _drain_s(self, views: list[InstanceView], now: float, extra_tokens: int) -> int:
        """Seconds until the measured instances have computed what is queued on them."""
        rates = [self.meter.tokens_per_s(v.instance_id, now) for v in views if v.is_available]
        measured = [r for r in rates if r is not None]
        if not measured:
            return 1
        queued = sum(v.inflight_prompt_tokens for v in views if v.is_available) + extra_tokens
        return _clamp(queued / sum(measured))

    def observe(self, trace: RequestTrace) -> None:
        """Learn prefill throughput from an ended request's trace."""
        ev = trace.events
        computed = trace.num_prompt_tokens - trace.num_prefix_matched_tokens
        if trace.prefill_instance is not None and LifecycleEvent.PREFILL_END.value in ev:
            self.meter.observe(trace.prefill_instance, computed,
                               ev[LifecycleEvent.PREFILL_START.value], ev[LifecycleEvent.PREFILL_END.value])
            return
        first = ev.get(LifecycleEvent.FIRST_TOKEN.value)
        began = ev.get(LifecycleEvent.GENERATING.value, ev.get(LifecycleEvent.DECODING.value))
        if trace.decode_instance is not None and first is not None and began is not None:
            # Colocated (or a local prefill on decode): the prompt ran from dispatch to the
            # first token on that instance.
            self.meter.observe(trace.decode_instance, computed, began, first)


def _clamp(seconds: float) -> int:
    return max(1, min(MAX_RETRY_AFTER_S, math.ceil(seconds)))
