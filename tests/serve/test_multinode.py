"""pdserve on a multi-node Ray cluster on this machine (ray.cluster_utils.Cluster), deployed
with `serve run deploy/ray/serve.yaml` against RAY_ADDRESS: one prefill and one decode
replica on different nodes (the YAML's node resources), the official OpenAI client streamed
and plain, greedy output identical to colocated serving, and the KV crossing the nodes over
TCP (trace + pdserve_kv_transfers_total). Real engines: three in all (prefill, decode, then
one colocated), one cluster for the module.

Both Ray nodes here share one host and so one /dev/shm, where `transport: auto` rightly
picks shared memory (kvtransfer identifies a node by host). The deployment therefore sets
`transport: tcp` so that KV takes the path it takes between hosts: the producer node's
transfer server, a TCP connection, the consumer's staging."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.net import free_port

pytestmark = pytest.mark.engine

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["The capital of France is", "Once upon a time, in a land far away,",
           "1, 2, 3, 4, 5,"]


def _serve_run(config: dict, tmp: Path, address: str, name: str) -> None:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "RAY_ADDRESS": address}
    out = subprocess.run([str(Path(sys.executable).with_name("serve")), "run", "--non-blocking",
                          str(path)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def _wait_healthy(url: str, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError(f"{url} did not become healthy")


def _greedy(url: str) -> list[list[int]]:
    outs = []
    for prompt in PROMPTS:
        r = httpx.post(f"{url}/v1/completions", timeout=120, json={
            "model": "pdserve-tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True})
        r.raise_for_status()
        outs.append(r.json()["choices"][0]["token_ids"])
    return outs


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    pytest.importorskip("vllm")
    from ray.cluster_utils import Cluster

    tmp = tmp_path_factory.mktemp("multinode")
    # Head: Serve's controller and proxy, the registry and the router (no engine CPU).
    c = Cluster(initialize_head=True, connect=True,
                head_node_args=dict(num_cpus=1, include_dashboard=False))
    nodes = {"prefill": c.add_node(num_cpus=1, resources={"pdserve_prefill_node": 1}),
             "decode": c.add_node(num_cpus=1, resources={"pdserve_decode_node": 1})}
    c.wait_for_nodes()
    try:
        yield c, nodes, tmp
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            c.shutdown()


def _yaml_config(port: int, staging: Path, **args_update) -> dict:
    config = yaml.safe_load((ROOT / "deploy/ray/serve.yaml").read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    [app] = config["applications"]
    args = app["args"]
    args["kv_transfer"] = {**args.get("kv_transfer", {}), "transport": "tcp",
                           "staging_dir": str(staging)}
    args.update(args_update)
    return config


@pytest.fixture(scope="module")
def deployments(cluster):
    """The YAML's disaggregated application, then (for comparison) a colocated one."""
    c, nodes, tmp = cluster
    staging = tmp / "staging"
    staging.mkdir()
    port = free_port()
    _serve_run(_yaml_config(port, staging), tmp, c.address, "pd")
    url = f"http://127.0.0.1:{port}"
    _wait_healthy(url)
    return url, nodes, staging


def _entries() -> dict:
    entries = serve.get_deployment_handle("registry", app_name="pdserve").snapshot.remote().result()
    return {e.role: e for e in entries}


def test_prefill_and_decode_run_on_the_nodes_the_yaml_names(deployments):
    _, nodes, _ = deployments
    by_role = _entries()
    assert by_role["prefill"].node_id == nodes["prefill"].node_id
    assert by_role["decode"].node_id == nodes["decode"].node_id


def test_openai_client_streamed_and_plain_with_kv_over_tcp(deployments):
    from openai import OpenAI

    url, _, _ = deployments
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    plain = client.chat.completions.create(
        model="pdserve-tiny", messages=[{"role": "user", "content": "Hello!"}], max_tokens=8,
        temperature=0)
    assert 1 <= plain.usage.completion_tokens <= 8
    stream = client.chat.completions.create(
        model="pdserve-tiny", messages=[{"role": "user", "content": "Hello!"}], max_tokens=8,
        temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == plain.choices[0].message.content
    trace = httpx.get(f"{url}/v1/requests/{plain.id}/trace", timeout=10).json()
    by_role = _entries()
    assert trace["served_by"] == "transferred"
    assert trace["prefill_instance"] == by_role["prefill"].instance_id
    assert trace["decode_instance"] == by_role["decode"].instance_id
    assert by_role["prefill"].node_id != by_role["decode"].node_id  # the KV crossed nodes


def _counter(metrics_text: str, name: str, **labels: str) -> float:
    """A counter sample by its labels, whatever order the exposition writes them in
    (prometheus_client writes them sorted by name; a regex on one order found nothing)."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for family in text_string_to_metric_families(metrics_text)
               for s in family.samples if s.name == name and labels.items() <= s.labels.items())


def test_kv_transfer_counter_shows_tcp(deployments):
    url, _, _ = deployments
    # Transfer records reach the router with the next stats poll.
    deadline = time.monotonic() + 10
    while True:
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        fetched = _counter(metrics, "pdserve_kv_transfers_total", transport="tcp",
                           direction="fetch", outcome="ok")
        if fetched >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    kv_lines = [ln for ln in metrics.splitlines() if ln.startswith("pdserve_kv_transfers_total")]
    assert fetched >= 2, "\n".join(kv_lines) or "no KV transfer counted"
    # Nothing went over shared memory between the nodes' processes.
    assert _counter(metrics, "pdserve_kv_transfers_total", transport="shm", direction="fetch") == 0


def test_greedy_output_identical_to_colocated(deployments, cluster):
    url, _, staging = deployments
    disaggregated = _greedy(url)
    c, _, tmp = cluster
    serve.delete("pdserve")
    port = int(url.rsplit(":", 1)[1])  # Serve's proxy keeps the port it started with
    # The colocated instance on the prefill node (its resource), same model and seed.
    config = _yaml_config(port, staging, mode="colocated",
                          colocated={"num_instances": 1, "num_cpus": 1,
                                     "node_resources": {"pdserve_prefill_node": 0.01}},
                          placement={"affinity": "any"})
    _serve_run(config, tmp, c.address, "colocated")
    colocated_url = f"http://127.0.0.1:{port}"
    _wait_healthy(colocated_url)
    assert _greedy(colocated_url) == disaggregated
