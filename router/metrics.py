"""Every pdserve metric, defined once, and the mapping from lifecycle data to Prometheus.

Components record data (a finished `RequestTrace`, a worker's `WorkerStats`, transfer
records); this module alone turns it into Prometheus series, all prefixed ``pdserve_`` with
units in their names. Workers do not expose their own endpoints: the router polls them
(it needs their load for routing anyway) and exports everything on its ``/metrics``, so one
scrape target covers the deployment.

SLO accounting: a request meets TTFT if its time to first token is within the SLO, meets
TPOT if its mean time per output token after the first is within the SLO (a one-token
answer meets it trivially), and counts toward goodput only if it meets both. Attainment and
goodput are also kept over a sliding window for live dashboards.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from cluster import slo as slo_math
from cluster.config import SLOConfig
from cluster.wire import LifecycleEvent, TransferStat, WorkerStats
from router.handoff import RequestTrace

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
                     1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
TOKEN_LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15,
                           0.2, 0.3, 0.5, 0.75, 1.0, 2.0)
TRANSFER_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                      0.25, 0.5, 1.0, 2.5, 5.0)
SLIDING_WINDOW_S = 60.0


@dataclass(frozen=True)
class RequestSLO:
    ttft_s: float | None
    tpot_s: float | None
    is_ttft_met: bool
    is_tpot_met: bool

    @property
    def is_met(self) -> bool:
        return self.is_ttft_met and self.is_tpot_met


def request_latencies(trace: RequestTrace) -> tuple[float | None, float | None, float | None]:
    """(TTFT, TPOT, end-to-end) in seconds; None where the request never got that far."""
    first = trace.events.get("first_token")
    finish = trace.events.get("finish")
    ttft = first - trace.arrival_s if first is not None else None
    e2e = finish - trace.arrival_s if finish is not None else None
    tpot = None
    if first is not None and finish is not None:
        tpot = slo_math.tpot_s(first, finish, trace.num_output_tokens)
    return ttft, tpot, e2e


def evaluate_slo(trace: RequestTrace, slo: SLOConfig) -> RequestSLO:
    ttft, tpot, _ = request_latencies(trace)
    return RequestSLO(
        ttft_s=ttft, tpot_s=tpot,
        is_ttft_met=slo_math.meets_ttft(ttft, slo),
        is_tpot_met=ttft is not None and slo_math.meets_tpot(tpot, slo),
    )


class Metrics:
    def __init__(self, slo: SLOConfig, num_units: int, unit: str = "instance"):
        self.slo = slo
        self.num_units = max(1, num_units)
        self.unit = unit
        self.registry = r = CollectorRegistry()
        # -- requests ---------------------------------------------------------------
        self.requests = Counter("pdserve_requests", "Requests ended, by outcome and finish reason",
                                ["outcome", "finish_reason"], registry=r)
        self.requests_in_flight = Gauge("pdserve_requests_in_flight", "Requests being served",
                                        registry=r)
        self.ttft = Histogram("pdserve_request_ttft_seconds", "Time to first token",
                              buckets=LATENCY_BUCKETS_S, registry=r)
        self.tpot = Histogram("pdserve_request_tpot_seconds",
                              "Mean time per output token after the first",
                              buckets=TOKEN_LATENCY_BUCKETS_S, registry=r)
        self.e2e = Histogram("pdserve_request_e2e_seconds", "End-to-end request latency",
                             buckets=LATENCY_BUCKETS_S, registry=r)
        self.queue = Histogram("pdserve_request_queue_seconds",
                               "Arrival to prefill start (router and prefill queues)",
                               buckets=LATENCY_BUCKETS_S, registry=r)
        self.prefill = Histogram("pdserve_request_prefill_seconds", "Prefill compute time",
                                 buckets=LATENCY_BUCKETS_S, registry=r)
        self.kv_transfer = Histogram("pdserve_request_kv_transfer_seconds",
                                     "Making the staged KV local to decode (fetch)",
                                     buckets=TRANSFER_BUCKETS_S, registry=r)
        self.decode_wait = Histogram("pdserve_request_decode_wait_seconds",
                                     "First token out of prefill to decode's first new token",
                                     buckets=LATENCY_BUCKETS_S, registry=r)
        self.prompt_tokens = Counter("pdserve_prompt_tokens", "Prompt tokens of ended requests",
                                     registry=r)
        self.generation_tokens = Counter("pdserve_generation_tokens",
                                         "Output tokens of ended requests", registry=r)
        # -- SLO --------------------------------------------------------------------
        self.slo_requests = Counter("pdserve_slo_requests", "Requests judged against the SLO",
                                    ["slo_class"], registry=r)
        self.slo_ttft_met = Counter("pdserve_slo_ttft_met", "Requests meeting the TTFT SLO",
                                    ["slo_class"], registry=r)
        self.slo_tpot_met = Counter("pdserve_slo_tpot_met", "Requests meeting the TPOT SLO",
                                    ["slo_class"], registry=r)
        self.slo_met = Counter("pdserve_slo_met", "Requests meeting both SLOs (goodput)",
                               ["slo_class"], registry=r)
        self.slo_target = Gauge("pdserve_slo_target_seconds", "Configured SLO targets",
                                ["kind"], registry=r)
        self.slo_target.labels("ttft").set(slo.ttft_s)
        self.slo_target.labels("tpot").set(slo.tpot_s)
        self.attainment_target = Gauge("pdserve_slo_attainment_target_ratio",
                                       "Configured attainment target", registry=r)
        self.attainment_target.set(slo.attainment)
        self.attainment = Gauge("pdserve_slo_attainment_ratio",
                                f"Share of requests meeting both SLOs, last {SLIDING_WINDOW_S:.0f} s",
                                registry=r)
        self.goodput = Gauge("pdserve_goodput_requests_per_second",
                             f"Requests per second meeting both SLOs, last {SLIDING_WINDOW_S:.0f} s",
                             registry=r)
        self.goodput_per_unit = Gauge("pdserve_goodput_per_unit_requests_per_second",
                                      "Goodput divided by GPUs (or instances on CPU)", ["unit"],
                                      registry=r)
        self.throughput = Gauge("pdserve_throughput_requests_per_second",
                                f"Requests per second ended, last {SLIDING_WINDOW_S:.0f} s",
                                registry=r)
        # -- pools ------------------------------------------------------------------
        self.instances = Gauge("pdserve_instances", "Instances by role and state",
                               ["role", "state"], registry=r)
        self.running = Gauge("pdserve_instance_running_requests", "Sequences running",
                             ["role", "instance_id"], registry=r)
        self.waiting = Gauge("pdserve_instance_waiting_requests", "Requests queued in the engine",
                             ["role", "instance_id"], registry=r)
        self.queued_prompt_tokens = Gauge("pdserve_instance_queued_prompt_tokens",
                                          "Prompt tokens accepted and not yet computed",
                                          ["role", "instance_id"], registry=r)
        self.kv_usage = Gauge("pdserve_instance_kv_cache_usage_ratio", "KV-cache blocks in use",
                              ["role", "instance_id"], registry=r)
        self.staged_segments = Gauge("pdserve_instance_staged_kv_segments",
                                     "Prefill KV staged and not yet claimed",
                                     ["instance_id"], registry=r)
        # -- handoff ----------------------------------------------------------------
        self.transfers = Counter("pdserve_kv_transfers", "KV movements by transport and outcome",
                                 ["transport", "direction", "outcome"], registry=r)
        self.transfer_bytes = Counter("pdserve_kv_transfer_bytes", "KV bytes moved",
                                      ["transport", "direction"], registry=r)
        self.transfer_seconds = Counter("pdserve_kv_transfer_seconds",
                                        "Time spent moving KV (sum)", ["transport", "direction"],
                                        registry=r)
        self.served = Counter("pdserve_requests_served", "How each request's prompt KV was "
                              "obtained: transferred, recomputed on decode, colocated, "
                              "local_prefill (computed on its decode instance), or prefill_only (ended at its first token)", ["served_by"],
                              registry=r)
        # -- routing decisions --------------------------------------------------------
        self.paths = Counter("pdserve_routing_paths", "Where each request's prompt was computed: "
                             "disaggregated (prefill pool, then KV handoff), local_prefill (on "
                             "its decode instance: conditional disaggregation) or colocated; "
                             "with the rule that decided it", ["path", "reason"], registry=r)
        self.prefix_matched_tokens = Counter(
            "pdserve_routing_prefix_matched_tokens", "Prompt tokens the chosen instance was "
            "believed to hold in its prefix cache when the request was routed", registry=r)
        # -- recovery (router/recovery.py; counted when the request ends) --------------
        self.prefill_retries = Counter(
            "pdserve_request_prefill_retries", "Prefill attempts retried on another instance "
            "after an instance fault, by reason (instance_lost, stalled, timeout, unavailable)",
            ["reason"], registry=r)
        self.migrations = Counter(
            "pdserve_request_migrations", "Streams continued on another instance after theirs "
            "failed mid-request, by reason (instance_lost, stalled, timeout, unavailable)",
            ["reason"], registry=r)
        for reason in ("instance_lost", "stalled"):
            self.prefill_retries.labels(reason)
            self.migrations.labels(reason)
        # -- admission --------------------------------------------------------------
        self.rejected = Counter("pdserve_requests_rejected", "Requests turned away before any "
                                "work, by reason (unauthorized, body_too_large, queue_full, "
                                "ttft_slo)", ["reason"], registry=r)
        for reason in ("unauthorized", "body_too_large", "queue_full", "ttft_slo"):
            self.rejected.labels(reason)  # every reason is exported, from 0
        # -- online re-planning (pdserve/replanner.py; exported once a loop runs) ------
        self.replan_decisions = Counter(
            "pdserve_replan_decisions", "Sizing decisions of the re-planning loop, by action "
            "(hold, resize) and whether it was applied (false: observe-only)",
            ["action", "applied"], registry=r)
        self.replan_target = Gauge("pdserve_replan_target_instances",
                                   "Instances the last re-planning decision asked for, by role",
                                   ["role"], registry=r)
        self.replan_correction = Gauge("pdserve_replan_correction_ratio",
                                       "Measured / predicted latency the re-planner applies to "
                                       "its profile", registry=r)
        self.replan_last = Gauge("pdserve_replan_last_decision_timestamp_seconds",
                                 "When the last re-planning decision was made, with its reason",
                                 ["action", "reason"], registry=r)
        self.recent_replans: collections.deque = collections.deque(maxlen=20)  # ScalingDecision
        self._window: collections.deque[tuple[float, bool]] = collections.deque()
        self.started_s = time.time()

    # -- recording ------------------------------------------------------------------
    def record_request(self, trace: RequestTrace, slo_class: str = "default") -> RequestSLO:
        trace.mark(LifecycleEvent.FINISH)
        outcome = trace.state.value
        self.requests.labels(outcome, trace.finish_reason or "none").inc()
        self.prompt_tokens.inc(trace.num_prompt_tokens)
        self.generation_tokens.inc(trace.num_output_tokens)
        if trace.served_by is not None:
            self.served.labels(trace.served_by).inc()
        if trace.path is not None:
            self.paths.labels(trace.path, trace.path_reason or "default").inc()
        if trace.num_prefix_matched_tokens:
            self.prefix_matched_tokens.inc(trace.num_prefix_matched_tokens)
        for reason in trace.prefill_retry_reasons:
            self.prefill_retries.labels(reason).inc()
        for migration in trace.migrations:
            self.migrations.labels(migration.reason).inc()
        ev = trace.events
        if "prefill_start" in ev:
            self.queue.observe(max(0.0, ev["prefill_start"] - trace.arrival_s))
            if "prefill_end" in ev:
                self.prefill.observe(max(0.0, ev["prefill_end"] - ev["prefill_start"]))
        if trace.kv_load_s is not None:
            self.kv_transfer.observe(trace.kv_load_s)
        if "handoff" in ev and "decode_first_token" in ev:
            self.decode_wait.observe(max(0.0, ev["decode_first_token"] - ev["handoff"]))
        result = evaluate_slo(trace, self.slo)
        ttft, tpot, e2e = result.ttft_s, result.tpot_s, request_latencies(trace)[2]
        if ttft is not None:
            self.ttft.observe(ttft)
        if tpot is not None:
            self.tpot.observe(tpot)
        if e2e is not None and outcome == "finished":
            self.e2e.observe(e2e)
        if outcome == "finished":
            # Aborted requests (client gone) are not judged; failed ones count as misses.
            self._judge(result, slo_class)
        elif outcome == "failed":
            self._judge(RequestSLO(ttft, tpot, False, False), slo_class)
        return result

    def _judge(self, result: RequestSLO, slo_class: str) -> None:
        self.slo_requests.labels(slo_class).inc()
        if result.is_ttft_met:
            self.slo_ttft_met.labels(slo_class).inc()
        if result.is_tpot_met:
            self.slo_tpot_met.labels(slo_class).inc()
        if result.is_met:
            self.slo_met.labels(slo_class).inc()
        now = time.time()
        self._window.append((now, result.is_met))
        self._prune_window(now)  # also here: nothing may read the window (no scraper)

    def record_replan(self, decision) -> None:
        """One decision of the re-planning loop (a `cluster.planner.online.ScalingDecision`):
        counted, its targets and correction as gauges, and its reason as the label of the
        last-decision series (only the newest decision keeps a series)."""
        self.replan_decisions.labels(decision.action, str(decision.applied).lower()).inc()
        self.replan_target.labels("prefill").set(decision.num_prefill[1])
        self.replan_target.labels("decode").set(decision.num_decode[1])
        self.replan_correction.set(decision.correction)
        self.replan_last.clear()
        self.replan_last.labels(decision.action, decision.reason).set(decision.time_s)
        self.recent_replans.append(decision)

    def record_rejection(self, reason: str) -> None:
        self.rejected.labels(reason).inc()

    def record_transfers(self, transfers: tuple[TransferStat, ...]) -> None:
        for t in transfers:
            self.transfers.labels(t.transport, t.direction, t.outcome).inc()
            self.transfer_bytes.labels(t.transport, t.direction).inc(t.num_bytes)
            self.transfer_seconds.labels(t.transport, t.direction).inc(t.duration_s)

    def record_pool(self, views) -> None:
        """Instance gauges from the pool's latest stats (router.pool.InstanceView list)."""
        counts: collections.Counter[tuple[str, str]] = collections.Counter()
        for v in views:
            state = "ready" if v.is_available else ("unhealthy" if not v.is_healthy else "starting")
            counts[(v.role, state)] += 1
            s: WorkerStats | None = v.stats
            if s is None:
                continue
            labels = (v.role, v.instance_id)
            self.running.labels(*labels).set(s.num_running_reqs)
            self.waiting.labels(*labels).set(s.num_waiting_reqs)
            self.queued_prompt_tokens.labels(*labels).set(s.queued_prompt_tokens)
            self.kv_usage.labels(*labels).set(s.kv_cache_usage)
            if v.role == "prefill":
                self.staged_segments.labels(v.instance_id).set(s.num_staged_segments)
        for role in {v.role for v in views}:
            for state in ("ready", "starting", "unhealthy"):
                self.instances.labels(role, state).set(counts[(role, state)])

    # -- windows --------------------------------------------------------------------
    def _prune_window(self, now: float) -> None:
        while self._window and self._window[0][0] < now - SLIDING_WINDOW_S:
            self._window.popleft()

    def window_summary(self, now: float | None = None) -> dict[str, float]:
        now = time.time() if now is None else now
        self._prune_window(now)
        n = len(self._window)
        met = sum(1 for _, ok in self._window if ok)
        # During the first minute the window is as long as the router has been up.
        span = max(1.0, min(SLIDING_WINDOW_S, now - self.started_s))
        summary = {
            "window_s": span,
            "attainment": met / n if n else 1.0,
            "goodput_rps": met / span,
            "throughput_rps": n / span,
        }
        summary["goodput_per_unit_rps"] = summary["goodput_rps"] / self.num_units
        return summary

    def refresh_windows(self) -> dict[str, float]:
        summary = self.window_summary()
        self.attainment.set(summary["attainment"])
        self.goodput.set(summary["goodput_rps"])
        self.throughput.set(summary["throughput_rps"])
        self.goodput_per_unit.labels(self.unit).set(summary["goodput_per_unit_rps"])
        return summary

    def exposition(self) -> bytes:
        self.refresh_windows()
        return generate_latest(self.registry)
