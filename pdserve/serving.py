"""`pdserve serve`: run the Serve application of `serve_app` on a local Ray (started here
when no cluster address is given) or on an existing cluster, until SIGINT/SIGTERM; and
`pdserve scale`: resize a pool of a running application.

This is the same application `serve run deploy/ray/serve.yaml` deploys; only who starts
Ray and Serve differs.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
import time
from typing import Any

from cluster.config import ConfigError, ServeConfig
from cluster.cpu_affinity import pin_front_end
from cluster.engine_host import is_cuda_available

log = logging.getLogger("pdserve")


class ServeStartError(RuntimeError):
    """The application did not start; the message is one line naming the cause."""


def _first_cause(text: str) -> str:
    """The one line of a Serve deploy failure that says why (our replica errors first)."""
    for pattern in (r"ReplicaStartError: (.+)", r"ConfigError: (.+)", r"ChannelError: (.+)",
                    r"\n\s*(\w+Error: .+)"):
        found = re.findall(pattern, text)
        if found:
            return found[-1].strip()
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "unknown error"


def direct_ingress_env(config: ServeConfig) -> dict[str, str]:
    """Ray Serve settings that make the router replicas serve HTTP themselves on
    router.port (one port per router replica from there up), with no proxy hop. They are
    read by Serve's controller and replicas when they start, so they go into the
    environment of the Ray that `pdserve serve` starts; a cluster started by someone else
    sets them at `ray start` (docs/serve.md).

    The two overrides of Serve's defaults are for a host with no load balancer in front:
    a stopping router replica holds on 30 s and its port stays quarantined for minutes so
    that an external balancer (HAProxy, a cloud LB) can deregister it; nothing here needs
    that time, and a replaced router replica must get router.port back at once."""
    first = config.router.port
    return {
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(first),
        # Exclusive: Serve allocates from range(MIN, MAX).
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(first + config.ray.router_replicas),
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
        "RAY_SERVE_PORT_QUARANTINE_S": "0",
    }


def worker_niceness_env(config: ServeConfig, host_cores: list[int]) -> dict[str, str]:
    """Ray starts its workers, and so every engine process they spawn, at nice 15
    (`worker_niceness`). On a CPU host that leaves an engine that has cores of its own
    losing them to any ordinary process that wanders onto them (a client, a log shipper):
    measured here on the small model, one colocated instance's p50 TPOT at 2 req/s was
    59.9 ms at nice 15 and 47.2 ms at nice 0, against plain vLLM's 39.5-44.8 ms (vLLM's
    engine runs at nice 0). So when `pdserve serve` starts Ray on a CPU host and the
    engines' cores leave at least one core to the front end (as
    pdserve.launcher.with_default_cpu_cores does when there are more cores than
    instances), or the front end is pinned (`ray.front_end_cores`) off some engine's
    cores, workers run at nice 0. Where engines must share every core with the front
    end, nice 15 stays: an engine at nice 0 would then starve the router (the issue-10 run
    with `RAY_worker_niceness=0` and engines on both cores lost half its throughput),
    unless every pool renices its engines below the front end (`cpu_nice` > 0): the front
    end then runs at nice 0 above them. A value set by the user is never overridden.
    `config` has its CPU cores assigned."""
    if "RAY_worker_niceness" in os.environ or is_cuda_available():
        return {}
    engine_cores = config.pinned_engine_cores()
    if engine_cores is None:
        return {}  # engines may run anywhere
    front_end = config.ray.front_end_cores
    if engine_cores and set(host_cores) - engine_cores:
        return {"RAY_worker_niceness": "0"}  # the front end has a core without engines
    if front_end is not None and engine_cores - set(front_end):
        return {"RAY_worker_niceness": "0"}  # an engine has a core without the front end
    pools = config.running_pools()
    if pools and all(p.cpu_nice is not None and p.cpu_nice > 0 for p in pools):
        return {"RAY_worker_niceness": "0"}  # every engine has a lower priority of its own
    return {}


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_ray_and_serve(config: ServeConfig, ingress: str = "direct") -> bool:
    """Connect to `ray.address`, or start a local Ray; start Serve. With a local Ray and
    `ingress="direct"` the router replica itself listens on the router's host and port
    (Serve's proxy, which Serve still starts, gets a free port); otherwise Serve's HTTP
    proxy listens there. Returns whether Ray was started here."""
    import ray
    from ray import serve

    started_here = False
    proxy_port: int | None = config.router.port
    if not ray.is_initialized():
        kwargs: dict[str, Any] = dict(namespace=config.ray.namespace, include_dashboard=False,
                                      log_to_driver=True)
        if config.ray.address is None:
            needed = sum(p.num_cpus * p.num_instances for p in config.pools().values())
            kwargs.update(num_cpus=max(os.cpu_count() or 1, int(needed + 0.999)),
                          object_store_memory=config.ray.object_store_memory_bytes)
            started_here = True
            # Ray's processes inherit this environment (the local raylet starts them).
            os.environ.update(worker_niceness_env(config, sorted(os.sched_getaffinity(0))))
            pin_front_end(config.ray.front_end_cores, is_cuda_available())  # and Ray's processes
            if ingress == "direct" and config.router.port != 0:
                # Ray's processes inherit this environment (the local raylet starts them).
                os.environ.update(direct_ingress_env(config))
                proxy_port = None  # chosen once Ray runs (below)
        else:
            kwargs["address"] = config.ray.address
        ray.init(**kwargs)
    elif config.ray.front_end_cores is not None:
        log.warning("ray.front_end_cores ignored: Ray was already running in this process")
    if proxy_port is None:
        # After ray.init: Ray takes free ports of its own as it starts (agents, metrics), and
        # a port probed before could be handed to one of them (seen: the proxy then failed to
        # bind it, so the whole deployment failed to start).
        proxy_port = _free_port(config.router.host)
    serve.start(http_options={"host": config.router.host, "port": proxy_port})
    return started_here


def deploy(config: ServeConfig) -> None:
    """Deploy (or update) the application and wait until every replica is ready."""
    from ray import serve

    from pdserve.serve_app import build_app

    try:
        serve.run(build_app(config), name=config.ray.app_name, route_prefix="/", blocking=False,
                  external_scaler_enabled=True)
    except ConfigError:
        raise
    except Exception as e:  # Serve reports a failed replica constructor with its traceback
        raise ServeStartError(_first_cause(_deployment_messages(config.ray.app_name) or str(e))) from None


def _deployment_messages(app_name: str) -> str:
    """The status messages of the application's deployments (replica tracebacks)."""
    from ray import serve

    try:
        app = serve.status().applications[app_name]
    except Exception:
        return ""
    return "\n".join(d.message for d in app.deployments.values() if d.message)


def serve_forever(config: ServeConfig, ingress: str = "direct") -> None:
    from ray import serve

    from pdserve.launcher import (resolve_model_path, with_default_cpu_cores,
                                  with_default_engine_in_router, with_default_front_end_cores)

    resolve_model_path(config)  # a bad model.path fails here, before Ray starts
    if config.ray.address is None and not is_cuda_available() and not _has_running_ray():
        host_cores = sorted(os.sched_getaffinity(0))
        config = with_default_engine_in_router(with_default_front_end_cores(
            with_default_cpu_cores(config, host_cores), host_cores))
    started_here = start_ray_and_serve(config, ingress)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        t0 = time.monotonic()
        deploy(config)
        if started_here and not is_cuda_available():
            renice_control_plane(config)
        log.info("pdserve ready on http://%s:%d (Ray Serve application %r, %.1f s)",
                 config.router.host, config.router.port, config.ray.app_name, time.monotonic() - t0)
        while not stop.wait(0.5):
            pass
    finally:
        _shutdown(config, started_here)


# Process titles of Ray's and Serve's own processes: the control plane, which does
# periodic work (~12% of a core in all with one tiny engine idle, measured here) and never
# carries a request. Worker processes not yet given an actor are left alone: Ray may hand
# one to a new router or engine replica.
_CONTROL_PLANE_TITLES = ("gcs_server", "/raylet/raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent",
                         "dashboard/agent.py", "runtime_env/agent/main.py", "log_monitor.py",
                         "ray::ServeController", "ray::ProxyActor")


def control_plane_pids(processes: dict[int, str], app_name: str) -> list[int]:
    """Of `processes` (pid -> command line), those of Ray's and Serve's control plane and
    of the application's registry replica."""
    registry = f"ray::ServeReplica:{app_name}:registry"
    return sorted(pid for pid, cmd in processes.items()
                  if cmd.startswith(registry) or any(t in cmd for t in _CONTROL_PLANE_TITLES))


def renice_control_plane(config: ServeConfig) -> None:
    """`ray.control_plane_nice` for the Ray that `pdserve serve` started on a CPU host with
    a pinned front end: the control plane shares the front end's cores with the router and
    the engines' schedulers (vLLM's engine core runs its scheduling there between steps),
    and each of its wake-ups there delays a step."""
    from cluster.cpu_affinity import renice
    from cluster.reaper import descendants

    if config.ray.control_plane_nice is None:
        return
    if config.ray.front_end_cores is None:
        log.info("ray.control_plane_nice not applied: the front end is not pinned (engines "
                 "and front end share every core)")
        return
    processes = {}
    for pid in descendants(os.getpid()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                processes[pid] = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
    pids = control_plane_pids(processes, config.ray.app_name)
    renice(pids, config.ray.control_plane_nice)
    log.info("Ray's control plane (%d processes) at nice %d", len(pids), config.ray.control_plane_nice)


def _has_running_ray() -> bool:
    import ray

    return ray.is_initialized()


def _shutdown(config: ServeConfig, started_here: bool) -> None:
    import ray
    from ray import serve

    try:
        serve.delete(config.ray.app_name, _blocking=True)
    except Exception as e:
        log.warning("could not delete the application: %r", e)
    if started_here:
        serve.shutdown()
        ray.shutdown()


def scale(app_name: str, role: str, num_instances: int, address: str | None, namespace: str,
          timeout_s: float = 900.0) -> dict[str, int]:
    """Resize one pool of a running application in place, through Serve's external-scaler
    API (what the dashboard's POST /api/v1/applications/<app>/deployments/<pool>/scale
    does): only the replica count changes, running replicas keep serving, new ones join
    routing once their engine is ready, removed ones drain. Returns the replica states."""
    import ray
    from ray import serve
    from ray.serve._private.common import DeploymentID
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    if num_instances < 0:
        raise ConfigError("scale: the instance count must be >= 0")
    if not ray.is_initialized():
        ray.init(address=address or "auto", namespace=namespace, log_to_driver=False)
    status = serve.status().applications.get(app_name)
    if status is None:
        raise ConfigError(f"scale: no Serve application named {app_name!r} is running")
    pools = sorted(d for d in status.deployments if d not in ("router", "registry", "relay"))
    if role not in pools:
        where = f"its pools: {', '.join(pools)}" if pools else "it runs no engine deployment"
        if role == "colocated":  # ray.engine_in_router with one instance: the router is it
            where += "; an engine in the router replica (ray.engine_in_router) is not scaled"
        raise ConfigError(f"scale: application {app_name!r} has no {role!r} pool ({where})")
    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    ray.get(controller.update_deployment_replicas.remote(
        DeploymentID(name=role, app_name=app_name), num_instances))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        states = dict(serve.status().applications[app_name].deployments[role].replica_states)
        if states.get("RUNNING", 0) == num_instances and sum(states.values()) == num_instances:
            return states
        time.sleep(0.5)
    raise ServeStartError(f"scale: {role} did not reach {num_instances} running replicas "
                          f"within {timeout_s:.0f} s")
