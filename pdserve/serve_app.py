"""The pdserve Ray Serve application: one builder, used by `serve run`, `serve deploy`,
KubeRay's `serveConfigV2` and `pdserve serve` alike.

    serve run deploy/ray/serve.yaml                   # import_path: pdserve.serve_app:build_app
    serve run pdserve.serve_app:build_app config=plan.yaml

Deployments (one Serve application)::

    router (ingress, FastAPI)  ──discovers──▶ registry ◀──publish/heartbeat── prefill, decode
         │                                                                   (or colocated)
         └─────────── worker channels (cluster/channel.py), one TCP connection per pair ──┘

With `ray.stream_relay` a relay deployment is the ingress instead and streams each request
from a router replica's own server (pdserve/stream_relay.py).

The router routes with pdserve's own policies over the worker channels; Serve places,
health-checks, replaces and resizes the replicas, and carries nothing per request or per
token (docs/serve.md explains why routing is not a Serve request router).
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import uvicorn
from ray import serve

from cluster.config import ConfigError, ServeConfig, load_config
from pdserve import placement
from pdserve.registry import Registry
from pdserve.replicas import EngineReplica, RouterIngress, config_error_line, node_identity
from pdserve.stream_relay import (Relay, RouterChooser, http_forward, relay_client,
                                  serve_router_asker)


def listen_with_reuse_address() -> None:
    """In this (router replica) process: Serve's direct-ingress server binds router.port
    with SO_REUSEADDR, as uvicorn and Serve's own proxy do.

    Ray Serve 2.60 creates a direct-ingress replica's listening socket without it
    (`replica.py` passes `enable_so_reuseport=False` to `http_util.start_asgi_http_server`).
    When a router replica dies with clients connected (a SIGKILL under load), the kernel
    keeps its accepted sockets on router.port in FIN-WAIT-2 until the clients close them,
    so the replacement's bind fails with EADDRINUSE; Serve then blocks that port for good
    (`block_port=True`), and with pdserve's one-port range every later replacement gets
    `NoAvailablePortError`: the endpoint never came back in the real-engine fault run
    (bench/results/faults-cpu-2core). SO_REUSEADDR still refuses a port a live listener
    holds; SO_REUSEPORT (which would let two live listeners share it) stays off."""
    import socket

    from ray.serve._private import http_util, replica

    if getattr(replica.start_asgi_http_server, "_pdserve_reuse_address", False):
        return
    start = replica.start_asgi_http_server

    def reuse_address_only(sock: socket.socket) -> bool:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        return True

    async def start_with_reuse_address(app, options, *args, **kwargs):
        kwargs["enable_so_reuseport"] = True  # routes to http_util.set_socket_reuse_port
        return await start(app, options, *args, **kwargs)

    start_with_reuse_address._pdserve_reuse_address = True  # type: ignore[attr-defined]
    http_util.set_socket_reuse_port = reuse_address_only
    replica.start_asgi_http_server = start_with_reuse_address


class RegistryDeployment:
    """The registry as a Serve deployment (one replica, no CPU); its methods run on the
    replica's event loop, one at a time."""

    def __init__(self) -> None:
        self._registry = Registry()

    async def publish(self, entry) -> None:
        self._registry.publish(entry)

    async def withdraw(self, instance_id: str) -> None:
        self._registry.withdraw(instance_id)

    async def snapshot(self):
        return self._registry.snapshot()


class EngineDeployment(EngineReplica):
    async def __init__(self, role: str, settings: dict[str, Any], registry: Any):
        EngineReplica.__init__(self, role, settings, registry)
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise

    async def __del__(self):
        await self.stop()


class _RouterReplica(RouterIngress):
    """What both router deployments do as they start and stop: the router, and the
    re-planning loop (config `replan`: off unless enabled, observe-only unless told
    otherwise) that sizes this application's pools from the router's live traffic."""

    async def _begin(self, settings: dict[str, Any], registry: Any, worker_factory: str | None) -> None:
        from pdserve.replanner import ServeActuator, replan_task

        RouterIngress.__init__(self, settings, registry, worker_factory)
        self.replan = None
        await self.start()
        self.replan = replan_task(self.config, self.deps, ServeActuator(self.config.ray.app_name))
        if self.replan is not None:
            self.replan.start()

    async def _end(self) -> None:
        if self.replan is not None:
            await self.replan.stop()
        await self.stop()


@serve.ingress()
class RouterDeployment(_RouterReplica):
    """The router as the application's HTTP ingress (without `ray.stream_relay`)."""

    async def __init__(self, settings: dict[str, Any], registry: Any, *engines: Any,
                       worker_factory: str | None = None):
        listen_with_reuse_address()  # before Serve starts this replica's server
        await self._begin(settings, registry, worker_factory)

    async def __serve_build_asgi_app__(self):
        return self.build_app()

    async def __del__(self):
        await self._end()
        # Serve's ASGI wrapper (next in the MRO) runs the app's lifespan shutdown.
        parent = getattr(super(), "__del__", None)
        if parent is not None:
            await parent()


class RelayedRouterDeployment(_RouterReplica):
    """The router behind the stream relay (`ray.stream_relay`). A Serve application has
    one HTTP ingress, the relay; this replica serves the relayed requests on a server of
    its own, on the node's address and a free port, which `address` names (the relay
    learns the replicas' addresses through Serve, then streams over HTTP: no Ray call per
    request or per token)."""

    async def __init__(self, settings: dict[str, Any], registry: Any, *engines: Any,
                       worker_factory: str | None = None):
        await self._begin(settings, registry, worker_factory)
        self._server = _QuietServer(uvicorn.Config(
            self.build_app(), host=node_identity()[1], port=0, lifespan="on",
            log_level="warning", access_log=False))
        self._serving = asyncio.get_running_loop().create_task(self._server.serve())
        while not self._server.started:
            if self._serving.done():
                await self._serving
                raise RuntimeError("the router replica's server did not start")
            await asyncio.sleep(0.01)
        host, port = self._server.servers[0].sockets[0].getsockname()[:2]
        self._address = f"http://{host}:{port}"

    async def address(self) -> str:
        return self._address

    async def __del__(self):
        self._server.should_exit = True
        await self._serving
        await self._end()


class _QuietServer(uvicorn.Server):
    """uvicorn in a Serve replica: Ray's signal handlers stay (uvicorn would take SIGINT
    and SIGTERM on the main thread)."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


@serve.ingress()
class RelayDeployment:
    """The stream relay (pdserve/stream_relay.py): holds the client connections and
    streams each request from a router replica's own server."""

    def __init__(self, router: Any, max_body_bytes: int, num_routers: int):
        from ray.util.metrics import Counter

        listen_with_reuse_address()  # it takes router.port, as the router replica would
        # Exported through Ray's metrics endpoint (the relay has no /metrics of its own).
        outcomes = Counter("pdserve_relay_requests_total",
                           "Requests through the stream relay, by how they ended",
                           tag_keys=("outcome",))
        self._client = relay_client()
        routers = RouterChooser(serve_router_asker(router), expected=num_routers)
        self._relay = Relay(http_forward(self._client, routers),
                            max_body_bytes=max_body_bytes,
                            on_outcome=lambda outcome: outcomes.inc(tags={"outcome": outcome.value}))

    async def __serve_build_asgi_app__(self):
        return self._relay

    async def __del__(self):
        await self._client.aclose()
        parent = getattr(super(), "__del__", None)  # Serve's ASGI wrapper: lifespan shutdown
        if parent is not None:
            await parent()


def parse_args(args: Any) -> ServeConfig:
    """The application arguments: a pdserve config mapping, or {config: <path>} (what
    `serve run pdserve.serve_app:build_app config=plan.yaml` passes), optionally with
    overrides beside it. Raises ConfigError with one line naming the field."""
    if isinstance(args, ServeConfig):
        return args
    data = dict(args or {})
    path = data.pop("config", None)
    try:
        config = load_config(Path(path) if path else None, data)
    except ConfigError as e:
        raise ConfigError(config_error_line(e)) from None
    if config.mode == "auto":
        raise ConfigError("mode auto is planned by `pdserve serve` on the host it starts; for "
                          "Serve's own tools write the plan first (`pdserve serve --mode auto "
                          "--print-config > plan.yaml`) and deploy that")
    return config


def build_app(args: dict[str, Any]) -> serve.Application:
    """Serve's application builder: the application of one pdserve config (the module
    docstring says how it is deployed)."""
    return build_application(parse_args(args))


def build_application(config: ServeConfig, *, worker_factory: str | None = None) -> serve.Application:
    """The application of `config`; `worker_factory` ("module:function") replaces the
    engine workers, for tests."""
    registry = serve.deployment(RegistryDeployment, **placement.registry_deployment_options()).bind()
    engines = {}
    # The secret of KV transfers and worker channels is resolved by every replica itself
    # (kv_transfer.secret, else PDSERVE_KV_SECRET, else this host's generated one), never
    # drawn here: a secret in the replicas' arguments that changed per build would make
    # Serve restart every replica on a redeploy that only resizes a pool.
    for role, pool in placement.replica_pools(config).items():
        settings = dict(model=config.model.model_dump(mode="python"),
                        pool=placement.replica_pool(pool),
                        kv_transfer=config.kv_transfer.model_dump(mode="python"),
                        drain_timeout_s=config.ray.drain_timeout_s, worker_factory=worker_factory)
        options = placement.engine_deployment_options(config, role)
        engines[role] = serve.deployment(EngineDeployment, **options).bind(role, settings, registry)
    router = serve.deployment(RelayedRouterDeployment if config.ray.stream_relay else RouterDeployment,
                              **placement.ingress_deployment_options(config))
    # The engine deployments are bound as (unused) arguments so that they belong to this
    # application; the router reaches them through the registry and their channels.
    router_app = router.bind(placement.count_free(config), registry, *engines.values(),
                             worker_factory=worker_factory)
    if not config.ray.stream_relay:
        return router_app
    relay = serve.deployment(RelayDeployment, **placement.relay_deployment_options(config))
    return relay.bind(router_app, config.router.max_request_body_bytes, config.ray.router_replicas)
