"""One workload vocabulary, and one workload file, for `pdserve plan` and `pdserve bench`.

A workload file (YAML) says what requests look like and how they arrive:

    lengths: {kind: csv, path: sharegpt_opt_lengths.csv}    # relative to the file
      # or {kind: fixed, input_len, output_len}
      #    {kind: uniform, input_len_min, input_len_max, output_len_min, output_len_max}
      #    {kind: lognormal, input_len_mean|input_len_median, input_len_sigma,
      #     output_len_mean|output_len_median, output_len_sigma, max_input_len, max_output_len}
    arrival: {process: gamma, cv: 2.0}                       # default Poisson
    rate: 12.0                                               # optional, req/s

`pdserve plan --workload FILE` plans for it (`rate` set: the fewest GPUs that sustain it) and
`pdserve bench --workload FILE` sends it; both draw lengths with `sample_lengths` and gaps
with `sample_unit_arrivals`, so a plan's predicted goodput and a benchmark's measured
goodput are for the same requests by construction.

A log-normal length law is given by its **mean** (what a user measures: tokens per request)
and `sigma`, the standard deviation of log(length); its log-mean is then
`mu = ln(mean) - sigma^2 / 2` (its median is `exp(mu)`). A median is also accepted
(`mu = ln(median)`); both convert through `lognormal_mu`.
"""

from __future__ import annotations

import csv
import math
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal, Union

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


def lognormal_mu(sigma: float, *, mean: float | None = None, median: float | None = None) -> float:
    """Log-mean of a log-normal length law given exactly one of its mean or median."""
    if (mean is None) == (median is None):
        raise ValueError("give exactly one of mean or median")
    if sigma < 0 or not math.isfinite(sigma):
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma}")
    value = mean if mean is not None else median
    if value is None or value <= 0:
        raise ValueError(f"a log-normal length needs a mean/median > 0, got {value}")
    return math.log(value) - (sigma**2 / 2 if mean is not None else 0.0)


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


class WorkloadFile(_Strict):
    """The workload file's document (and `PlanRequest.workload`)."""

    lengths: LengthSpec = Field(description="Prompt/output length distribution.")
    arrival: ArrivalSpec = Field(default_factory=ArrivalSpec, description="Arrival process.")
    rate: float | None = Field(
        None, gt=0,
        description="Request rate (req/s). plan: find the fewest GPUs that sustain it (unset: "
        "the highest goodput within the GPU budget); bench: send at this rate.",
    )


def load_workload_file(path: str | Path) -> WorkloadFile:
    """Read and validate a workload file; a relative CSV path is taken from the file's folder."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise WorkloadError(f"workload file not found: {path}") from None
    except (OSError, yaml.YAMLError) as e:
        raise WorkloadError(f"cannot read workload file {path}: {e}") from None
    if not isinstance(data, dict):
        raise WorkloadError(f"{path}: a workload file is a mapping with lengths, arrival, rate")
    lengths = data.get("lengths")
    if isinstance(lengths, dict) and lengths.get("kind") == "csv" and "path" in lengths:
        csv_path = Path(str(lengths["path"]))
        if not csv_path.is_absolute():
            data = {**data, "lengths": {**lengths, "path": str(path.parent / csv_path)}}
    try:
        return WorkloadFile.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise WorkloadError(f"{path}: {where}: {first['msg']}") from None
