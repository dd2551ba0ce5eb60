"""vLLM's own benchmark client, `vllm bench serve`, against a running `pdserve serve`.

A client nobody here wrote: one colocated instance of the embedded tiny model (Ray, the
launcher, the worker channel, the router), driven by `python -m bench.vllm_client bench
serve` (the `vllm` console script of the CPU wheel cannot start, see bench/vllm_client.py)
with its random dataset through both OpenAI backends. Every request must complete with
exactly the asked-for number of tokens.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from bench.deployment import ServerProcess, default_serve_command, free_port

pytestmark = pytest.mark.engine

NUM_PROMPTS = 6
INPUT_LEN = 96
OUTPUT_LEN = 12


@pytest.fixture(scope="module")
def pdserve_url(tmp_path_factory):
    pytest.importorskip("vllm")
    pytest.importorskip("ray")
    tmp = tmp_path_factory.mktemp("vllm-bench")
    config = tmp / "colocated-1.yaml"
    config.write_text(yaml.safe_dump({
        "mode": "colocated", "model": {"embedded": "tiny"},
        "colocated": {"num_instances": 1, "kv_cache_gib": 1},
    }))
    server = ServerProcess(config, free_port(), tmp / "serve.log",
                           serve_command=default_serve_command(), health_timeout_s=420)
    with server:
        yield server.base_url, tmp


@pytest.mark.parametrize("backend,endpoint", [("openai", "/v1/completions"),
                                              ("openai-chat", "/v1/chat/completions")])
def test_vllm_bench_serve_completes_every_request(pdserve_url, backend, endpoint):
    from cluster.tiny_model import ensure_tiny_model

    url, tmp = pdserve_url
    tiny_model_path = ensure_tiny_model("tiny")
    result = tmp / f"{backend}.json"
    argv = [sys.executable, "-m", "bench.vllm_client", "bench", "serve",
            "--backend", backend, "--endpoint", endpoint, "--base-url", url,
            "--model", "pdserve-tiny", "--tokenizer", str(tiny_model_path),
            "--dataset-name", "random", "--random-input-len", str(INPUT_LEN),
            "--random-output-len", str(OUTPUT_LEN), "--random-range-ratio", "0",
            "--ignore-eos", "--num-prompts", str(NUM_PROMPTS), "--request-rate", "inf",
            "--seed", "0", "--disable-tqdm", "--save-result", "--save-detailed",
            "--result-dir", str(tmp), "--result-filename", result.name]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads(result.read_text())
    assert data["completed"] == NUM_PROMPTS, data.get("errors")
    assert data.get("failed", 0) == 0
    assert not any(data["errors"])
    assert data["output_lens"] == [OUTPUT_LEN] * NUM_PROMPTS  # ignore_eos honoured
    assert data["total_output_tokens"] == NUM_PROMPTS * OUTPUT_LEN
    assert all(t > 0 for t in data["ttfts"])
    assert all(len(itl) >= 1 for itl in data["itls"])  # streamed, not one final chunk
