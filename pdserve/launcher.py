"""The composition root: starts Ray, the worker actors and the router for one `ServeConfig`.

Worker classes are plain; here they are wrapped with ``ray.remote`` and given their
resources. Once an engine is up, its worker opens a worker channel (cluster/channel.py) on
this node and the router talks to it over that channel: Ray places and supervises the
workers, and carries nothing per request or per token. Nothing imports this module but the CLI.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.channel import WorkerChannelClient
from cluster.config import ConfigError, PoolConfig, ServeConfig
from cluster.cpu_affinity import pin_front_end
from cluster.engine_host import EngineSpec, is_cuda_available
from cluster.tiny_model import ensure_tiny_model

log = logging.getLogger("pdserve")
ENGINE_START_TIMEOUT_S = 900.0


class StartupError(RuntimeError):
    """The deployment could not start; the message says which instance and why."""


def resolve_model_path(config: ServeConfig) -> Path:
    if config.model.path is not None:
        path = Path(config.model.path).expanduser()
        if not (path / "config.json").exists():
            raise ConfigError(f"model.path: {path} is not a Hugging Face model directory "
                              "(no config.json)")
        return path
    return ensure_tiny_model(config.model.embedded)


def served_model_name(config: ServeConfig, model_path: Path) -> str:
    if config.model.served_model_name:
        return config.model.served_model_name
    if config.model.path is None:
        return f"pdserve-{config.model.embedded}"
    return model_path.name


def with_default_cpu_cores(config: ServeConfig, cores: list[int]) -> ServeConfig:
    """On a CPU host, give each instance its own cores unless the config pins them: two
    engines' thread pools fighting over the same cores cost both of them. When there are
    more cores than instances, the first core is left to the front end (router, workers'
    output processing, Ray), as vLLM's CPU server leaves one to its API server: an engine
    whose OpenMP threads share a core with the front end is preempted mid-step, and on two
    cores that cost more than the second core gave (docs/dataplane-profile.md)."""
    pools = config.pools()
    num_instances = sum(p.num_instances for p in pools.values())
    if num_instances == 0 or all(p.cpu_cores is not None for p in pools.values()):
        return config
    if num_instances < len(cores):
        cores = cores[1:]  # the front end's core
    if num_instances <= len(cores):
        per = len(cores) // num_instances
        chunks = [cores[i * per:(i + 1) * per] for i in range(num_instances)]
    else:
        chunks = [[cores[i % len(cores)]] for i in range(num_instances)]
    update: dict[str, PoolConfig] = {}
    i = 0
    for role, pool in pools.items():
        assigned = chunks[i:i + pool.num_instances]
        i += pool.num_instances
        if pool.cpu_cores is None:
            update[role] = pool.model_copy(update={"cpu_cores": assigned})
    return config.model_copy(update=update)


def with_default_front_end_cores(config: ServeConfig, host_cores: list[int]) -> ServeConfig:
    """On a CPU host whose engines have their cores assigned and leave some of `host_cores`
    free (what `with_default_cpu_cores` does with more cores than instances), pin the front
    end to those free cores unless `ray.front_end_cores` is set. The free core is reserved
    for the front end either way; pinning also keeps the front end (router, worker
    replicas, Serve, Ray's processes) off the engines' cores, where it would preempt an
    engine mid-step. vLLM's CPU server reserves a core for its API server the same way but
    does not pin it there. Measured side by side in rotated rounds (tiny model, one
    instance, 32 req/s): p90 TTFT 150-259 ms pinned against 774-1,652 ms unpinned and
    917-1,854 ms for plain vLLM (bench/results/serving-vs-vllm-cpu-2core, 2026-12-07)."""
    if config.ray.front_end_cores is not None or config.ray.address is not None:
        return config
    engine_cores = config.pinned_engine_cores()
    if not engine_cores:
        return config
    free = sorted(set(host_cores) - engine_cores)
    if not free:
        return config
    return config.model_copy(update={"ray": config.ray.model_copy(update={"front_end_cores": free})})


def with_default_engine_in_router(config: ServeConfig) -> ServeConfig:
    """Unless `ray.engine_in_router` is set: on for one colocated instance behind one router
    replica (vLLM's own layout: one front-end process holding the engine's client), off
    otherwise. One instance has no other to move its streams to, so the router and its
    engine failing together loses nothing that separate replicas would keep; each token
    skips a process (bench/results/serving-vs-vllm-cpu-2core/run-2026-12-07-in-router:
    p50 TPOT +4.8% over plain vLLM at 1 req/s, against +7.5% as an engine replica).
    Called for a Ray that `pdserve serve` starts on a CPU host."""
    if config.ray.engine_in_router is not None:
        return config
    on = (config.mode == "colocated" and config.colocated.num_instances == 1
          and config.ray.router_replicas == 1)
    return config.model_copy(update={"ray": config.ray.model_copy(update={"engine_in_router": on})})


@dataclass
class Deployment:
    config: ServeConfig
    model_path: Path
    actors: dict[str, Any] = field(default_factory=dict)
    # The router's ends of the workers' channels (cluster/channel.py): nothing per request
    # or per token goes through Ray.
    prefill: list[WorkerChannelClient] = field(default_factory=list)
    decode: list[WorkerChannelClient] = field(default_factory=list)
    colocated: list[WorkerChannelClient] = field(default_factory=list)
    dist_store: Any = None  # the torch.distributed rendezvous store of transport `dist`

    async def shutdown(self) -> None:
        import ray

        for client in self.prefill + self.decode + self.colocated:
            await client.close()
        await asyncio.gather(*(_quiet(a.shutdown.remote()) for a in self.actors.values()))
        for actor in self.actors.values():
            ray.kill(actor)
        self.actors.clear()


async def _quiet(ref) -> None:
    try:
        await asyncio.wait_for(ref, timeout=30)
    except Exception:
        pass


def init_ray(config: ServeConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = dict(namespace=config.ray.namespace, include_dashboard=False,
                                  log_to_driver=True)
    if config.ray.address is None:
        needed = sum(p.num_cpus * p.num_instances for p in config.pools().values())
        kwargs.update(num_cpus=max(os.cpu_count() or 1, int(needed + 0.999)),
                      object_store_memory=config.ray.object_store_memory_bytes)
        pin_front_end(config.ray.front_end_cores, is_cuda_available())  # and Ray's processes
    else:
        kwargs["address"] = config.ray.address
    ray.init(**kwargs)


async def start_workers(config: ServeConfig, model_path: Path) -> Deployment:
    """Create every worker actor, start their engines in parallel, wait until all are ready."""
    import ray

    from decode_worker.worker import DecodeWorker
    from prefill_worker.worker import PrefillWorker

    from kvtransfer.auth import kv_secret, with_deployment_secret

    # One secret for KV transfers and worker channels, shared by every worker.
    config = config.model_copy(update={"kv_transfer": with_deployment_secret(config.kv_transfer)})
    secret = kv_secret(config.kv_transfer)
    dep = Deployment(config=config, model_path=model_path)
    node_ip = ray.util.get_node_ip_address()
    dep.dist_store = _host_dist_store(config.kv_transfer, node_ip)
    for role, pool in config.pools().items():
        for i in range(pool.num_instances):
            instance_id = f"{role}-{i}"
            spec = EngineSpec(model_path=model_path, model=config.model, pool=pool, instance_index=i)
            options = dict(num_cpus=pool.num_cpus, num_gpus=pool.num_gpus, name=f"pdserve-{instance_id}",
                           max_concurrency=4096)
            if role == "prefill":
                actor = ray.remote(PrefillWorker).options(**options).remote(
                    instance_id, spec, config.kv_transfer, node_ip)
            else:
                actor = ray.remote(DecodeWorker).options(**options).remote(
                    instance_id, spec, config.kv_transfer, role)
            dep.actors[instance_id] = actor
    roles = {f"{role}-{i}": role for role, pool in config.pools().items()
             for i in range(pool.num_instances)}

    async def start_one(instance_id: str, actor: Any) -> None:
        await actor.start.remote()
        address = await actor.open_channel.remote(node_ip)
        role = roles[instance_id]
        client = WorkerChannelClient(address, instance_id, role, secret=secret)
        {"prefill": dep.prefill, "decode": dep.decode, "colocated": dep.colocated}[role].append(client)

    try:
        await asyncio.wait_for(asyncio.gather(*(start_one(i, a) for i, a in dep.actors.items())),
                               timeout=ENGINE_START_TIMEOUT_S)
        for clients in (dep.prefill, dep.decode, dep.colocated):
            clients.sort(key=lambda c: c.instance_id)
    except asyncio.TimeoutError as e:
        await dep.shutdown()
        raise StartupError(f"engines did not start within {ENGINE_START_TIMEOUT_S:.0f} s") from e
    except ray.exceptions.RayError as e:
        await dep.shutdown()
        cause = getattr(e, "cause", None) or e
        first_line = str(cause).strip().splitlines()[-1] if str(cause).strip() else repr(cause)
        raise StartupError(f"an engine failed to start: {first_line} (the worker log above "
                           "has the details)") from e
    except BaseException:
        await dep.shutdown()
        raise
    return dep


def _host_dist_store(kv: Any, node_ip: str) -> Any:
    """Host the rendezvous store of transport `dist` when its address is this node's (an
    address elsewhere is the operator's store); None when `dist` is not configured."""
    import socket

    if kv.dist_store_host is None:
        return None
    local = {"127.0.0.1", "localhost", "0.0.0.0", node_ip, socket.gethostname()}
    if kv.dist_store_host not in local:
        return None
    from datetime import timedelta

    from torch.distributed import TCPStore

    try:
        return TCPStore(kv.dist_store_host, kv.dist_store_port, is_master=True,
                        wait_for_workers=False, timeout=timedelta(seconds=kv.connect_timeout_s * 12))
    except (RuntimeError, OSError) as e:
        raise StartupError(f"cannot host the kv_transfer dist store on "
                           f"{kv.dist_store_host}:{kv.dist_store_port}: {e}") from e


def build_router_app(config: ServeConfig, model_path: Path, dep: Deployment):
    from router.build import build_router
    from router.tokenizer import ModelTokenizer

    app, _ = build_router(config, ModelTokenizer(model_path, config.model.max_model_len),
                          served_model_name(config, model_path), prefill=dep.prefill,
                          decode=dep.decode, colocated=dep.colocated)
    return app


async def serve(config: ServeConfig) -> None:
    """Run a deployment until SIGINT/SIGTERM."""
    import uvicorn

    model_path = resolve_model_path(config)
    if config.ray.address is None and not is_cuda_available():
        config = with_default_cpu_cores(config, sorted(os.sched_getaffinity(0)))
    init_ray(config)
    log.info("starting %s workers for %s", config.mode, model_path)
    dep = await start_workers(config, model_path)
    app = build_router_app(config, model_path, dep)
    server = uvicorn.Server(uvicorn.Config(app, host=config.router.host, port=config.router.port,
                                           log_level="info", timeout_graceful_shutdown=5))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))
    try:
        log.info("pdserve ready on http://%s:%d", config.router.host, config.router.port)
        await server.serve()
    finally:
        await dep.shutdown()
        import ray

        ray.shutdown()
