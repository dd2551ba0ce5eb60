"""The plain-vLLM peer target and the `vllm bench serve` client (no engine started)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from bench import cli
from bench.deployment import ServerProcess, free_port
from bench.errors import BenchError
from bench.peer_vllm import VllmPeer, parse_cpu_list, parse_peer_spec, peer_from_config
from bench.records import RequestOutcome
from bench.vllm_client import VllmBenchClient, patch_vllm_version, records_from_result
from cluster.config import SLOConfig, load_config


@pytest.fixture(scope="module")
def fast_server():
    from bench.fake_server import FakeServerThread, FakeTiming

    with FakeServerThread(FakeTiming(ttft_s=0.01, tpot_s=0.005, max_concurrency=8)) as s:
        yield s.url


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "deploy.yaml"
    path.write_text(text)
    return path


def test_peer_mirrors_the_pdserve_config(tmp_path, tiny_model_path):
    config = load_config(_config(tmp_path, (
        "mode: disaggregated\nmodel: {embedded: tiny, dtype: float32, max_model_len: 1024}\n"
        "prefill: {num_instances: 1, kv_cache_gib: 2, max_num_seqs: 32}\n"
        "decode: {num_instances: 1, kv_cache_gib: 3}\n")))
    peer = peer_from_config(config)
    argv = peer.argv(8123)
    assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    flags = dict(zip(argv[3::1], argv[4::1]))
    assert flags["--model"] == str(tiny_model_path)  # the directory pdserve builds and serves
    assert flags["--served-model-name"] == "pdserve-tiny"
    assert flags["--dtype"] == "float32"
    assert flags["--max-model-len"] == "1024"
    assert flags["--max-num-seqs"] == "32"
    assert flags["--port"] == "8123"
    assert "--enable-prefix-caching" in argv
    env = peer.env()
    assert env["VLLM_TARGET_DEVICE"] == "cpu"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "5"  # the KV space of both instances together


def test_binding_default_leaves_vllm_auto_and_cores_binds(monkeypatch, tiny_model_path):
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "7")  # inherited: must not leak in
    default = VllmPeer(model_path=tiny_model_path, served_model_name="m")
    assert "VLLM_CPU_OMP_THREADS_BIND" not in default.env()
    assert "default binding" in default.describe()
    both = VllmPeer(model_path=tiny_model_path, served_model_name="m", binding="0-1")
    assert both.env()["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"
    assert parse_peer_spec("vllm") == ("default", ())
    assert parse_peer_spec("vllm:cores=0-1") == ("0-1", ())
    assert parse_peer_spec("vllm:cores=0,1:cpus=0-1") == ("0,1", (0, 1))
    assert parse_cpu_list("0-2,5") == [0, 1, 2, 5]
    for bad in ("vllm:cores=", "vllm:cores=a-b", "vllm:gpu", "sglang"):
        with pytest.raises(BenchError):
            parse_peer_spec(bad)


def test_started_server_gets_its_env_and_affinity(tmp_path):
    port = free_port()
    core = sorted(os.sched_getaffinity(0))[-1]
    server = ServerProcess(None, port, tmp_path / "s.log", health_timeout_s=30,
                           argv=[sys.executable, "-m", "bench.fake_server", "--port", str(port)],
                           env={**os.environ, "PDSERVE_PEER_MARK": "yes"}, cpus=[core])
    with server:
        assert httpx.get(server.base_url + "/health", trust_env=False).status_code == 200
        pid = server._process.pid
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert b"PDSERVE_PEER_MARK=yes" in environ
        assert os.sched_getaffinity(pid) == {core}


def test_vllm_result_becomes_records_judged_like_ours():
    data = {  # the shape of `vllm bench serve --save-detailed`, 3 requests
        "duration": 2.0, "start_times": [10.0, 10.5, 11.0], "input_lens": [512, 512, 512],
        "output_lens": [4, 4, 0], "ttfts": [0.1, 2.0, 0.0],
        "itls": [[0.01, 0.01, 0.01], [0.2, 0.2, 0.2], []], "latencies": [0.13, 2.6, 0.0],
        "errors": ["", "", "Bad Request"],
    }
    run = records_from_result(data, 8.0, output_len=4)
    ok, slow, failed = run.records
    assert (ok.sent_s, slow.sent_s, failed.sent_s) == (0.0, 0.5, 1.0)
    assert ok.outcome is RequestOutcome.OK and ok.ttft_s == 0.1 and ok.e2e_s == 0.13
    assert ok.num_output_tokens == 4 and ok.itl_s == (0.01, 0.01, 0.01)
    assert failed.outcome is RequestOutcome.SERVER_ERROR and failed.error == "Bad Request"
    from bench.metrics import summarize

    summary = summarize(run, SLOConfig(ttft_s=1.0, tpot_s=0.05))
    assert summary.attainment == pytest.approx(1 / 3)  # slow misses TTFT, failed misses
    assert summary.wall_time_s == 2.0
    with pytest.raises(BenchError, match="save-detailed"):
        records_from_result({"duration": 1.0}, 1.0, 4)


def test_client_flags_map_to_vllm_random_dataset(tmp_path, tiny_model_path):
    client = VllmBenchClient(tokenizer=str(tiny_model_path), input_len=1024, output_len=64,
                             input_range_ratio=0.5, burstiness=0.25, seed=0)
    argv = client.argv("http://127.0.0.1:1", "m", 8.0, 100, tmp_path / "r.json")
    flags = dict(zip(argv, argv[1:]))
    assert json.loads(flags["--random-range-ratio"]) == {"input": 0.5, "output": 0.0}
    assert flags["--request-rate"] == "8" and flags["--burstiness"] == "0.25"
    assert flags["--num-prompts"] == "100" and "--ignore-eos" in argv
    assert flags["--endpoint"] == "/v1/completions"
    with pytest.raises(BenchError):
        VllmBenchClient(tokenizer="t", input_len=1, output_len=1, backend="tgi")


def test_patched_version_reads_the_cpu_wheel():
    # The CPU wheel answers with its local tag, as vLLM's own platform check reads it.
    try:
        expected = importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        try:
            expected = importlib.metadata.version("vllm-cpu") + "+cpu"
        except importlib.metadata.PackageNotFoundError:
            pytest.skip("no vLLM distribution installed")
    original = importlib.metadata.version
    try:
        patch_vllm_version()
        assert importlib.metadata.version("vllm") == expected
        assert importlib.metadata.version("msgspec") == original("msgspec")
    finally:
        importlib.metadata.version = original


def test_cpu_wheel_client_starts_without_target_device(tmp_path):
    # With the version patched to a bare "0.32.0" the CPU wheel could not tell its platform
    # and loaded its AVX-512 kernels: SIGILL on an AVX2-only host. Without
    # VLLM_TARGET_DEVICE, the client must still find the CPU platform.
    try:
        importlib.metadata.version("vllm")
        pytest.skip("the vllm distribution (not the CPU wheel) is installed")
    except importlib.metadata.PackageNotFoundError:
        pass
    env = {k: v for k, v in os.environ.items() if k != "VLLM_TARGET_DEVICE"}
    done = subprocess.run([sys.executable, "-m", "bench.vllm_client", "bench", "serve", "--help"],
                          env=env, capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage: vllm bench serve")


def test_compare_needs_two_targets_and_checks_peer_specs(capsys, tmp_path):
    assert cli.main(["compare", "--target", "http://127.0.0.1:9", "--no-progress"]) == 2
    assert "at least two targets" in capsys.readouterr().err
    assert cli.main(["compare", "--target", "vllm:cores=x", "--target", "vllm",
                     "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pdserve bench: error:") and "Traceback" not in err
    assert cli.main(["compare", "--target", "vllm", "--target", "vllm", "--client", "vllm",
                     "--input-dist", "lognormal", "--no-progress"]) == 2
    assert "--client vllm needs --input-dist" in capsys.readouterr().err


def test_run_with_vllm_client_against_a_fake_server(capsys, tmp_path, fast_server):
    out = tmp_path / "run.json"
    code = cli.main(["run", "--url", fast_server, "--client", "vllm", "--rate", "16",
                     "--num-requests", "6", "--input-len", "32", "--output-len", "4",
                     "--slo-ttft-s", "1", "--slo-tpot-s", "0.5", "--no-progress",
                     "--output-json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    data = json.loads(out.read_text())
    assert len(data["records"]) == 6
    assert all(r["outcome"] == "ok" and r["num_output_tokens"] == 4 for r in data["records"])
    (raw,) = (tmp_path / "vllm-bench").glob("*.json")  # vLLM's own result is kept
    assert json.loads(raw.read_text())["completed"] == 6


def test_compare_of_several_targets_prints_ratios_per_rate(capsys, tmp_path, fast_server):
    out = tmp_path / "cmp"
    code = cli.main(["compare", "--target", f"a={fast_server}", "--target", f"b={fast_server}",
                     "--target", fast_server, "--rates", "8", "16", "--full-sweep",
                     "--bisect-steps", "0", "--num-requests", "8", "--input-len", "32",
                     "--output-len", "4", "--slo-ttft-s", "1", "--slo-tpot-s", "0.5",
                     "--no-progress", "--output-dir", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    data = json.loads((out / "comparison.json").read_text())
    assert [t["label"] for t in data["targets"]] == ["a", "b", fast_server]
    rows = [line.split() for line in printed.splitlines() if line.startswith(("8 ", "16 "))]
    assert [(r[0], r[1]) for r in rows] == [("8", "a"), ("8", "b"), ("8", fast_server),
                                            ("16", "a"), ("16", "b"), ("16", fast_server)]
    for row in rows:  # goodput = met requests / run time, its ratio to the first target
        target = next(t for t in data["targets"] if t["label"] == row[1])
        m = next(m for m in target["measurements"] if m["summary"]["rate_rps"] == float(row[0]))
        s = m["summary"]
        good = s["attainment"] * s["num_sent"] / s["wall_time_s"]
        assert float(row[3]) == pytest.approx(good, rel=0.01)


@pytest.fixture(scope="module")
def slow_server():
    from bench.fake_server import FakeServerThread, FakeTiming

    with FakeServerThread(FakeTiming(ttft_s=0.01, tpot_s=0.03, max_concurrency=8)) as s:
        yield s.url


def test_compare_in_rounds_rotates_targets_and_pools_their_runs(capsys, tmp_path, fast_server,
                                                                slow_server):
    out = tmp_path / "rounds"
    code = cli.main(["compare", "--target", f"fast={fast_server}", "--target", f"slow={slow_server}",
                     "--rounds", "3", "--rates", "8", "16", "--full-sweep", "--bisect-steps", "0",
                     "--num-requests", "6", "--input-len", "32", "--output-len", "4",
                     "--slo-ttft-s", "1", "--slo-tpot-s", "0.02", "--no-progress",
                     "--output-dir", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    data = json.loads((out / "comparison.json").read_text())
    runs = data["rounds"]
    assert len(runs) == 3 * 2 * 2
    # Each round starts the targets in a rotated order: fast leads rounds 1 and 3, slow round 2.
    leaders = {r["round"]: r["label"] for r in runs if r["position"] == 1}
    assert leaders == {1: "fast", 2: "slow", 3: "fast"}
    for target in data["targets"]:
        per_round = [r for r in runs if r["label"] == target["label"]]
        for m in target["measurements"]:  # the pooled run holds every round's requests
            rate = m["summary"]["rate_rps"]
            parts = [r["measurement"]["summary"] for r in per_round
                     if r["measurement"]["summary"]["rate_rps"] == rate]
            assert len(parts) == 3
            assert m["summary"]["num_sent"] == sum(p["num_sent"] for p in parts) == 18
            assert m["summary"]["wall_time_s"] == pytest.approx(sum(p["wall_time_s"] for p in parts))
            met = sum(p["attainment"] * p["num_sent"] for p in parts)
            assert m["summary"]["attainment"] * 18 == pytest.approx(met)
    by_label = {t["label"]: t for t in data["targets"]}
    assert by_label["fast"]["goodput"]["goodput_rps"] == 16  # every request met TPOT 20 ms
    assert by_label["slow"]["goodput"]["goodput_rps"] in (None, 0, 0.0)  # none did
    assert [line.split()[:2] for line in printed.splitlines() if line.startswith("round")] == [
        ["round", "order"]]  # the per-round table is printed


def test_compare_rounds_needs_a_fixed_sweep(capsys, fast_server):
    code = cli.main(["compare", "--target", f"a={fast_server}", "--target", f"b={fast_server}",
                     "--rounds", "2", "--num-requests", "4", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines() == [
        "pdserve bench: error: --rounds needs fixed rates measured in full (--rates ... --full-sweep)"]
