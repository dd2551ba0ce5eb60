"""The router's one composition: a `ServeConfig`, a tokenizer and worker clients in, the
FastAPI app out. Ray-free, so the launcher, a Ray Serve ingress and the tests build the
router the same way; only where the clients come from differs (worker channels, in-process
workers, fakes)."""

from __future__ import annotations

from collections.abc import Iterable

from fastapi import FastAPI

from cluster.config import ServeConfig
from router.app import create_app
from router.deps import RouterDeps
from router.metrics import Metrics
from router.pool import WorkerClient, WorkerPool
from router.tokenizer import ModelTokenizer


def goodput_units(config: ServeConfig) -> tuple[int, str]:
    """What goodput is divided by: GPUs when the pools use them, else engine instances."""
    pools = config.pools().values()
    num_gpus = sum(p.num_gpus * p.num_instances for p in pools)
    if num_gpus:
        return int(num_gpus), "gpu"
    return sum(p.num_instances for p in pools), "instance"


def build_router(config: ServeConfig, tokenizer: ModelTokenizer, model_name: str, *,
                 prefill: Iterable[WorkerClient] = (), decode: Iterable[WorkerClient] = (),
                 colocated: Iterable[WorkerClient] = ()) -> tuple[FastAPI, RouterDeps]:
    pool = WorkerPool.build(config.router, prefill=prefill, decode=decode, colocated=colocated)
    pool.prefer_same_node = config.mode == "disaggregated" and config.placement.affinity == "high"
    num_units, unit = goodput_units(config)
    deps = RouterDeps(config=config.router, slo=config.slo, model_name=model_name,
                      tokenizer=tokenizer, pool=pool,
                      metrics=Metrics(config.slo, num_units=num_units, unit=unit))
    return create_app(deps), deps
