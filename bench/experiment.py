"""One benchmark target measured at one rate, or searched for its goodput.

An `Experiment` fixes everything except the server: the requests (prompts and lengths),
the arrival process and seed, the SLO and the run bounds. Measuring two deployments
with one `Experiment` therefore sends them the very same requests at the very same
offsets.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable

from bench.arrivals import ArrivalProcess
from bench.errors import BenchError
from bench.goodput import GoodputResult, GoodputSearch, SearchSettings
from bench.loadgen import LoadOptions, run_load
from bench.metrics import RunSummary, summarize
from bench.records import RunRecords
from bench.workload import RequestSpec, Workload
from cluster.config import SLOConfig

if TYPE_CHECKING:
    from bench.vllm_client import VllmBenchClient


@dataclass(frozen=True)
class Experiment:
    workload: Workload
    arrivals: ArrivalProcess
    slo: SLOConfig
    request_timeout_s: float = 600.0
    drain_timeout_s: float | None = None
    duration_s: float | None = None
    continuous_usage_stats: bool = False
    show_progress: bool = True
    # Sent one by one before measuring (not measured): pays one-off start-up costs and
    # checks that the server accepts our requests at all.
    warmup_requests: tuple[RequestSpec, ...] = ()
    # None: pdserve's own load generator sends `workload`. Else vLLM's `vllm bench serve`
    # sends its random dataset (same lengths, seed and arrival process; see
    # bench.vllm_client) and only the workload's size is used.
    client: "VllmBenchClient | None" = None

    def load_options(self, base_url: str, model: str, desc: str) -> LoadOptions:
        return LoadOptions(
            base_url=base_url,
            model=model,
            request_timeout_s=self.request_timeout_s,
            drain_timeout_s=self.drain_timeout_s,
            duration_s=self.duration_s,
            continuous_usage_stats=self.continuous_usage_stats,
            show_progress=self.show_progress,
            progress_desc=desc,
        )


@dataclass(frozen=True)
class Measurement:
    summary: RunSummary
    run: RunRecords


async def warm_up(experiment: Experiment, base_url: str, model: str) -> None:
    """Send the warm-up requests one at a time; BenchError if the server rejects one."""
    options = replace(experiment.load_options(base_url, model, "warm-up"),
                      show_progress=False, duration_s=None)
    for spec in experiment.warmup_requests:
        run = await run_load([spec], [0.0], options)
        record = run.records[0]
        if not record.is_ok:
            raise BenchError(
                f"warm-up request to {base_url} failed ({record.outcome.value}): {record.error}"
            )


async def measure(
    experiment: Experiment, base_url: str, model: str, rate_rps: float | None
) -> Measurement:
    """Run the whole workload against `base_url` at `rate_rps` and summarise it."""
    requests = experiment.workload.requests
    if experiment.client is not None:
        num = len(requests)
        if experiment.duration_s is not None and rate_rps is not None:
            num = max(1, min(num, math.ceil(experiment.duration_s * rate_rps)))
        run = await asyncio.to_thread(experiment.client.run, base_url, model, rate_rps, num)
        return Measurement(summarize(run, experiment.slo), run)
    offsets_s = experiment.arrivals.offsets_s(len(requests), rate_rps)
    desc = f"{rate_rps:.3g} req/s" if rate_rps is not None else "trace replay"
    run = await run_load(requests, offsets_s.tolist(),
                         experiment.load_options(base_url, model, desc), rate_rps=rate_rps)
    return Measurement(summarize(run, experiment.slo), run)


async def find_goodput(
    experiment: Experiment,
    base_url: str,
    model: str,
    settings: SearchSettings,
    on_measurement: Callable[[Measurement], None] | None = None,
) -> tuple[GoodputResult, list[Measurement]]:
    """Search the goodput of one server; every measurement is returned and reported."""
    search = GoodputSearch(settings)
    measurements: list[Measurement] = []
    while (rate_rps := search.next_rate()) is not None:
        measurement = await measure(experiment, base_url, model, rate_rps)
        measurements.append(measurement)
        search.observe(rate_rps, measurement.summary.attainment)
        if on_measurement is not None:
            on_measurement(measurement)
    return search.result(), measurements
