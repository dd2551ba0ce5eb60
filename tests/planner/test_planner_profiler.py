"""`pdserve profile`: grid -> timings -> fit -> profile JSON, with a fake engine of known
latency (no vLLM), the profile feeding `pdserve plan --device cpu`, and input errors.
One engine test profiles the embedded tiny model for real with a minimal grid."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster import profiler
from cluster.config import load_config
from cluster.planner import cli as plan_cli
from cluster.planner.latency_model import LatencyProfile, load_profiles

REPO_ROOT = Path(__file__).resolve().parents[2]

# What the fake engine's iterations cost (ms), in the planner's own formulas.
TRUE = LatencyProfile(prefill=(6.0, 0.18, 5e-5), decoding_smallbs=(5.0, 8e-4, 0.25),
                      decoding_largebs=(5.0, 8e-4, 0.25))
SMALL_GRID = ["--prefill-lens", "64", "256", "512", "1024", "--prefill-batch-sizes", "1", "2",
              "--decode-batch-sizes", "1", "4", "16", "--decode-context-lens", "128", "1024",
              "--decode-steps", "8", "--repeats", "3", "--warmup", "1"]


class FakeEngine:
    """Iterations cost exactly TRUE's formulas, except that the first run of every shape is
    hit by interference (3x slower), as a busy shared host does to a real profile."""

    def __init__(self, settings: profiler.EngineSettings):
        self.settings = settings
        self.seen: set[tuple] = set()
        self.is_closed = False

    def start(self) -> profiler.EngineFacts:
        return profiler.EngineFacts(kv_capacity_tokens=87296, block_size=128, kv_dtype_bytes=2,
                                    device="fake CPU (bound to cores 0 of 2)")

    def warm_up(self, grid, rounds) -> None:
        pass

    def close(self) -> None:
        self.is_closed = True

    def _interference(self, key: tuple) -> float:
        first = key not in self.seen
        self.seen.add(key)
        return 3.0 if first else 1.0

    def time_prefill(self, input_lens):
        return TRUE.prefill_ms(input_lens) * self._interference(("p", tuple(input_lens)))

    def time_decode(self, batch_size, context_len, num_steps):
        slow = self._interference(("d", batch_size, context_len))
        return [TRUE.decode_ms([context_len + k] * batch_size) * slow for k in range(num_steps)]


def _args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    profiler.add_arguments(parser)
    return parser.parse_args(argv)


def test_grid_to_fit_recovers_known_coefficients_despite_interference():
    grid = profiler.ProfileGrid(prefill_lens=(64, 256, 512, 1024), prefill_batch_sizes=(1, 2, 4),
                                decode_batch_sizes=(1, 4, 16), decode_context_lens=(128, 1024),
                                decode_steps=9, repeats=3)
    grid.validate()
    data = profiler.measure_grid(grid, FakeEngine(profiler.EngineSettings(Path("."))))
    assert len(data.prefill) == 12 and len(data.decode) == 6  # 4 x 1024 = the 4096-token cap
    # Every shape kept its fastest run, i.e. the one without interference.
    assert all(max(runs) == pytest.approx(3 * min(runs)) for runs in data.prefill_runs_ms)
    entry = profiler.fit_profile(data.prefill, data.decode)
    for got, want in zip(entry["prefill"], TRUE.prefill):
        assert got == pytest.approx(want, rel=1e-6)
    for got, want in zip(entry["decoding_smallbs"], TRUE.decoding_smallbs):
        assert got == pytest.approx(want, rel=1e-6)
    prefill_fit, decode_fit = profiler.assess_fit(entry, data)
    assert prefill_fit.r_squared == pytest.approx(1.0) and decode_fit.max_abs_error_pct < 1e-6


def test_grid_skips_batches_over_the_token_caps():
    grid = profiler.ProfileGrid(prefill_lens=(512, 2048), prefill_batch_sizes=(1, 4),
                                prefill_max_batch_tokens=4096, decode_batch_sizes=(1, 32),
                                decode_context_lens=(128, 1024), decode_max_batch_tokens=8192)
    assert grid.prefill_shapes() == [(512,), (512,) * 4, (2048,)]
    assert grid.decode_shapes() == [(1, 128), (1, 1024), (32, 128)]
    assert grid.max_context() == 2048 + 1  # the longest prompt plus its one output token


def test_profile_json_loads_in_the_planner_and_plans_a_cpu_deployment(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "profiles" / "cpu.json"
    samples = tmp_path / "samples.json"
    engines: list[FakeEngine] = []

    def make(settings):
        engines.append(FakeEngine(settings))
        return engines[-1]

    code = profiler.profile_command(_args(["--model", str(tiny_model_dir), "--name", "test/cpu",
                                           "--cpu-cores", "0", *SMALL_GRID, "-o", str(out),
                                           "--samples-output", str(samples)]), make)
    report = capsys.readouterr().out
    assert code == 0, report
    assert engines[0].is_closed and engines[0].settings.cpu_cores == "0"
    assert "R^2 1.0000" in report and "runs max/min" in report

    entry = load_profiles(out).get("test/cpu", 1)
    assert entry.prefill == pytest.approx(TRUE.prefill, rel=1e-6)
    assert entry.hardware == "fake CPU (bound to cores 0 of 2)"
    assert entry.kv_capacity_tokens == 87296
    assert entry.whole_iterations  # it timed whole engine steps: no framework overhead on top
    # 2 (K, V) x 8 layers x 4 KV heads x 128 head dim x 2 bytes (the engine's dtype, not the file's)
    assert entry.kv_bytes_per_token == 2 * 8 * 4 * 128 * 2
    raw = json.loads(samples.read_text())
    assert len(raw["prefill"]) == 8 and len(raw["decode"]) == 6

    # The profile plans a 1 node x 2 core "cluster": one core per instance, pinned.
    plan_out = tmp_path / "plan.yaml"
    parser = argparse.ArgumentParser()
    plan_cli.add_arguments(parser)
    code = plan_cli.run(parser.parse_args([
        "--model", str(tiny_model_dir), "--profile", str(out), "--device", "cpu",
        "--nodes", "1", "--gpus-per-node", "2", "--gpu-memory-gib", "1",
        "--intra-node-bandwidth-gb-s", "5", "--input-len-range", "256", "1024",
        "--output-len-range", "32", "128", "--ttft-s", "0.6", "--tpot-s", "0.012",
        "--num-requests", "300", "--num-seeds", "1", "-o", str(plan_out)]))
    plan_report = capsys.readouterr().out
    assert code == 0, plan_report
    assert "req/s per core" in plan_report and "GPU" not in plan_report
    config = load_config(plan_out)
    assert (config.prefill.cpu_cores, config.decode.cpu_cores) == ([[0]], [[1]])
    for pool in (config.prefill, config.decode):
        assert (pool.num_gpus, pool.num_cpus, pool.kv_cache_gib) == (0.0, 1.0, 1)
        assert (pool.tensor_parallel_size, pool.pipeline_parallel_size) == (1, 1)


@pytest.mark.parametrize("argv, message", [
    (["--model", "/nonexistent/model"], "not a Hugging Face model directory"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--decode-batch-sizes", "0", "4"], "--decode-batch-sizes needs positive integers"),
    (["--prefill-lens", "4096", "--prefill-batch-sizes", "1"], "fewer than 3 shapes"),
    (["--max-model-len", "512"], "below the grid's longest context"),
    (["--cpu-cores", "zero"], "give core ids like 0, 0-3 or 0,2"),
    (["--cpu-cores", "4096"], "this process may use cores"),
])
def test_bad_input_exits_2_with_one_line(argv, message, tiny_model_dir, capsys):
    model = [] if "--model" in argv else ["--model", str(tiny_model_dir)]

    def must_not_start(settings):
        raise AssertionError("the engine must not start on bad input")

    assert profiler.profile_command(_args(model + argv), must_not_start) == 2
    err = capsys.readouterr().err
    assert err.startswith("pdserve profile: error: ") and message in err
    assert err.count("\n") == 1


def test_model_dir_without_config_exits_2_through_pdserve(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pdserve.cli", "profile", "--model", str(tmp_path)],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"pdserve profile: error: --model {tmp_path} is not a Hugging "
                                     "Face model directory (no config.json)")


def test_engine_failure_exits_1(tiny_model_dir, capsys):
    class Broken(FakeEngine):
        def start(self):
            raise RuntimeError("Engine core initialization failed.\nout of memory")

    assert profiler.profile_command(_args(["--model", str(tiny_model_dir), *SMALL_GRID]), Broken) == 1
    assert "profiling failed: RuntimeError: out of memory" in capsys.readouterr().err


def _vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:
        return False
    return True


@pytest.mark.engine
def test_profiles_the_tiny_model_on_the_real_engine(tmp_path):
    if not _vllm_available():
        pytest.skip("vLLM is not installed (run tests through ./run test)")
    out = tmp_path / "tiny.json"
    core = str(sorted(os.sched_getaffinity(0))[-1])
    argv = [sys.executable, "-m", "cluster.profiler", "--embedded-model", "tiny", "--cpu-cores", core,
            "--prefill-lens", "32", "128", "256", "--prefill-batch-sizes", "1", "2",
            "--decode-batch-sizes", "1", "4", "--decode-context-lens", "64", "256",
            "--decode-steps", "4", "--repeats", "1", "--warmup", "1", "-o", str(out)]
    result = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    entry = load_profiles(out).get("pdserve-tiny", 1)
    # K and V x 2 layers x 2 KV heads x 32 head dim, in the engine's bfloat16 (or float32).
    assert entry.kv_bytes_per_token in (2 * 2 * 2 * 32 * 2, 2 * 2 * 2 * 32 * 4)
    assert entry.kv_capacity_tokens > 0 and f"cores {core} of" in entry.hardware
    assert entry.prefill_ms([256]) > 0 and entry.decode_ms([256]) > 0
    assert "R^2" in result.stdout
