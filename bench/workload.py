"""Workloads: how long each request's prompt and output are, and the prompts themselves.

Lengths come from one of
- `SyntheticLengths`: independent input and output `LengthDistribution`s (fixed, uniform,
  log-normal);
- `DatasetLengths`: rows of an `input_len,output_len` CSV (e.g. the ShareGPT or HumanEval
  length samples), drawn at random by seed;
- `TraceLengths`: the lengths recorded in a trace, in trace order.

`build_workload` draws the lengths, clips them (prompt at least the tokenizer's minimum,
prompt + output within `max_context` when given), and builds a prompt of exactly
`input_len` tokens per request. Every request asks for exactly `output_len` tokens
(`ignore_eos`, `min_tokens = max_tokens = output_len`; see `bench.loadgen`).
Everything is deterministic given the seed.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from bench.errors import BenchError
from bench.prompts import PromptBuilder
from cluster.workload_schema import LengthSpec, lognormal_mu, sample_lengths

DistributionKind = Literal["fixed", "uniform", "lognormal"]


@dataclass(frozen=True)
class LengthDistribution:
    """Token counts of one side (input or output) of synthetic requests.

    - fixed: always `mean`.
    - uniform: integers in [`min_len`, `max_len`], both inclusive (`mean` unused).
    - lognormal: mean `mean`, `sigma` the standard deviation of log(length)
      (mu = ln(mean) - sigma^2/2), rounded and clipped to [`min_len`, `max_len`].
    """

    kind: DistributionKind = "fixed"
    mean: int = 128
    min_len: int = 1
    max_len: int | None = None
    sigma: float = 1.0

    def __post_init__(self) -> None:
        if self.mean < 1 or self.min_len < 1:
            raise BenchError(f"lengths must be >= 1 (mean {self.mean}, min {self.min_len})")
        if self.max_len is not None and self.max_len < self.min_len:
            raise BenchError(f"max length {self.max_len} is below min length {self.min_len}")
        if self.kind == "uniform" and self.max_len is None:
            raise BenchError("a uniform length distribution needs a max length")
        if self.kind == "lognormal" and not (math.isfinite(self.sigma) and self.sigma > 0):
            raise BenchError(f"log-normal sigma must be > 0, got {self.sigma}")

    def sample(self, num: int, rng: np.random.Generator) -> np.ndarray:
        """Integer lengths, shape [num]."""
        if self.kind == "fixed":
            return np.full(num, self.mean, dtype=np.int64)
        if self.kind == "uniform":
            assert self.max_len is not None  # checked in __post_init__
            return rng.integers(self.min_len, self.max_len + 1, size=num, dtype=np.int64)
        mu = lognormal_mu(self.sigma, mean=self.mean)  # the planner's law (cluster.workload_schema)
        lengths = np.rint(rng.lognormal(mu, self.sigma, size=num)).astype(np.int64)
        return np.clip(lengths, self.min_len, self.max_len)


class LengthSource(Protocol):
    def sample(self, num: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(input_lens, output_lens), each shape [num]."""
        ...


@dataclass(frozen=True)
class SyntheticLengths:
    input: LengthDistribution
    output: LengthDistribution

    def sample(self, num: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        return self.input.sample(num, rng), self.output.sample(num, rng)


@dataclass(frozen=True)
class WorkloadFileLengths:
    """The lengths of a workload file (`cluster.workload_schema`, `--workload FILE`), drawn
    with the sampler `pdserve plan` uses for the same file: one distribution, one code path."""

    spec: LengthSpec

    def sample(self, num: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        return sample_lengths(self.spec, num, rng)


@dataclass(frozen=True)
class DatasetLengths:
    """Length pairs of a dataset; a run draws rows without replacement while it can."""

    input_lens: np.ndarray  # [num_rows]
    output_lens: np.ndarray  # [num_rows]

    def sample(self, num: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        num_rows = len(self.input_lens)
        rows = rng.choice(num_rows, size=num, replace=num > num_rows)
        return self.input_lens[rows], self.output_lens[rows]


@dataclass(frozen=True)
class TraceLengths:
    """The lengths a trace recorded, request i getting row i."""

    input_lens: tuple[int, ...]
    output_lens: tuple[int, ...]

    def sample(self, num: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        if num > len(self.input_lens):
            raise BenchError(f"the trace holds {len(self.input_lens)} requests, {num} asked for")
        return (np.asarray(self.input_lens[:num], dtype=np.int64),
                np.asarray(self.output_lens[:num], dtype=np.int64))


def load_length_csv(path: str | Path) -> DatasetLengths:
    """Read an `input_len,output_len` CSV (header required, extra columns ignored)."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise BenchError(f"cannot read length file {path}: {e.strerror or e}") from None
    reader = csv.DictReader(lines)
    header = reader.fieldnames or []
    if "input_len" not in header or "output_len" not in header:
        raise BenchError(
            f"{path}: expected a header with input_len and output_len columns, got "
            f"{','.join(header) or 'nothing'}"
        )
    input_lens: list[int] = []
    output_lens: list[int] = []
    for line_no, row in enumerate(reader, start=2):
        for name, out in (("input_len", input_lens), ("output_len", output_lens)):
            raw = row.get(name)
            try:
                value = int(raw)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                raise BenchError(f"{path}:{line_no}: {name} {raw!r} is not an integer") from None
            if value < 1:
                raise BenchError(f"{path}:{line_no}: {name} must be >= 1, got {value}")
            out.append(value)
    if not input_lens:
        raise BenchError(f"{path}: no rows after the header")
    return DatasetLengths(np.asarray(input_lens, dtype=np.int64),
                          np.asarray(output_lens, dtype=np.int64))


@dataclass(frozen=True)
class RequestSpec:
    """One request of a workload: what is sent, independent of when."""

    index: int
    input_len: int  # prompt tokens, special tokens included
    output_len: int  # tokens the server is asked to generate, exactly
    prompt: str


@dataclass(frozen=True)
class Workload:
    requests: tuple[RequestSpec, ...]
    num_clipped: int  # requests whose drawn lengths were changed by clipping


def clip_lengths(
    input_lens: np.ndarray, output_lens: np.ndarray, min_input_len: int, max_context: int | None
) -> tuple[np.ndarray, np.ndarray, int]:
    """Clip to min_input_len <= input and input + output <= max_context.

    Past the context the prompt is cut first (to max_context - 1, keeping room for one
    output token), then the output to what is left. Returns the clipped arrays and how
    many requests changed.
    """
    new_in = np.maximum(input_lens, min_input_len)
    new_out = np.maximum(output_lens, 1)
    if max_context is not None:
        if max_context < min_input_len + 1:
            raise BenchError(
                f"max context {max_context} leaves no room for a {min_input_len}-token "
                "prompt and one output token"
            )
        new_in = np.minimum(new_in, max_context - 1)
        new_out = np.minimum(new_out, max_context - new_in)
    changed = int(np.count_nonzero((new_in != input_lens) | (new_out != output_lens)))
    return new_in, new_out, changed


def build_workload(
    lengths: LengthSource,
    num_requests: int,
    prompt_builder: PromptBuilder,
    seed: int = 0,
    max_context: int | None = None,
) -> Workload:
    """Draw `num_requests` requests and build their prompts (deterministic by seed)."""
    if num_requests < 1:
        raise BenchError(f"need at least one request, got {num_requests}")
    # Separate streams for lengths and prompts, and none shared with the arrival process.
    input_lens, output_lens = lengths.sample(num_requests, np.random.default_rng([seed, 1]))
    input_lens, output_lens, num_clipped = clip_lengths(
        input_lens, output_lens, prompt_builder.min_tokens, max_context
    )
    requests = tuple(
        RequestSpec(
            index=i,
            input_len=int(n_in),
            output_len=int(n_out),
            prompt=prompt_builder.build(int(n_in), np.random.default_rng([seed, 2, i])),
        )
        for i, (n_in, n_out) in enumerate(zip(input_lens, output_lens))
    )
    return Workload(requests=requests, num_clipped=num_clipped)
