"""Arrival processes: rate, burstiness, determinism, trace replay."""

import json

import numpy as np
import pytest

from bench.arrivals import GammaArrivals, PoissonArrivals, TraceArrivals, load_trace
from bench.errors import BenchError

N = 20_001  # 20,000 gaps


def _gaps(offsets: np.ndarray) -> np.ndarray:
    return np.diff(offsets)


@pytest.mark.parametrize("rate", [0.5, 4.0, 50.0])
def test_poisson_mean_rate_and_cv(rate):
    offsets = PoissonArrivals(seed=1).offsets_s(N, rate)
    gaps = _gaps(offsets)
    # Mean gap 1/rate within 4 standard errors (SE = (1/rate)/sqrt(n) for exponential).
    assert abs(gaps.mean() - 1 / rate) < 4 * (1 / rate) / np.sqrt(len(gaps))
    assert abs(gaps.std() / gaps.mean() - 1.0) < 0.05
    # Arrivals counted over the run match rate * duration.
    assert abs((len(offsets) - 1) / offsets[-1] - rate) / rate < 0.03


def test_poisson_gaps_are_exponential_ks():
    rate = 3.0
    gaps = np.sort(_gaps(PoissonArrivals(seed=7).offsets_s(N, rate)))
    n = len(gaps)
    cdf = 1 - np.exp(-rate * gaps)
    d = max(np.max(np.arange(1, n + 1) / n - cdf), np.max(cdf - np.arange(n) / n))
    assert d < 1.95 / np.sqrt(n)  # Kolmogorov-Smirnov, alpha = 0.001


@pytest.mark.parametrize("cv", [0.5, 2.0])
def test_gamma_mean_rate_and_cv(cv):
    rate = 4.0
    gaps = _gaps(GammaArrivals(cv=cv, seed=2).offsets_s(N, rate))
    assert abs(gaps.mean() * rate - 1) < 4 * cv / np.sqrt(len(gaps))
    assert abs(gaps.std() / gaps.mean() - cv) / cv < 0.06


def test_gamma_burstier_than_poisson_in_window_counts():
    # Index of dispersion of counts in 1 s windows: ~1 for Poisson, > 1 for CV > 1.
    def dispersion(offsets):
        counts = np.bincount(offsets.astype(int))
        return counts.var() / counts.mean()

    assert dispersion(PoissonArrivals(seed=3).offsets_s(N, 10.0)) == pytest.approx(1.0, abs=0.15)
    assert dispersion(GammaArrivals(cv=3.0, seed=3).offsets_s(N, 10.0)) > 3.0


def test_arrivals_are_deterministic_sorted_start_at_zero_and_scale_with_rate():
    for process in (PoissonArrivals(seed=5), GammaArrivals(cv=2.0, seed=5)):
        a = process.offsets_s(100, 2.0)
        assert a[0] == 0.0 and np.all(np.diff(a) >= 0)
        np.testing.assert_array_equal(a, process.offsets_s(100, 2.0))
        np.testing.assert_allclose(process.offsets_s(100, 8.0), a / 4)
    assert not np.array_equal(PoissonArrivals(seed=1).offsets_s(50, 1.0),
                              PoissonArrivals(seed=2).offsets_s(50, 1.0))


def test_synthetic_arrivals_need_a_positive_rate():
    with pytest.raises(BenchError, match="--rate"):
        PoissonArrivals().offsets_s(10, None)
    with pytest.raises(BenchError, match="positive"):
        PoissonArrivals().offsets_s(10, -1.0)
    with pytest.raises(BenchError, match="coefficient of variation"):
        GammaArrivals(cv=0.0)


def test_trace_csv_is_sorted_shifted_and_scaled(tmp_path):
    path = tmp_path / "trace.csv"
    path.write_text("timestamp,input_len,output_len\n12.0,30,3\n10.0,10,1\n11.0,20,2\n14.0,40,4\n")
    trace = load_trace(path)
    assert trace.timestamps_s == (0.0, 1.0, 2.0, 4.0)
    assert trace.input_lens == (10, 20, 30, 40) and trace.output_lens == (1, 2, 3, 4)
    assert trace.native_rate_rps == pytest.approx(0.75)
    arrivals = TraceArrivals(trace)
    np.testing.assert_allclose(arrivals.offsets_s(4, None), [0, 1, 2, 4])
    np.testing.assert_allclose(arrivals.offsets_s(4, 1.5), [0, 0.5, 1, 2])  # twice as fast
    with pytest.raises(BenchError, match="holds 4 requests"):
        arrivals.offsets_s(5, None)


def test_trace_jsonl_in_milliseconds_without_lengths(tmp_path):
    path = tmp_path / "trace.jsonl"
    rows = [{"timestamp": t, "hash_ids": [1]} for t in (0, 500, 1500)]
    path.write_text("\n".join(json.dumps(row) for row in rows))
    trace = load_trace(path, time_unit="ms")
    assert trace.timestamps_s == (0.0, 0.5, 1.5)
    assert trace.input_lens is None and trace.output_lens is None


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("t.csv", "time,input_len\n1,2\n", "header with a timestamp column"),
        ("t.csv", "timestamp\n1.0\nsoon\n", r"t.csv:3: timestamp 'soon' is not a valid float"),
        ("t.csv", "timestamp,input_len\n1.0,0\n", r"t.csv:2: input_len must be >= 1"),
        ("t.jsonl", '{"timestamp": 1}\n{"timestamp": 2\n', r"t.jsonl:2: not valid JSON"),
        ("t.jsonl", '{"ts": 1}\n', r"t.jsonl:1: missing timestamp"),
        ("t.csv", "timestamp\n", "holds no requests"),
    ],
)
def test_malformed_trace_names_file_and_line(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(BenchError, match=message):
        load_trace(path)


def test_missing_trace_file(tmp_path):
    with pytest.raises(BenchError, match="cannot read trace file"):
        load_trace(tmp_path / "nope.csv")
