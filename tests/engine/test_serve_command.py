"""`pdserve serve` as a user runs it: Ray actors, the embedded model, the OpenAI client, curl."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from kvtransfer.staging import POOL_PREFIX
from tests.net import free_port

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    pytest.importorskip("vllm")
    pytest.importorskip("ray")
    tmp = tmp_path_factory.mktemp("serve")
    staging = tmp / "staging"
    staging.mkdir()
    port = free_port()
    config = tmp / "pdserve.yaml"
    config.write_text(yaml.safe_dump({"kv_transfer": {"staging_dir": str(staging)},
                                      "router": {"port": port}}))
    log = open(tmp / "serve.log", "w")
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "pdserve.cli", "serve", "--config", str(config)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 420
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"pdserve serve exited with {proc.returncode}:\n"
                            + (tmp / "serve.log").read_text()[-3000:])
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            pytest.fail("pdserve serve did not become healthy in 420 s")
        ready_s = time.monotonic() - started
        t0 = time.monotonic()
        httpx.post(f"{url}/v1/completions", json={"model": "pdserve-tiny", "prompt": "hi",
                                                   "max_tokens": 4}, timeout=60).raise_for_status()
        first_request_s = time.monotonic() - t0
        print(f"\ncold start: healthy after {ready_s:.1f} s, first request {first_request_s * 1000:.0f} ms")
        yield url, staging
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_openai_client_streamed_and_plain(served):
    from openai import OpenAI

    url, _ = served
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    [model] = [m.id for m in client.models.list().data]
    assert model == "pdserve-tiny"
    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hello!"}], max_tokens=8, temperature=0)
    assert 1 <= chat.usage.completion_tokens <= 8
    assert chat.choices[0].finish_reason in ("stop", "length")
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hello!"}], max_tokens=8, temperature=0,
        stream=True, stream_options={"include_usage": True})
    pieces, usage = [], None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        if chunk.usage:
            usage = chunk.usage
    assert "".join(pieces) == chat.choices[0].message.content
    assert usage.completion_tokens == chat.usage.completion_tokens
    completion = client.completions.create(model=model, prompt="Once upon a time", max_tokens=6)
    assert completion.usage.completion_tokens == 6


def test_curl(served):
    url, _ = served
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    out = subprocess.run([curl, "-sS", f"{url}/v1/chat/completions", "-H", "Content-Type: application/json",
                          "-d", json.dumps({"model": "pdserve-tiny", "max_tokens": 5,
                                            "messages": [{"role": "user", "content": "hi"}]})],
                         capture_output=True, text=True, timeout=60, check=True)
    body = json.loads(out.stdout)
    assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] >= 1
    metrics = subprocess.run([curl, "-sS", f"{url}/metrics"], capture_output=True, text=True,
                             timeout=30, check=True).stdout
    assert 'pdserve_requests_served_total{served_by="transferred"}' in metrics


def test_staging_area_is_clean_after_traffic(served):
    url, staging = served
    for _ in range(3):
        httpx.post(f"{url}/v1/completions", json={"model": "pdserve-tiny", "prompt": "abc " * 50,
                                                   "max_tokens": 3}, timeout=60).raise_for_status()
    # No staged KV is left; consumed segment files wait in the prefill's pool for reuse.
    leftovers = [p.name for p in Path(staging).iterdir() if not p.name.startswith(POOL_PREFIX)]
    assert leftovers == []
    (pool,) = Path(staging).glob(f"{POOL_PREFIX}*")
    pooled = [p for p in pool.iterdir() if p.name != "owner"]
    assert pooled, "consumed segments should be recycled into the producer's pool"
