"""`pdserve bench` end to end against fake servers: run, goodput, compare, errors."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import cli
from bench.deployment import free_port
from bench.fake_server import FakeServerThread, FakeTiming

REPO = Path(__file__).resolve().parents[2]
QUICK = ["--num-warmup", "0", "--no-progress", "--input-len", "16", "--output-len", "4"]


@pytest.fixture(scope="module")
def fast_server():
    with FakeServerThread(FakeTiming(ttft_s=0.01, tpot_s=0.005, max_concurrency=8)) as s:
        yield s


@pytest.fixture(scope="module")
def slow_server():
    # One request at a time, ~215 ms each: capacity ~4.6 req/s. The margins to the SLOs
    # below are ~5-10x, so a loaded 2-core machine cannot flip the outcome.
    with FakeServerThread(FakeTiming(ttft_s=0.2, tpot_s=0.005, max_concurrency=1)) as s:
        yield s


def test_unreachable_server_is_one_clear_line(capsys):
    url = f"http://127.0.0.1:{free_port()}"
    code = cli.main(["run", "--url", url, "--rate", "1", "--num-requests", "2", *QUICK])
    err = capsys.readouterr().err
    assert code == 2
    assert f"pdserve bench: error: cannot reach the server at {url}" in err
    assert "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("pdserve bench")]) == 1


def test_malformed_csv_exits_2_without_traceback(tmp_path):
    bad = tmp_path / "lengths.csv"
    bad.write_text("input_len,output_len\n10,5\n12,lots\n")
    result = subprocess.run(
        [sys.executable, "-m", "bench.cli", "run", "--url", "http://127.0.0.1:9", "--rate", "1",
         "--dataset", str(bad)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"pdserve bench: error: {bad}:3: output_len 'lots' is not an integer")


def test_bad_flags_are_clear_errors(capsys, fast_server):
    assert cli.main(["run", "--url", fast_server.url, *QUICK]) == 2
    assert "--rate is required" in capsys.readouterr().err
    assert cli.main(["run", "--url", fast_server.url, "--rate", "1", "--arrival", "trace",
                     *QUICK]) == 2
    assert "--arrival trace needs --trace FILE" in capsys.readouterr().err
    assert cli.main(["run", "--url", fast_server.url, "--rate", "1", "--input-dist", "uniform",
                     *QUICK]) == 2
    assert "needs a max length" in capsys.readouterr().err


def test_run_prints_summary_and_writes_records(capsys, tmp_path, fast_server):
    out = tmp_path / "run.json"
    code = cli.main(["run", "--url", fast_server.url, "--rate", "40", "--num-requests", "12",
                     "--input-dist", "uniform", "--input-min", "8", "--input-max", "64",
                     "--num-warmup", "1", "--no-progress", "--output-len", "4",
                     "--slo-ttft-s", "0.2", "--slo-tpot-s", "0.05", "--output-json", str(out)])
    text = capsys.readouterr().out
    assert code == 0
    data = json.loads(out.read_text())
    # The printed attainment is the share of records meeting both SLOs (the fake server is
    # fast, but a loaded CI machine can still delay a request past 200 ms: no fixed value).
    met = [r["ttft_s"] <= 0.2 and (r["e2e_s"] - r["ttft_s"]) / 3 <= 0.05 for r in data["records"]]
    assert f"attainment         {100 * sum(met) / len(met):.1f}%" in text and "TTFT" in text
    assert sum(met) >= 1
    assert data["model"] == "fake-model"
    assert data["summary"]["num_ok"] == 12 and data["summary"]["slo"]["ttft_s"] == 0.2
    assert len(data["records"]) == 12
    assert all(8 <= r["input_len"] <= 64 and r["num_output_tokens"] == 4 for r in data["records"])


def test_trace_replay_uses_recorded_times_and_lengths(tmp_path, fast_server):
    trace = tmp_path / "trace.csv"
    trace.write_text("timestamp,input_len,output_len\n0.0,10,2\n0.1,20,3\n0.3,30,4\n")
    out = tmp_path / "run.json"
    code = cli.main(["run", "--url", fast_server.url, "--arrival", "trace", "--trace", str(trace),
                     *QUICK, "--output-json", str(out)])
    assert code == 0
    records = json.loads(out.read_text())["records"]
    assert [(r["input_len"], r["output_len"]) for r in records] == [(10, 2), (20, 3), (30, 4)]
    assert [r["scheduled_s"] for r in records] == pytest.approx([0.0, 0.1, 0.3])


def test_goodput_search_finds_the_capacity_region(capsys, tmp_path, slow_server):
    code = cli.main(["goodput", "--url", slow_server.url, "--rates", "2", "80",
                     "--bisect-steps", "0", "--num-requests", "12", "--num-units", "2",
                     "--slo-ttft-s", "1.0", "--slo-tpot-s", "0.5", *QUICK,
                     "--output-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    assert "goodput 2 req/s, 1 req/s per unit (2 units)" in out
    data = json.loads((tmp_path / "goodput.json").read_text())
    assert data["goodput"]["goodput_rps"] == 2.0
    assert data["goodput"]["lowest_failing_rate_rps"] == 80.0
    assert (tmp_path / "attainment_vs_rate.png").stat().st_size > 0


def test_compare_started_config_against_running_url(capsys, tmp_path, fast_server):
    config = tmp_path / "colocated.yaml"
    config.write_text("mode: colocated\ncolocated: {num_instances: 1, cpu_cores: [[0]]}\n"
                      "slo: {ttft_s: 1.0, tpot_s: 0.5, attainment: 0.9}\n")
    out_dir = tmp_path / "out"
    code = cli.main([
        "compare", "--config-a", str(config), "--url-b", fast_server.url, "--label-b", "fast",
        "--num-units-b", "2",
        "--serve-command", f"{sys.executable} -m bench.fake_server --ttft-s 0.2 --tpot-s 0.005 "
        "--per-instance-concurrency 1",
        "--health-timeout-s", "30", "--rates", "2", "80", "--full-sweep", "--bisect-steps", "0",
        "--num-requests", "12", *QUICK, "--output-dir", str(out_dir),
    ])
    out = capsys.readouterr().out
    assert code == 0
    table = out[out.index("deployment"):]
    # The engine's core, plus the cores `pdserve serve` pins the front end to: every other
    # core of this host (pdserve.launcher.with_default_front_end_cores).
    host = len(os.sched_getaffinity(0))
    assert "colocated" in table and "fast" in table
    assert ("1 core" if host == 1 else f"{host} cores") in table
    for name in ("comparison.json", "attainment_vs_rate.png", "ttft_cdf.png", "tpot_cdf.png",
                 "colocated-server.log"):
        assert (out_dir / name).exists(), name
    assert (out_dir / "ttft_cdf.png").stat().st_size > 0
    data = json.loads((out_dir / "comparison.json").read_text())
    a, b = data["targets"]
    assert a["label"] == "colocated" and a["config"] == str(config)
    assert b["url"] == fast_server.url
    assert data["slo"]["ttft_s"] == 1.0  # from the first config
    # Same workload and arrival seed against both.
    prompts_a = [(r["input_len"], r["scheduled_s"]) for r in a["measurements"][0]["records"]]
    prompts_b = [(r["input_len"], r["scheduled_s"]) for r in b["measurements"][0]["records"]]
    assert prompts_a == prompts_b
    assert a["goodput"]["goodput_rps"] == 2.0 and b["goodput"]["goodput_rps"] == 80.0
    assert data["cdf_rate_rps"] == 80.0


def test_add_arguments_plugs_into_another_parser(fast_server, capsys):
    parser = argparse.ArgumentParser(prog="pdserve")
    commands = parser.add_subparsers(dest="command", required=True)
    cli.add_arguments(commands.add_parser("bench"))
    args = parser.parse_args(["bench", "run", "--url", fast_server.url, "--rate", "50",
                              "--num-requests", "3", *QUICK])
    assert args.command == "bench" and args.bench_command == "run"
    assert cli.run(args) == 0
    assert "3 sent, 3 ok" in capsys.readouterr().out
