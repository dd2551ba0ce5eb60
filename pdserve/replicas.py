"""The replica classes of the pdserve Serve application (plain classes; serve_app wraps them).

(About 500 lines: the two replica kinds and the membership protocol they share with
the registry; `placement.py`, `registry.py` and `serve_app.py` hold the rest.)

- `EngineReplica`: one engine instance of one pool (prefill, decode or colocated). It owns a
  plain worker (`PrefillWorker` / `DecodeWorker`), serves it over a worker channel on its
  node's IP, and publishes itself to the registry once the engine is ready. Serve health
  checks ask the engine itself; on removal the replica drains.
- `RouterIngress`: the router's FastAPI app as the Serve ingress. It discovers engine
  replicas from the registry and routes with pdserve's own policies over the channels;
  with `ray.engine_in_router` it also runs one colocated instance in its own process.

Engine replica lifecycle (what the registry and so the routers see)::

    constructing (engine starting; invisible) ──ready──▶ LIVE (published, heartbeats)
    LIVE ──Serve stops it (scale-down, redeploy)──▶ DRAINING: routers stop sending it
        requests; it finishes those it holds (and, on prefill, until its staged KV is
        claimed) up to ray.drain_timeout_s ──▶ withdrawn, engine shut down
    LIVE ──process dies──▶ heartbeats stop: routers see the channel fail at once and the
        entry expire; Serve's health check fails and Serve starts a replacement
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

from cluster.config import ConfigError, KVTransferSettings, ModelConfig, PoolConfig, ServeConfig
from cluster.tiny_model import ensure_tiny_model
from pdserve.registry import ENTRY_TTL_S, HEARTBEAT_INTERVAL_S, ReplicaEntry

log = logging.getLogger("pdserve")

DISCOVERY_INTERVAL_S = 0.5
# A draining replica waits this long before counting its requests, so that every router
# has seen the draining flag (one discovery interval plus the registry's round trip).
DRAIN_NOTICE_S = 4 * DISCOVERY_INTERVAL_S
# Bound on one registry call from a stopping replica: when the whole application is being
# deleted the registry may be gone already, and a handle call to a deployment with no
# replica waits for one; the drain must not hang on it.
REGISTRY_CALL_TIMEOUT_S = 2.0
# A draining replica missing from the registry while its channel still holds requests is
# closed once they end, or after this long at most (its own drain is bounded; the router's
# stall timeout ends a stream that a frozen replica holds).
ABSENT_DRAINING_MAX_S = 60.0


class ReplicaStartError(RuntimeError):
    """A replica cannot start on its node; the message names the node and the cause."""


def node_identity() -> tuple[str, str]:
    """(Ray node id, node IP) of the calling process."""
    import ray

    return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()


def resolve_model_on_node(model: ModelConfig, what: str) -> Path:
    """The model directory as this node sees it: `model.path` must be readable here; the
    embedded model is built here (deterministic, so the same on every node)."""
    node_id, node_ip = node_identity()
    if model.path is None:
        return ensure_tiny_model(model.embedded)
    path = Path(model.path).expanduser()
    try:
        ok = (path / "config.json").is_file() and any(path.iterdir())
    except OSError as e:
        ok, reason = False, str(e)
    else:
        reason = "no config.json there"
    if not ok:
        raise ReplicaStartError(f"{what} on node {node_ip} (Ray node {node_id[:12]}) cannot read "
                                f"model.path {path}: {reason}; every node must have the model "
                                "at that path")
    return path


def served_model_name(model: ModelConfig, model_path: Path) -> str:
    if model.served_model_name:
        return model.served_model_name
    if model.path is None:
        return f"pdserve-{model.embedded}"
    return model_path.name


def make_worker(role: str, instance_id: str, spec: Any, kv: KVTransferSettings, advertise_host: str,
                worker_factory: str | None = None) -> Any:
    """The plain worker of one engine instance; `worker_factory` ("module:function" with
    this signature) replaces it in tests."""
    if worker_factory is not None:
        import importlib

        module, _, name = worker_factory.partition(":")
        factory = getattr(importlib.import_module(module), name)
        return factory(role, instance_id, spec, kv, advertise_host)
    if role == "prefill":
        from prefill_worker.worker import PrefillWorker

        return PrefillWorker(instance_id, spec, kv, advertise_host)
    from decode_worker.worker import DecodeWorker

    return DecodeWorker(instance_id, spec, kv, role)  # type: ignore[arg-type]


async def check_engine(worker: Any, instance_id: str) -> None:
    """Raise when `worker`'s engine is not running (vLLM's AsyncLLM raises EngineDeadError
    once its engine-core process died). It must not call the worker's `stats()`: that hands
    over (and so would steal from the router) the transfer records gathered since the last
    poll."""
    host = getattr(worker, "_engine", None)  # the worker's EngineHost
    if host is None:  # a worker without an engine (test fakes): the process answering is all
        return
    if not host.is_ready:
        raise RuntimeError(f"{instance_id}: engine is not running")
    engine = getattr(host, "_engine", None)
    if engine is not None:
        await engine.check_health()


class EngineReplica:
    """One engine instance. `settings` are the replica's own config sub-trees (model, pool
    without its size, KV transfer, drain bound): nothing that changes when the pool is
    resized, so scaling leaves running replicas alone."""

    def __init__(self, role: str, settings: dict[str, Any], registry: Any):
        self.role = role
        self._model = ModelConfig.model_validate(settings["model"])
        self._pool = PoolConfig.model_validate(settings["pool"])
        self._kv = KVTransferSettings.model_validate(settings["kv_transfer"])
        self._drain_timeout_s = float(settings["drain_timeout_s"])
        self._worker_factory: str | None = settings.get("worker_factory")
        self._registry = registry
        self._worker: Any = None
        self._channel: Any = None
        self._entry: ReplicaEntry | None = None
        self._heartbeat: asyncio.Task | None = None
        self._stopping = False

    async def start(self) -> None:
        from ray import serve

        from cluster.channel import ChannelServer
        from cluster.engine_host import EngineSpec

        ctx = serve.get_replica_context()
        rank = ctx.rank.rank if ctx.rank is not None else 0
        instance_id = f"{self.role}-{ctx.replica_id.unique_id}"
        node_id, node_ip = node_identity()
        model_path = resolve_model_on_node(self._model, f"{self.role} replica {instance_id}")
        cores = self._pool.cpu_cores
        spec = EngineSpec(model_path=model_path, model=self._model, pool=self._pool,
                          instance_index=rank % len(cores) if cores else 0)
        self._worker = make_worker(self.role, instance_id, spec, self._kv,
                                   self._kv.advertise_host or node_ip, self._worker_factory)
        await self._worker.start()
        from kvtransfer.auth import kv_secret

        self._channel = ChannelServer(self._worker, node_ip, secret=kv_secret(self._kv))
        address = await self._channel.start()
        self._entry = ReplicaEntry(instance_id=instance_id, role=self.role, address=address,
                                   node_id=node_id, node_ip=node_ip,
                                   replica_id=ctx.replica_id.unique_id)
        await self._registry.publish.remote(self._entry)
        self._heartbeat = asyncio.get_running_loop().create_task(self._beat_forever())
        log.info("%s ready on node %s, channel %s", instance_id, node_ip, address)

    async def _beat_forever(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)
            try:
                await self._registry.publish.remote(self._entry)
            except Exception as e:  # the registry is being replaced: the next beat re-registers
                log.warning("heartbeat to the registry failed: %r", e)

    async def check_health(self) -> None:
        """Serve's health check: ask the engine (a dead engine core fails it), not just the
        actor. Raises when unhealthy; Serve then replaces this replica."""
        await check_engine(self._worker, self._entry.instance_id if self._entry else self.role)

    def describe(self) -> dict[str, Any]:
        """The registry entry, for operators and tests (one Serve call, not per request)."""
        import msgspec

        return msgspec.to_builtins(self._entry)

    async def stop(self) -> None:
        """Drain, then release everything. Serve calls it (via __del__) on scale-down,
        redeploy and shutdown."""
        if self._stopping:
            return
        self._stopping = True
        if self._entry is not None:
            import msgspec

            draining = msgspec.structs.replace(self._entry, is_draining=True)
            if self._heartbeat is not None:
                self._heartbeat.cancel()
            await self._registry_call(self._registry.publish, draining)
            await self._wait_drained()
            await self._registry_call(self._registry.withdraw, self._entry.instance_id)
        if self._channel is not None:
            await self._channel.close()
        if self._worker is not None:
            await self._worker.shutdown()

    async def _registry_call(self, method: Any, *args: Any) -> None:
        """One best-effort registry call: a missing registry (application being deleted,
        registry replica being replaced) costs at most REGISTRY_CALL_TIMEOUT_S. Routers
        then learn of this replica's end from its channel and its entry's expiry."""
        try:
            await asyncio.wait_for(method.remote(*args), REGISTRY_CALL_TIMEOUT_S)
        except Exception as e:  # TimeoutError, DeploymentUnavailableError, ...
            log.info("%s: registry %s skipped: %r", self._entry.instance_id if self._entry else self.role,
                     method, e)

    def _num_held(self) -> tuple[int, int]:
        """(requests on the channel, staged KV segments not yet claimed). Reads the staged
        count with the prefill worker's non-destructive accessor: `stats()` would hand over
        the transfer records that the routers' next poll counts in their metrics."""
        staged = self._worker.num_staged_segments() if self.role == "prefill" else 0
        return self._channel.num_active_requests, staged

    async def _wait_drained(self) -> None:
        started = time.monotonic()
        await asyncio.sleep(DRAIN_NOTICE_S)
        reported = started
        while time.monotonic() - started < self._drain_timeout_s:
            held, staged = self._num_held()
            if held == 0 and staged == 0:
                log.info("%s drained in %.1f s", self._entry.instance_id, time.monotonic() - started)
                return
            if time.monotonic() - reported >= 5.0:
                reported = time.monotonic()
                log.info("%s draining: %d requests held, %d staged KV segments unclaimed",
                         self._entry.instance_id, held, staged)
            await asyncio.sleep(0.1)
        held, staged = self._num_held()
        log.warning("%s: drain bound of %.0f s reached with %d requests held, %d staged KV "
                    "segments unclaimed", self._entry.instance_id, self._drain_timeout_s, held, staged)


class Membership:
    """Keeps a router's `WorkerPool` in step with the registry: new live replicas join,
    draining ones leave routing at once (their requests finish over the open channel),
    withdrawn or expired ones have their channel closed (a draining one once its channel
    holds nothing: a stopping replica withdraws only once drained, so one missing with
    requests still open is a held-up registry's snapshot, and closing would cut them).

    A routed instance missing from one snapshot is dropped only once the router's own
    stats poll of it fails too, or has not answered for `ENTRY_TTL_S`: a registry that
    was held up can hand out a snapshot that lacks every healthy replica (a real-engine
    SIGSTOP, bench/results/faults-cpu-2core), and dropping them would cut their streams.
    A dead replica's channel fails its next poll, so it still goes within one poll of its
    entry's expiry. Withdrawal needs no such wait: a stopping replica publishes itself
    draining for `DRAIN_NOTICE_S` before it withdraws, so routers hold it among the
    draining ones (out of the pool, no poll), which close as soon as they are absent.
    (A router that missed the draining flag keeps it until its next poll, which fails
    once the stopped replica's channel is closed.)
    """

    def __init__(self, pool: Any, connect: Any, on_change: Any = None):
        self._pool = pool
        self._connect = connect  # (address, instance_id, role) -> client
        self._on_change = on_change
        self._clients: dict[str, Any] = {}  # routed
        self._views: dict[str, Any] = {}  # routed: the pool's InstanceView of each
        self._joined_at: dict[str, float] = {}  # routed: when it joined (before its first poll)
        self._absent: set[str] = set()  # routed, missing from the registry, polls answering
        self._draining: dict[str, Any] = {}  # out of routing, channel kept for held requests
        self._draining_absent_since: dict[str, float] = {}  # draining, missing from the registry
        self.entries: dict[str, ReplicaEntry] = {}

    async def reconcile(self, entries: list[ReplicaEntry]) -> None:
        now = time.monotonic()  # the clock the pool stamps its stats polls with
        seen = {e.instance_id for e in entries}
        previous, self.entries = self.entries, {e.instance_id: e for e in entries}
        for e in entries:
            if e.is_draining:
                client = self._forget(e.instance_id)
                if client is not None:
                    self._pool.remove(e.instance_id)
                    self._draining[e.instance_id] = client
                    log.info("%s is draining: no new requests", e.instance_id)
                continue
            if e.instance_id not in self._clients and e.instance_id not in self._draining:
                client = self._connect(e.address, e.instance_id, e.role)
                self._views[e.instance_id] = self._pool.add(client, e.role, node_id=e.node_id)
                self._clients[e.instance_id] = client
                self._joined_at[e.instance_id] = now
                log.info("%s joined (%s on node %s)", e.instance_id, e.address, e.node_ip)
        for iid in [i for i in self._absent if i in seen]:
            self._absent.discard(iid)
            log.info("%s is back in the registry", iid)
        for iid in [i for i in self._clients if i not in seen]:
            if self._answers_polls(iid, now):
                self.entries[iid] = previous[iid]  # still routed: keep what we knew of it
                if iid not in self._absent:
                    self._absent.add(iid)
                    log.warning("%s is missing from the registry but answers its stats poll: "
                                "kept", iid)
                continue
            self._pool.remove(iid)
            await self._close(self._forget(iid))
            log.warning("%s is gone (no heartbeat, and no answer to its stats poll)", iid)
        for iid in list(self._draining):
            if iid in seen:
                self._draining_absent_since.pop(iid, None)
                continue
            since = self._draining_absent_since.setdefault(iid, now)
            held = getattr(self._draining[iid], "num_open", 0)
            if held and now - since < ABSENT_DRAINING_MAX_S:
                if since == now:
                    log.warning("%s is draining and missing from the registry with %d requests "
                                "open: kept until they end", iid, held)
                continue
            self._draining_absent_since.pop(iid, None)
            await self._close(self._draining.pop(iid))
        if self._on_change is not None:
            self._on_change(self)

    def _answers_polls(self, instance_id: str, now: float) -> bool:
        """Whether the pool's stats poll of a routed instance answered within ENTRY_TTL_S
        (its join time stands in until its first poll) and has not failed since."""
        view = self._views[instance_id]
        last = view.polled_at if view.polled_at is not None else self._joined_at[instance_id]
        return view.is_healthy and now - last < ENTRY_TTL_S

    def _forget(self, instance_id: str) -> Any:
        """Stop tracking a routed instance; returns its client (None if not routed)."""
        self._views.pop(instance_id, None)
        self._joined_at.pop(instance_id, None)
        self._absent.discard(instance_id)
        return self._clients.pop(instance_id, None)

    def routed_roles(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for iid in self._clients:
            role = self.entries[iid].role
            counts[role] = counts.get(role, 0) + 1
        return counts

    @staticmethod
    async def _close(client: Any) -> None:
        with contextlib.suppress(Exception):
            await client.close()

    async def close(self) -> None:
        for client in list(self._clients.values()) + list(self._draining.values()):
            await self._close(client)
        for iid in list(self._clients):
            self._forget(iid)
        self._draining.clear()
        self._draining_absent_since.clear()


class RouterIngress:
    """The router app over discovered engine replicas. `settings` is the pdserve config
    without pool sizes (so resizing a pool does not restart the router)."""

    def __init__(self, settings: dict[str, Any], registry: Any, worker_factory: str | None = None):
        self.config = ServeConfig.model_validate(settings)
        self._registry = registry
        self._worker_factory = worker_factory
        self.local_worker: Any = None  # ray.engine_in_router: the instance in this process
        self._local_id = ""
        self._discovery: asyncio.Task | None = None
        self.membership: Membership | None = None
        self.router_app: Any = None
        self.deps: Any = None

    async def start(self) -> None:
        from cluster.channel import WorkerChannelClient
        from kvtransfer.auth import kv_secret
        from router.build import build_router
        from router.tokenizer import ModelTokenizer

        config = self.config
        model_path = resolve_model_on_node(config.model, "router replica")
        tokenizer = ModelTokenizer(model_path, config.model.max_model_len)
        self.router_app, self.deps = build_router(config, tokenizer, served_model_name(config.model, model_path))
        if config.ray.engine_in_router:
            await self._start_local_engine(model_path)
        gpus = {role: p.num_gpus for role, p in config.pools().items()}
        metrics = self.deps.metrics
        local = {"colocated": 1} if self.local_worker is not None else {}

        def units(membership: Membership) -> None:
            # Goodput per unit counts what is routed now (pools resize while serving).
            routed = Counter(membership.routed_roles()) + Counter(local)
            n = sum(count * (gpus.get(role) or 1) for role, count in routed.items())
            metrics.num_units = max(1, int(n))

        secret = kv_secret(config.kv_transfer)
        self.membership = Membership(self.deps.pool, functools.partial(WorkerChannelClient, secret=secret),
                                     on_change=units)
        await self._discover_once()
        self._discovery = asyncio.get_running_loop().create_task(self._discover_forever())

    async def _start_local_engine(self, model_path: Path) -> None:
        """`ray.engine_in_router`: one colocated instance in this process, in the router's
        pool as the worker itself (no channel): its tokens go from the engine's output
        handler to the client's stream on this event loop. The registry does not list it;
        other routers cannot reach it (the config allows one router replica)."""
        from ray import serve

        from cluster.engine_host import EngineSpec

        config = self.config
        node_id, node_ip = node_identity()
        self._local_id = f"colocated-{serve.get_replica_context().replica_id.unique_id}"
        spec = EngineSpec(model_path=model_path, model=config.model, pool=config.colocated, instance_index=0)
        worker = make_worker("colocated", self._local_id, spec, config.kv_transfer,
                             config.kv_transfer.advertise_host or node_ip, self._worker_factory)
        try:
            await worker.start()
        except BaseException:
            await worker.shutdown()
            raise
        self.local_worker = worker
        self.deps.pool.add(worker, "colocated", node_id=node_id)
        log.info("%s ready in the router replica on node %s", self._local_id, node_ip)

    def build_app(self):
        return self.router_app

    async def _discover_once(self) -> None:
        entries = await self._registry.snapshot.remote()
        await self.membership.reconcile(entries)

    async def _discover_forever(self) -> None:
        while True:
            await asyncio.sleep(DISCOVERY_INTERVAL_S)
            try:
                await self._discover_once()
            except Exception as e:  # registry being replaced: keep routing what we know
                log.warning("replica discovery failed: %r", e)

    async def check_health(self) -> None:
        if self._discovery is not None and self._discovery.done():
            raise RuntimeError("replica discovery stopped")
        if self.local_worker is not None:
            await check_engine(self.local_worker, self._local_id)

    async def stop(self) -> None:
        if self._discovery is not None:
            self._discovery.cancel()
        if self.membership is not None:
            await self.membership.close()
        if self.local_worker is not None:
            worker, self.local_worker = self.local_worker, None
            await worker.shutdown()


def config_error_line(e: Exception) -> str:
    """One line for a config error (the YAML's field and what is wrong with it)."""
    text = str(e)
    if isinstance(e, ConfigError):
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        if len(lines) > 1 and lines[0].endswith(":"):
            return f"{lines[0]} {'; '.join(lines[1:])}"
    return " ".join(text.split())
