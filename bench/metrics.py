"""Latency metrics, SLO attainment and throughput, computed from load-generator records.

Per request (all at the client, from the moment the request was sent):
- TTFT: time to the first token-bearing chunk.
- e2e: time to the last token-bearing chunk.
- TPOT: mean time per output token after the first, (e2e - TTFT) / (n_out - 1); a
  request with one output token has no TPOT and meets any TPOT SLO.
- SLO met: the request finished OK, TTFT <= slo.ttft_s and TPOT <= slo.tpot_s.

Per run:
- attainment: share of the *sent* requests that met both SLOs; a failed or unfinished
  request counts as a miss (it is in the denominator, never in the numerator). TTFT-only
  and TPOT-only attainments are reported beside it.
- throughput: successful requests (and their prompt and output tokens) per second of
  wall time, from the run start to the end of the last request.
- distributions: mean, p50, p90, p99 and max of TTFT, TPOT, e2e and the inter-token
  gaps (ITL) over successful requests (linear interpolation between samples).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Iterable

import numpy as np

from bench.records import RequestOutcome, RequestRecord, RunRecords
from cluster import slo as slo_math
from cluster.config import SLOConfig


def tpot_s(e2e_s: float, ttft_s: float, num_output_tokens: int) -> float | None:
    """Mean inter-token time after the first token; None with fewer than two tokens
    (`cluster.slo.tpot_s` with times relative to the send)."""
    return slo_math.tpot_s(ttft_s, e2e_s, num_output_tokens)


@dataclass(frozen=True)
class RequestMetrics:
    index: int
    is_ok: bool
    ttft_s: float | None
    tpot_s: float | None
    e2e_s: float | None
    num_output_tokens: int
    meets_ttft: bool
    meets_tpot: bool

    @property
    def meets_slo(self) -> bool:
        return self.meets_ttft and self.meets_tpot


def request_metrics(record: RequestRecord, slo: SLOConfig) -> RequestMetrics:
    if not record.is_ok or record.ttft_s is None or record.e2e_s is None:
        return RequestMetrics(record.index, False, record.ttft_s, None, record.e2e_s,
                              record.num_output_tokens, False, False)
    tpot = tpot_s(record.e2e_s, record.ttft_s, record.num_output_tokens)
    return RequestMetrics(
        index=record.index,
        is_ok=True,
        ttft_s=record.ttft_s,
        tpot_s=tpot,
        e2e_s=record.e2e_s,
        num_output_tokens=record.num_output_tokens,
        meets_ttft=slo_math.meets_ttft(record.ttft_s, slo),
        meets_tpot=slo_math.meets_tpot(tpot, slo),
    )


@dataclass(frozen=True)
class Distribution:
    count: int
    mean: float
    p50: float
    p90: float
    p99: float
    max: float


def distribution(values: Iterable[float]) -> Distribution | None:
    """Summary statistics of `values`; None when there are none."""
    array = np.asarray(list(values), dtype=float)
    if array.size == 0:
        return None
    p50, p90, p99 = np.percentile(array, [50, 90, 99])
    return Distribution(int(array.size), float(array.mean()), float(p50), float(p90),
                        float(p99), float(array.max()))


@dataclass(frozen=True)
class RunSummary:
    rate_rps: float | None
    slo: SLOConfig
    num_sent: int
    num_ok: int
    num_not_sent: int  # cut off by the duration bound; not in any denominator
    outcome_counts: dict[str, int]
    attainment: float  # both SLOs, over the sent requests
    ttft_attainment: float
    tpot_attainment: float
    wall_time_s: float
    request_throughput_rps: float
    input_throughput_tps: float
    output_throughput_tps: float
    ttft_s: Distribution | None
    tpot_s: Distribution | None
    e2e_s: Distribution | None
    itl_s: Distribution | None
    max_send_lag_s: float  # how late the client sent its latest request; large = client overloaded
    # The server counted another prompt or output length than was asked for: the
    # tokenizer differs from the served model's, or ignore_eos/min_tokens is ignored.
    num_prompt_len_mismatches: int
    num_output_len_mismatches: int
    first_error: str | None

    @property
    def meets_target(self) -> bool:
        return self.num_sent > 0 and self.attainment >= self.slo.attainment

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["slo"] = self.slo.model_dump()
        data["meets_target"] = self.meets_target
        return data


def _share(flags: list[bool]) -> float:
    return sum(flags) / len(flags) if flags else 0.0


def summarize(run: RunRecords, slo: SLOConfig) -> RunSummary:
    records = run.records
    per_request = [request_metrics(r, slo) for r in records]
    ok = [m for m in per_request if m.is_ok]
    ok_records = [r for r in records if r.is_ok]
    wall_time_s = max(run.wall_time_s, 1e-9)
    lags = [r.sent_s - r.scheduled_s for r in records if r.sent_s is not None]
    errors = [r.error for r in records if r.outcome is not RequestOutcome.OK and r.error]
    return RunSummary(
        rate_rps=run.rate_rps,
        slo=slo,
        num_sent=len(records),
        num_ok=len(ok),
        num_not_sent=run.num_not_sent,
        outcome_counts=dict(Counter(r.outcome.value for r in records)),
        attainment=_share([m.meets_slo for m in per_request]),
        ttft_attainment=_share([m.meets_ttft for m in per_request]),
        tpot_attainment=_share([m.meets_tpot for m in per_request]),
        wall_time_s=run.wall_time_s,
        request_throughput_rps=len(ok) / wall_time_s,
        input_throughput_tps=sum(r.input_len for r in ok_records) / wall_time_s,
        output_throughput_tps=sum(r.num_output_tokens for r in ok_records) / wall_time_s,
        ttft_s=distribution(m.ttft_s for m in ok if m.ttft_s is not None),
        tpot_s=distribution(m.tpot_s for m in ok if m.tpot_s is not None),
        e2e_s=distribution(m.e2e_s for m in ok if m.e2e_s is not None),
        itl_s=distribution(gap for r in ok_records for gap in r.itl_s),
        max_send_lag_s=max(lags, default=0.0),
        num_prompt_len_mismatches=sum(
            1 for r in ok_records
            if r.num_prompt_tokens is not None and r.num_prompt_tokens != r.input_len
        ),
        num_output_len_mismatches=sum(1 for r in ok_records if r.num_output_tokens != r.output_len),
        first_error=errors[0] if errors else None,
    )
