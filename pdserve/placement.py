"""Ray Serve deployment options for each pool: placement groups, node choice, health, drain.

Pure functions of the config (no Ray import), so the YAMLs' meaning is testable without a
cluster. One replica is one engine instance; its placement group has one bundle per
tensor/pipeline-parallel worker, packed on one node (`placement.bundle_strategy`); the
replica actor itself runs in the first bundle, which also carries the pool's node
resources (that is how `placement.affinity` is enacted) and every bundle its node labels.
"""

from __future__ import annotations

from typing import Any

from cluster.config import PoolConfig, ServeConfig

# Headroom Serve gives a replica's __del__ beyond our own drain bound (engine shutdown).
_SHUTDOWN_MARGIN_S = 30.0


def instance_bundles(pool: PoolConfig) -> list[dict[str, float]]:
    """One bundle per TP x PP worker; the instance's CPUs and GPUs split evenly among them."""
    n = pool.tensor_parallel_size * pool.pipeline_parallel_size
    bundles: list[dict[str, float]] = []
    for i in range(n):
        bundle: dict[str, float] = {"CPU": pool.num_cpus / n}
        if pool.num_gpus:
            bundle["GPU"] = pool.num_gpus / n
        if i == 0:
            bundle.update(pool.node_resources)
        bundles.append(bundle)
    return bundles


def replica_pools(config: ServeConfig) -> dict[str, PoolConfig]:
    """The pools that run as engine replicas, by role. With `ray.engine_in_router` the
    router replica is the first colocated instance (with its cores), so the colocated
    deployment runs the others; a pool left without instances has no deployment."""
    pools: dict[str, PoolConfig] = dict(config.pools())
    if config.ray.engine_in_router:
        c = pools.pop("colocated")
        if c.num_instances > 1:
            pools["colocated"] = c.model_copy(update={
                "num_instances": c.num_instances - 1,
                "cpu_cores": c.cpu_cores[1:] if c.cpu_cores is not None else None})
    return pools


def _instance_options(config: ServeConfig, pool: PoolConfig) -> dict[str, Any]:
    """What a replica that runs one engine instance of `pool` needs: its placement group,
    resources, health check timeout and a shutdown bound with room for the engine."""
    bundles = instance_bundles(pool)
    options: dict[str, Any] = dict(
        health_check_timeout_s=config.ray.health_check_timeout_s,
        graceful_shutdown_timeout_s=config.ray.drain_timeout_s + _SHUTDOWN_MARGIN_S,
        placement_group_bundles=bundles,
        placement_group_strategy=config.placement.bundle_strategy,
        ray_actor_options=dict(num_cpus=bundles[0]["CPU"], num_gpus=bundles[0].get("GPU", 0.0),
                               resources=dict(pool.node_resources)),
    )
    if pool.node_labels:
        options["placement_group_bundle_label_selector"] = [dict(pool.node_labels)] * len(bundles)
    return options


def engine_deployment_options(config: ServeConfig, role: str) -> dict[str, Any]:
    """`serve.deployment(...)` options of one pool's deployment."""
    pool = replica_pools(config)[role]
    return dict(
        name=role,
        num_replicas=pool.num_instances,
        # Requests travel over the worker channel, not through Serve: Serve only ever calls
        # health checks, so its queue bound is irrelevant to serving.
        max_ongoing_requests=16,
        health_check_period_s=config.ray.health_check_period_s,
        graceful_shutdown_wait_loop_s=0.5,
        **_instance_options(config, pool),
    )


# The router replica runs the router on the replica's own event loop, where Serve receives
# the request (HTTP in direct-ingress mode, the proxy's call otherwise), instead of Serve's
# default second thread with its own loop: that default hands every ASGI message of a
# response across the two loops (measured: 1.9 -> 1.4 ms p50 TTFT with fake workers,
# docs/serve.md). Set per replica process, so the engine replicas keep Serve's default.
INGRESS_ENV_VARS = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}


def _front_options(config: ServeConfig, name: str) -> dict[str, Any]:
    return dict(
        name=name,
        num_replicas=config.ray.router_replicas,
        max_ongoing_requests=config.router.max_pending_requests,
        graceful_shutdown_wait_loop_s=0.5,
        graceful_shutdown_timeout_s=config.ray.drain_timeout_s,
        health_check_period_s=config.ray.health_check_period_s,
        ray_actor_options=dict(num_cpus=0, runtime_env={"env_vars": dict(INGRESS_ENV_VARS)}),
    )


def ingress_deployment_options(config: ServeConfig) -> dict[str, Any]:
    """The router's options; with `ray.engine_in_router` it is also a colocated instance
    and takes that instance's placement and resources (and its engine's shutdown margin)."""
    options = _front_options(config, "router")
    if config.ray.engine_in_router:
        engine = _instance_options(config, config.colocated)
        engine["ray_actor_options"]["runtime_env"] = options["ray_actor_options"]["runtime_env"]
        options.update(engine)
    return options


def relay_deployment_options(config: ServeConfig) -> dict[str, Any]:
    """The stream relay (config ray.stream_relay) takes the ingress's place: HTTP on
    router.port, as many replicas as the router, the same limits; it holds no state and no
    engine."""
    return _front_options(config, "relay")


def registry_deployment_options() -> dict[str, Any]:
    # Heartbeats and discovery polls are several calls a second: no access log line each.
    return dict(name="registry", num_replicas=1, max_ongoing_requests=1000,
                ray_actor_options=dict(num_cpus=0), logging_config={"enable_access_log": False})


def replica_pool(pool: PoolConfig) -> dict[str, Any]:
    """A pool's settings as one replica needs them: everything but the instance count, so
    that a new count (scale up or down) leaves the replicas' arguments, and so the running
    replicas, unchanged. Pinned cores stay, one list per replica rank."""
    data = pool.model_dump(mode="python")
    data["num_instances"] = len(pool.cpu_cores) if pool.cpu_cores is not None else 1
    return data


def count_free(config: ServeConfig) -> dict[str, Any]:
    """The whole config without pool sizes (what the router ingress is built from). Python
    mode keeps secrets as SecretStr (JSON mode would mask them)."""
    data = config.model_dump(mode="python")
    for role in ("prefill", "decode", "colocated"):
        data[role]["num_instances"] = 1
        data[role]["cpu_cores"] = None
    if config.ray.engine_in_router and config.colocated.cpu_cores is not None:
        data["colocated"]["cpu_cores"] = config.colocated.cpu_cores[:1]  # its own instance's
    return data
