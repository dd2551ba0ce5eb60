"""`ray.engine_in_router`: the router replica is one colocated instance, in its own process.

The options are pure functions of the config (no Ray); the live test runs the Serve
application on a real Ray + Serve with a fake engine in the router replica and shows that
it serves, reports its instance and is the only colocated instance there is."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import pytest

from cluster.config import ConfigError, ServeConfig, load_config
from pdserve.placement import (INGRESS_ENV_VARS, count_free, engine_deployment_options,
                               ingress_deployment_options, relay_deployment_options, replica_pools)
from tests.net import free_port

ROOT = Path(__file__).resolve().parents[2]


def _config(num_instances: int, **ray) -> ServeConfig:
    return ServeConfig.model_validate({
        "mode": "colocated", "ray": {"engine_in_router": True, **ray},
        "colocated": {"num_instances": num_instances, "num_cpus": 1,
                      "cpu_cores": [[i + 1] for i in range(num_instances)]}})


def test_the_router_takes_the_first_instance_and_its_resources():
    config = _config(3)
    router = ingress_deployment_options(config)
    assert router["num_replicas"] == 1
    assert router["ray_actor_options"]["num_cpus"] == 1
    assert router["ray_actor_options"]["runtime_env"]["env_vars"] == INGRESS_ENV_VARS
    assert router["placement_group_bundles"] == [{"CPU": 1.0}]
    # The engine replicas are the other two, on the other cores; the relay takes no engine.
    rest = replica_pools(config)["colocated"]
    assert rest.num_instances == 2 and rest.cpu_cores == [[2], [3]]
    assert engine_deployment_options(config, "colocated")["num_replicas"] == 2
    assert relay_deployment_options(config)["ray_actor_options"]["num_cpus"] == 0
    assert count_free(config)["colocated"]["cpu_cores"] == [[1]]  # the router's own instance


def test_one_instance_leaves_no_engine_deployment():
    assert replica_pools(_config(1)) == {}
    plain = ServeConfig.model_validate({"mode": "colocated"})
    assert ingress_deployment_options(plain)["ray_actor_options"]["num_cpus"] == 0
    assert "placement_group_bundles" not in ingress_deployment_options(plain)


@pytest.mark.parametrize("overrides, field", [
    ({"ray": {"engine_in_router": True}}, "mode colocated"),
    ({"mode": "colocated", "ray": {"engine_in_router": True, "router_replicas": 2}}, "router_replicas 1"),
])
def test_layouts_it_cannot_run_are_refused(overrides, field):
    with pytest.raises(ConfigError, match=field):
        load_config(None, overrides)


def test_the_router_replica_serves_with_its_own_engine():
    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")
    from pdserve.serve_app import build_application, parse_args

    app = "pdserve-in-router"
    port = free_port()
    ray.init(num_cpus=4, include_dashboard=False, namespace="pdserve-test", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "PDSERVE_FAKE_TOKEN_DELAY_S": "0.005"}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = {"mode": "colocated", "colocated": {"num_instances": 1, "num_cpus": 1},
                  "router": {"stats_interval_s": 0.1}, "ray": {"app_name": app, "engine_in_router": True}}
        serve.run(build_application(parse_args(config), worker_factory="tests.serve.fake_workers:make_worker"),
                  name=app, route_prefix="/", external_scaler_enabled=True)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while httpx.get(f"{url}/health", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, "no /health 200 in 60 s"
            time.sleep(0.5)
        # Serve runs the router and the registry, and no engine deployment.
        assert set(serve.status().applications[app].deployments) == {"router", "registry"}
        body = {"model": "pdserve-tiny", "prompt": "hello", "max_tokens": 8, "temperature": 0,
                "ignore_eos": True}
        plain = httpx.post(f"{url}/v1/completions", json=body, timeout=30).json()
        assert plain["usage"]["completion_tokens"] == 8
        with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=30) as r:
            events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == plain["choices"][0]["text"]
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        instances = re.findall(r'pdserve_instance_running_requests\{instance_id="([^"]+)",role="colocated"\}',
                               metrics)
        # One colocated instance, the router replica's own, which the registry does not list.
        assert len(instances) == 1 and instances[0].startswith("colocated-"), instances
        assert serve.get_deployment_handle("registry", app_name=app).snapshot.remote().result() == []
        assert 'pdserve_requests_served_total{served_by="colocated"} 2.0' in metrics
    finally:
        serve.shutdown()
        ray.shutdown()
