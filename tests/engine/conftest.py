"""Real vLLM engines on the CPU behind real routers, in this process (no Ray).

One prefill, one decode and one colocated engine on the embedded tiny model, a
disaggregated router over the first two and a colocated router over the third, all served
by uvicorn on loopback from a background event loop. Engines take ~30 s each to start, so
the deployment is shared by every test in the package.
"""

from __future__ import annotations

import asyncio
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine


def _vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:
        return False
    return True


@dataclass
class LiveEngines:
    staging_dir: Path
    disagg_url: str = ""
    coloc_url: str = ""
    workers: dict = field(default_factory=dict)
    loop: asyncio.AbstractEventLoop | None = None
    dist_store: object = None
    error: BaseException | None = None

    def call(self, coro, timeout: float = 120):
        """Run a coroutine on the deployment's loop (e.g. a worker's stats())."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


async def _start(live: LiveEngines, ready: threading.Event, stop: asyncio.Event) -> None:
    import uvicorn

    from cluster.config import (
        KVTransferSettings,
        ModelConfig,
        PoolConfig,
        RouterConfig,
        ServeConfig,
        SLOConfig,
    )
    from cluster.engine_host import EngineSpec
    from cluster.tiny_model import ensure_tiny_model
    from decode_worker.worker import DecodeWorker
    from prefill_worker.worker import PrefillWorker
    from router.build import build_router
    from router.tokenizer import ModelTokenizer

    model_path = ensure_tiny_model("tiny")
    model = ModelConfig(max_model_len=2048)
    cores = sorted(os.sched_getaffinity(0))
    first, last = [cores[0]], [cores[-1]]

    def spec(cpu_cores):
        return EngineSpec(model_path=model_path, model=model,
                          pool=PoolConfig(num_instances=1, cpu_cores=[cpu_cores], kv_cache_gib=1,
                                          max_num_seqs=64),
                          instance_index=0)

    from datetime import timedelta

    from torch.distributed import TCPStore

    # The rendezvous store of transport `dist` (what `pdserve serve` hosts): the prefill
    # answers dist fetches, and a test can switch the decode to them.
    live.dist_store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                               timeout=timedelta(seconds=60))
    kv = KVTransferSettings(staging_dir=live.staging_dir, lease_s=60,
                            dist_store_host="127.0.0.1", dist_store_port=live.dist_store.port)
    prefill = PrefillWorker("prefill-0", spec(first), kv)
    decode = DecodeWorker("decode-0", spec(last), kv, role="decode")
    # The colocated engine runs as many CPU threads as the prefill and the decode (one):
    # the tests compare its tokens with theirs, and a bf16 matmul split over another
    # number of threads rounds differently, which flips the random model's near-ties.
    coloc = DecodeWorker("colocated-0", spec(last), kv, role="colocated")
    live.workers = {"prefill": prefill, "decode": decode, "colocated": coloc}
    servers = []
    try:
        for w in live.workers.values():  # one at a time: from_engine_args blocks this loop
            await w.start()
        router_cfg = RouterConfig(stats_interval_s=0.1)
        slo = SLOConfig(ttft_s=2.0, tpot_s=0.5)
        tokenizer = ModelTokenizer(model_path, model.max_model_len)
        for name, (config, clients) in {
            "disagg": (ServeConfig(mode="disaggregated", router=router_cfg, slo=slo),
                       dict(prefill=[prefill], decode=[decode])),
            "coloc": (ServeConfig(mode="colocated", router=router_cfg, slo=slo,
                                  colocated={"num_instances": 2}),
                      dict(colocated=[coloc])),
        }.items():
            app, _ = build_router(config, tokenizer, "pdserve-tiny", **clients)
            server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0,
                                                   log_level="warning"))
            servers.append((name, server, asyncio.create_task(server.serve())))
        for name, server, _ in servers:
            while not server.started:
                await asyncio.sleep(0.05)
            url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
            setattr(live, f"{name}_url", url)
    except BaseException as e:  # report to the test thread instead of hanging it
        live.error = e
        ready.set()
        for w in live.workers.values():
            await w.shutdown()
        return
    ready.set()
    await stop.wait()
    for _, server, task in servers:
        server.should_exit = True
        await task
    for w in live.workers.values():
        await w.shutdown()


@pytest.fixture(scope="session")
def live_engines(tmp_path_factory):
    if not _vllm_available():
        pytest.skip("vLLM is not installed (run tests through ./run test)")
    live = LiveEngines(staging_dir=tmp_path_factory.mktemp("kv-staging"))
    ready = threading.Event()
    loop = asyncio.new_event_loop()
    live.loop = loop
    stop = asyncio.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(_start(live, ready, stop))

    thread = threading.Thread(target=run, name="pdserve-live-engines", daemon=True)
    thread.start()
    assert ready.wait(timeout=600), "engines did not start within 10 minutes"
    if live.error is not None:
        raise live.error
    yield live
    loop.call_soon_threadsafe(stop.set)
    thread.join(timeout=120)
