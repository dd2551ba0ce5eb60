"""Synthetic request traces: length distributions and arrival processes.

A `SyntheticTrace` holds N requests with arrival times generated at rate 1 req/s; `arrivals_at(r)`
rescales them to rate r. Reusing one trace across rates (common random numbers) makes
attainment a smooth, almost monotone function of rate, which the goodput bisection needs.

Arrivals: Poisson (exponential gaps), or gamma gaps with coefficient of variation `cv`
(cv > 1 is burstier than Poisson, cv < 1 smoother; cv = 1 is Poisson).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from cluster.workload_schema import lognormal_mu


class WorkloadError(ValueError):
    """A workload description or length file that cannot be used."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FixedLengths(_Strict):
    kind: Literal["fixed"] = "fixed"
    input_len: int = Field(gt=0, description="Prompt tokens of every request.")
    output_len: int = Field(gt=0, description="Output tokens of every request (first included).")


class UniformLengths(_Strict):
    kind: Literal["uniform"] = "uniform"
    input_len_min: int = Field(gt=0, description="Smallest prompt length (inclusive).")
    input_len_max: int = Field(gt=0, description="Largest prompt length (inclusive).")
    output_len_min: int = Field(gt=0, description="Smallest output length (inclusive).")
    output_len_max: int = Field(gt=0, description="Largest output length (inclusive).")

    @model_validator(mode="after")
    def _ordered(self) -> "UniformLengths":
        if self.input_len_min > self.input_len_max or self.output_len_min > self.output_len_max:
            raise ValueError("uniform lengths need *_min <= *_max")
        return self


class LognormalLengths(_Strict):
    """Log-normal lengths by mean (as `pdserve bench` takes them) or by median; sigma is the
    standard deviation of log(length) (`cluster.workload_schema.lognormal_mu`)."""

    kind: Literal["lognormal"] = "lognormal"
    input_len_mean: float | None = Field(None, gt=0, description="Mean prompt length.")
    input_len_median: float | None = Field(None, gt=0, description="Median prompt length (instead of the mean).")
    input_len_sigma: float = Field(ge=0, description="Std-dev of log(prompt length).")
    output_len_mean: float | None = Field(None, gt=0, description="Mean output length.")
    output_len_median: float | None = Field(None, gt=0, description="Median output length (instead of the mean).")
    output_len_sigma: float = Field(ge=0, description="Std-dev of log(output length).")
    max_input_len: int = Field(4096, gt=0, description="Prompt lengths are clipped to this.")
    max_output_len: int = Field(2048, gt=0, description="Output lengths are clipped to this.")

    @model_validator(mode="after")
    def _one_centre_each(self) -> "LognormalLengths":
        for side in ("input", "output"):
            if (getattr(self, f"{side}_len_mean") is None) == (getattr(self, f"{side}_len_median") is None):
                raise ValueError(f"give exactly one of {side}_len_mean or {side}_len_median")
        return self

    def mus(self) -> tuple[float, float]:
        """(log-mean of prompt lengths, of output lengths)."""
        return (lognormal_mu(self.input_len_sigma, mean=self.input_len_mean, median=self.input_len_median),
                lognormal_mu(self.output_len_sigma, mean=self.output_len_mean, median=self.output_len_median))


class CsvLengths(_Strict):
    kind: Literal["csv"] = "csv"
    path: Path = Field(description="CSV with header input_len,output_len; rows are resampled.")


class SampleLengths(_Strict):
    """Observed (prompt, output) lengths, resampled like a CSV's rows (the online planner's
    live sample)."""

    kind: Literal["samples"] = "samples"
    input_lens: tuple[int, ...] = Field(min_length=1, description="Prompt tokens per request.")
    output_lens: tuple[int, ...] = Field(min_length=1, description="Output tokens per request.")

    @model_validator(mode="after")
    def _paired(self) -> "SampleLengths":
        if len(self.input_lens) != len(self.output_lens):
            raise ValueError("input_lens and output_lens must have the same length")
        if min(self.input_lens) < 1 or min(self.output_lens) < 1:
            raise ValueError("lengths must be >= 1")
        return self


LengthSpec = Annotated[
    Union[FixedLengths, UniformLengths, LognormalLengths, CsvLengths, SampleLengths],
    Field(discriminator="kind"),
]


class ArrivalSpec(_Strict):
    process: Literal["poisson", "gamma"] = Field(
        "poisson", description="Poisson arrivals, or gamma-distributed gaps with the given cv."
    )
    cv: float = Field(
        1.0, gt=0, description="Coefficient of variation of inter-arrival gaps (burstiness)."
    )

    @model_validator(mode="after")
    def _poisson_has_cv_one(self) -> "ArrivalSpec":
        if self.process == "poisson" and self.cv != 1.0:
            raise ValueError("Poisson arrivals have cv 1; use process: gamma for another cv")
        return self


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


@lru_cache(maxsize=8)
def _read_lengths_csv(path: Path, mtime_ns: int) -> tuple[np.ndarray, np.ndarray]:
    inputs, outputs = [], []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"input_len", "output_len"} <= set(reader.fieldnames):
            raise WorkloadError(f"{path}: header must include input_len,output_len")
        for line, row in enumerate(reader, start=2):
            try:
                i, o = int(row["input_len"]), int(row["output_len"])
            except (TypeError, ValueError):
                raise WorkloadError(f"{path} line {line}: lengths must be integers") from None
            if i <= 0 or o <= 0:
                raise WorkloadError(f"{path} line {line}: lengths must be > 0")
            inputs.append(i)
            outputs.append(o)
    if not inputs:
        raise WorkloadError(f"{path} has no requests")
    return np.array(inputs, dtype=np.int64), np.array(outputs, dtype=np.int64)


def read_lengths_csv(path: Path | str) -> tuple[np.ndarray, np.ndarray]:
    """(input_lens, output_lens) of a length CSV; read once per file version."""
    path = Path(path).resolve()
    try:
        mtime_ns = path.stat().st_mtime_ns
    except FileNotFoundError:
        raise WorkloadError(f"workload file not found: {path}") from None
    except OSError as e:
        raise WorkloadError(f"cannot read workload file {path}: {e}") from None
    return _read_lengths_csv(path, mtime_ns)


def sample_lengths(dist: LengthSpec, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(dist, FixedLengths):
        return np.full(n, dist.input_len, np.int64), np.full(n, dist.output_len, np.int64)
    if isinstance(dist, UniformLengths):
        return (rng.integers(dist.input_len_min, dist.input_len_max + 1, n),
                rng.integers(dist.output_len_min, dist.output_len_max + 1, n))
    if isinstance(dist, LognormalLengths):
        mu_in, mu_out = dist.mus()
        i = rng.lognormal(mu_in, dist.input_len_sigma, n)
        o = rng.lognormal(mu_out, dist.output_len_sigma, n)
        return (np.clip(np.rint(i), 1, dist.max_input_len).astype(np.int64),
                np.clip(np.rint(o), 1, dist.max_output_len).astype(np.int64))
    if isinstance(dist, SampleLengths):
        inputs, outputs = np.array(dist.input_lens, np.int64), np.array(dist.output_lens, np.int64)
    else:
        inputs, outputs = read_lengths_csv(dist.path)
    idx = rng.integers(0, len(inputs), n)
    return inputs[idx], outputs[idx]


def sample_unit_arrivals(arrival: ArrivalSpec, n: int, rng: np.random.Generator) -> np.ndarray:
    if arrival.process == "poisson":
        gaps = rng.exponential(1.0, n)
    else:
        shape = 1.0 / arrival.cv**2  # mean shape*scale = 1, variance shape*scale^2 = cv^2
        gaps = rng.gamma(shape, arrival.cv**2, n)
    return np.cumsum(gaps)


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
