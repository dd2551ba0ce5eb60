"""Arrival processes: when each request of a run is sent, as offsets from the run start.

Every process first draws *unit-rate* offsets (mean gap 1 s), fixed by its seed, and a
run at `rate_rps` divides them by the rate. So one seed gives the same request order and
the same relative spacing at every rate a goodput search probes, and two deployments
compared side by side see exactly the same arrival pattern. The first request is sent at
offset 0; the n-1 gaps after it follow the process.

- `PoissonArrivals`: exponential gaps (coefficient of variation 1).
- `GammaArrivals`: gamma gaps with a chosen coefficient of variation (CV): shape
  k = 1/CV^2, mean 1/rate. CV < 1 is smoother than Poisson, CV > 1 burstier; CV = 1 is
  Poisson again.
- `TraceArrivals`: timestamps replayed from a CSV or JSONL file (`load_trace`). With no
  rate they are replayed as recorded; with a rate they are time-scaled so the mean rate
  is `rate_rps` (the pattern's burstiness is kept).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from bench.errors import BenchError

TimeUnit = Literal["s", "ms"]

# Column (CSV) or key (JSONL) names accepted in a trace, first match wins. The `*_length`
# spellings are the ones Mooncake's published traces use.
_TIMESTAMP_KEYS = ("timestamp", "timestamp_s", "arrival_time")
_INPUT_KEYS = ("input_len", "input_length")
_OUTPUT_KEYS = ("output_len", "output_length")


class ArrivalProcess(Protocol):
    """Anything that gives send offsets for a run."""

    @property
    def description(self) -> str: ...

    def offsets_s(self, num_requests: int, rate_rps: float | None) -> np.ndarray:
        """Sorted send offsets in seconds, shape [num_requests], the first one 0."""
        ...


def _check_rate(rate_rps: float | None) -> float:
    if rate_rps is None:
        raise BenchError("this arrival process needs a request rate (--rate)")
    if not math.isfinite(rate_rps) or rate_rps <= 0:
        raise BenchError(f"request rate must be a positive number, got {rate_rps}")
    return rate_rps


def _offsets_from_gaps(gaps: np.ndarray) -> np.ndarray:
    # gaps: [n]; gaps[0] is dropped so that the first request goes out at once.
    offsets = np.cumsum(gaps)
    return offsets - offsets[0] if len(offsets) else offsets


@dataclass(frozen=True)
class PoissonArrivals:
    seed: int = 0

    @property
    def description(self) -> str:
        return "poisson"

    def offsets_s(self, num_requests: int, rate_rps: float | None) -> np.ndarray:
        rate_rps = _check_rate(rate_rps)
        rng = np.random.default_rng(self.seed)
        return _offsets_from_gaps(rng.exponential(1.0, size=num_requests)) / rate_rps


@dataclass(frozen=True)
class GammaArrivals:
    cv: float
    seed: int = 0

    def __post_init__(self) -> None:
        if not math.isfinite(self.cv) or self.cv <= 0:
            raise BenchError(f"gamma arrivals need a coefficient of variation > 0, got {self.cv}")

    @property
    def description(self) -> str:
        return f"gamma(cv={self.cv:g})"

    def offsets_s(self, num_requests: int, rate_rps: float | None) -> np.ndarray:
        rate_rps = _check_rate(rate_rps)
        rng = np.random.default_rng(self.seed)
        shape = 1.0 / self.cv**2
        gaps = rng.gamma(shape, 1.0 / shape, size=num_requests)  # mean 1, CV = self.cv
        return _offsets_from_gaps(gaps) / rate_rps


@dataclass(frozen=True)
class Trace:
    """A recorded request trace: timestamps shifted so the first is 0, sorted.

    Lengths are present only when every row of the file carried them.
    """

    timestamps_s: tuple[float, ...]
    input_lens: tuple[int, ...] | None = None
    output_lens: tuple[int, ...] | None = None

    @property
    def native_rate_rps(self) -> float | None:
        """Mean request rate of the recording; None with fewer than two distinct times."""
        span_s = self.timestamps_s[-1] - self.timestamps_s[0] if self.timestamps_s else 0.0
        if len(self.timestamps_s) < 2 or span_s <= 0:
            return None
        return (len(self.timestamps_s) - 1) / span_s


@dataclass(frozen=True)
class TraceArrivals:
    trace: Trace

    @property
    def description(self) -> str:
        return f"trace({len(self.trace.timestamps_s)} requests)"

    def offsets_s(self, num_requests: int, rate_rps: float | None) -> np.ndarray:
        if num_requests > len(self.trace.timestamps_s):
            raise BenchError(
                f"the trace holds {len(self.trace.timestamps_s)} requests, "
                f"{num_requests} were asked for"
            )
        recorded = np.asarray(self.trace.timestamps_s[:num_requests], dtype=float)
        if rate_rps is None:
            return recorded
        rate_rps = _check_rate(rate_rps)
        native = self.trace.native_rate_rps
        if native is None:
            raise BenchError("the trace has no time span, so it cannot be scaled to a rate")
        return recorded * (native / rate_rps)


def _pick(row: dict, keys: tuple[str, ...]) -> object | None:
    for key in keys:
        if key in row and row[key] not in (None, ""):
            return row[key]
    return None


def _parse_number(value: object, kind: type, where: str, name: str) -> float | int:
    try:
        number = kind(value) if kind is float else int(str(value))
    except (TypeError, ValueError):
        raise BenchError(f"{where}: {name} {value!r} is not a valid {kind.__name__}") from None
    if kind is float and not math.isfinite(number):
        raise BenchError(f"{where}: {name} {value!r} is not finite")
    return number


def _read_rows(path: Path) -> list[tuple[str, dict]]:
    """(location, row) pairs from a CSV with a header, or from JSONL objects."""
    try:
        text = path.read_text()
    except OSError as e:
        raise BenchError(f"cannot read trace file {path}: {e.strerror or e}") from None
    rows: list[tuple[str, dict]] = []
    if path.suffix in (".jsonl", ".ndjson", ".json"):
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise BenchError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise BenchError(f"{path}:{line_no}: expected a JSON object per line")
            rows.append((f"{path}:{line_no}", row))
        return rows
    reader = csv.DictReader(text.splitlines())
    if reader.fieldnames is None or not any(k in reader.fieldnames for k in _TIMESTAMP_KEYS):
        raise BenchError(
            f"{path}: a trace CSV needs a header with a timestamp column "
            f"(one of {', '.join(_TIMESTAMP_KEYS)})"
        )
    for line_no, row in enumerate(reader, start=2):
        rows.append((f"{path}:{line_no}", row))
    return rows


def load_trace(path: str | Path, time_unit: TimeUnit = "s") -> Trace:
    """Read a request trace from CSV (with a header) or JSONL (`.jsonl`).

    Each row needs a timestamp (`timestamp`, `timestamp_s` or `arrival_time`, in
    `time_unit`) and may carry `input_len`/`output_len` (or `input_length`/
    `output_length`). Rows are sorted by time and shifted to start at 0.
    """
    path = Path(path)
    scale = 1e-3 if time_unit == "ms" else 1.0
    times: list[float] = []
    input_lens: list[int | None] = []
    output_lens: list[int | None] = []
    for where, row in _read_rows(path):
        raw_time = _pick(row, _TIMESTAMP_KEYS)
        if raw_time is None:
            raise BenchError(f"{where}: missing timestamp (one of {', '.join(_TIMESTAMP_KEYS)})")
        times.append(float(_parse_number(raw_time, float, where, "timestamp")) * scale)
        for keys, out, name in ((_INPUT_KEYS, input_lens, "input_len"),
                                (_OUTPUT_KEYS, output_lens, "output_len")):
            raw = _pick(row, keys)
            value = None if raw is None else int(_parse_number(raw, int, where, name))
            if value is not None and value < 1:
                raise BenchError(f"{where}: {name} must be >= 1, got {value}")
            out.append(value)
    if not times:
        raise BenchError(f"{path}: the trace holds no requests")
    order = sorted(range(len(times)), key=times.__getitem__)
    start = times[order[0]]

    def column(values: list[int | None]) -> tuple[int, ...] | None:
        if any(v is None for v in values):
            return None
        return tuple(int(values[i]) for i in order)  # type: ignore[arg-type]

    return Trace(
        timestamps_s=tuple(times[i] - start for i in order),
        input_lens=column(input_lens),
        output_lens=column(output_lens),
    )
