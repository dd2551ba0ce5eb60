"""How HTTP reaches the router (no Ray started): the direct-ingress settings `pdserve serve`
gives the Ray it starts, and the router deployment's own event-loop setting."""

from __future__ import annotations

from cluster.config import ServeConfig
from pdserve.placement import INGRESS_ENV_VARS, engine_deployment_options, ingress_deployment_options
from pdserve.serving import direct_ingress_env


def test_direct_ingress_gives_each_router_replica_a_port_from_router_port_up():
    config = ServeConfig.model_validate({"router": {"port": 8123}, "ray": {"router_replicas": 3}})
    env = direct_ingress_env(config)
    assert env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"
    # Serve allocates replica ports from range(MIN, MAX): 8123, 8124, 8125.
    first, end = int(env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"]), int(env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"])
    assert list(range(first, end)) == [8123, 8124, 8125]
    # One host, no load balancer in front: a stopping or replaced router replica neither
    # holds on for a balancer to deregister it nor loses its port to quarantine.
    assert env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "0"
    assert env["RAY_SERVE_PORT_QUARANTINE_S"] == "0"


def test_only_the_router_replicas_run_user_code_on_the_replica_loop():
    config = ServeConfig()
    router = ingress_deployment_options(config)["ray_actor_options"]
    assert router["runtime_env"]["env_vars"] == INGRESS_ENV_VARS
    assert INGRESS_ENV_VARS == {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}
    for role in ("prefill", "decode"):
        assert "runtime_env" not in engine_deployment_options(config, role)["ray_actor_options"]
