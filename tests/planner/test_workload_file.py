"""One workload file for `pdserve plan` and `pdserve bench` (issue 14): both commands accept
the same YAML file and draw request lengths from the same distribution, with the same
sampler, so a plan's predicted goodput and a benchmark's measured goodput are comparable."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest

from bench import cli as bench_cli
from bench import options as bench_options
from bench.arrivals import GammaArrivals
from bench.errors import BenchError
from bench.workload import WorkloadFileLengths
from cluster.planner import cli as plan_cli
from cluster.planner.problem import build_problem
from cluster.planner.workload import make_trace
from cluster.workload_schema import WorkloadError, load_workload_file

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _plan_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    plan_cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def _bench_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench_cli.add_arguments(parser)
    return parser.parse_args(["run", "--url", "http://127.0.0.1:1", *argv])


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "workload.yaml"
    path.write_text(text)
    return path


LOGNORMAL = """
lengths: {kind: lognormal, input_len_mean: 300, input_len_sigma: 0.8,
          output_len_mean: 120, output_len_sigma: 0.6, max_input_len: 2000, max_output_len: 800}
arrival: {process: gamma, cv: 2.0}
rate: 7.5
"""


def test_plan_and_bench_read_the_same_file(tmp_path, synthetic_profile_path, tiny_model_dir):
    path = _write(tmp_path, LOGNORMAL)
    file = load_workload_file(path)
    request = plan_cli.build_request(_plan_args("--workload", str(path), "--model", str(tiny_model_dir),
                                                "--profile", str(synthetic_profile_path)))
    assert request.workload == file  # lengths, arrival and the target rate
    args = _bench_args("--workload", str(path))
    lengths = bench_options.lengths_from_args(args, None)
    assert isinstance(lengths, WorkloadFileLengths) and lengths.spec == file.lengths
    arrivals, trace = bench_options.arrivals_from_args(args)
    assert trace is None and isinstance(arrivals, GammaArrivals) and arrivals.cv == 2.0
    assert bench_options.workload_file_from_args(args).rate == 7.5


def test_both_draw_the_same_lengths(tmp_path, synthetic_profile_path, tiny_model_dir):
    path = _write(tmp_path, LOGNORMAL)
    request = plan_cli.build_request(_plan_args("--workload", str(path), "--model", str(tiny_model_dir),
                                                "--profile", str(synthetic_profile_path)))
    # The planner's trace for seed s draws lengths first from default_rng(s): so does the
    # benchmark's source given the same generator; the draws are the same requests.
    planned = make_trace(request.workload.lengths, request.workload.arrival, 5000, seed=3)
    sent_in, sent_out = bench_options.lengths_from_args(_bench_args("--workload", str(path)), None) \
        .sample(5000, np.random.default_rng(3))
    assert np.array_equal(planned.input_lens, sent_in) and np.array_equal(planned.output_lens, sent_out)
    # ... and the log-normal law is parameterised by the mean in both (clipping aside).
    assert abs(sent_in.mean() - 300) / 300 < 0.05 and abs(sent_out.mean() - 120) / 120 < 0.05
    problem = build_problem(request)
    assert problem.lengths["input_mean"] == pytest.approx(sent_in.mean(), rel=0.05)


def test_a_csv_workload_resolves_next_to_the_file(tmp_path):
    (tmp_path / "lengths.csv").write_text("input_len,output_len\n10,5\n20,7\n")
    path = _write(tmp_path, "lengths: {kind: csv, path: lengths.csv}\n")
    file = load_workload_file(path)
    assert file.lengths.path == tmp_path / "lengths.csv" and file.rate is None
    ins, outs = WorkloadFileLengths(file.lengths).sample(100, np.random.default_rng(0))
    assert set(zip(ins.tolist(), outs.tolist())) == {(10, 5), (20, 7)}


def test_bad_files_fail_with_one_line(tmp_path):
    with pytest.raises(WorkloadError, match="not found"):
        load_workload_file(tmp_path / "missing.yaml")
    with pytest.raises(WorkloadError, match="lengths"):
        load_workload_file(_write(tmp_path, "lengths: {kind: fixed, input_len: 0, output_len: 4}\n"))
    with pytest.raises(plan_cli.InputError, match="arrival"):
        plan_cli.build_request(_plan_args("--workload", str(_write(
            tmp_path, "lengths: {kind: fixed, input_len: 4, output_len: 4}\narrival: {process: x}\n"))))
    # The file replaces bench's length and arrival flags: mixing them is refused.
    path = _write(tmp_path, "lengths: {kind: fixed, input_len: 4, output_len: 4}\n")
    with pytest.raises(BenchError, match="no --dataset"):
        bench_options.lengths_from_args(_bench_args("--workload", str(path), "--arrival", "gamma"), None)
