"""Synthetic request traces: length distributions and arrival processes.

A `SyntheticTrace` holds N requests with arrival times generated at rate 1 req/s; `arrivals_at(r)`
rescales them to rate r. Reusing one trace across rates (common random numbers) makes
attainment a smooth, almost monotone function of rate, which the goodput bisection needs.

Arrivals: Poisson (exponential gaps), or gamma gaps with coefficient of variation `cv`
(cv > 1 is burstier than Poisson, cv < 1 smoother; cv = 1 is Poisson).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# The length and arrival vocabulary is the workload file's (`cluster.workload_schema`), which
# `pdserve bench` reads too; re-exported here under the names the planner has always used.
from cluster.workload_schema import (  # noqa: F401
    ArrivalSpec, CsvLengths, FixedLengths, LengthSpec, LognormalLengths, SampleLengths,
    UniformLengths, WorkloadError, read_lengths_csv, sample_lengths, sample_unit_arrivals)


@dataclass(frozen=True)
class SyntheticTrace:
    """N requests in arrival order, arrivals at 1 req/s."""

    unit_arrival_s: np.ndarray  # [N] float64, non-decreasing
    input_lens: np.ndarray  # [N] int64 > 0
    output_lens: np.ndarray  # [N] int64 > 0

    def __len__(self) -> int:
        return len(self.input_lens)

    def arrivals_at(self, rate: float) -> np.ndarray:
        if rate <= 0:
            raise ValueError("rate must be > 0")
        return self.unit_arrival_s / rate


def make_trace(
    lengths: LengthSpec, arrival: ArrivalSpec, num_requests: int, seed: int
) -> SyntheticTrace:
    """A reproducible trace: same arguments, same requests."""
    if num_requests < 1:
        raise WorkloadError("num_requests must be >= 1")
    rng = np.random.default_rng(seed)
    inputs, outputs = sample_lengths(lengths, num_requests, rng)
    return SyntheticTrace(sample_unit_arrivals(arrival, num_requests, rng), inputs, outputs)


def length_summary(lengths: LengthSpec, seed: int = 0, n: int = 20000) -> dict[str, float]:
    """Means and maxima of a distribution (exact for CSVs), for reports and feasibility."""
    if isinstance(lengths, CsvLengths):
        i, o = read_lengths_csv(lengths.path)
    elif isinstance(lengths, SampleLengths):
        i, o = np.array(lengths.input_lens), np.array(lengths.output_lens)
    else:
        i, o = sample_lengths(lengths, n, np.random.default_rng(seed))
    return {"input_mean": float(i.mean()), "output_mean": float(o.mean()),
            "input_max": int(i.max()), "output_max": int(o.max()),
            "total_max": int((i + o).max())}
