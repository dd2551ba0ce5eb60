"""A pdserve router over in-process fake workers, with synthetic traffic, for the dashboards.

No engine, GPU or Ray: the workers are `tests/fakes.py`'s. The traffic has a slow load wave,
decode slowdowns under load (so TPOT crosses its SLO now and then) and a periodic episode
where decode loses the transferred KV and recomputes it (a silent fallback the dashboards
must make visible). Run from the repository root::

    python deploy/observability/demo.py --port 8000      # then open http://127.0.0.1:8000/dashboard

`deploy/observability/run.sh --demo` starts it next to Prometheus (and Grafana).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import random
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def build_app(num_prefill: int, num_decode: int, ttft_s: float, tpot_s: float):
    from cluster.config import SLOConfig
    from router.dashboard import dashboard_routes
    from tests.fakes import make_fake_deployment

    app, deps, prefills, decodes = make_fake_deployment(
        num_prefill=num_prefill, num_decode=num_decode,
        slo=SLOConfig(ttft_s=ttft_s, tpot_s=tpot_s), token_delay_s=0.02)
    if not any(getattr(route, "path", None) == "/dashboard" for route in app.routes):
        app.include_router(dashboard_routes(deps))  # until router/app.py includes it itself
    return app, deps, prefills, decodes


async def drive_traffic(base_url: str, prefills, decodes, mean_rps: float, tpot_s: float) -> None:
    """Poisson arrivals whose rate follows a 2-minute wave; never more than 32 in flight."""
    import httpx

    rng = random.Random(0)
    started = time.monotonic()
    slots = asyncio.Semaphore(32)
    tasks: set[asyncio.Task] = set()

    async def one(client: httpx.AsyncClient) -> None:
        async with slots:
            body = {"model": "pdserve-tiny", "prompt": "x " * rng.randint(8, 200),
                    "max_tokens": rng.randint(4, 48), "ignore_eos": True}
            with contextlib.suppress(httpx.HTTPError):
                await client.post("/v1/completions", json=body)

    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        while True:
            elapsed = time.monotonic() - started
            rps = mean_rps * (1.0 + 0.6 * math.sin(2 * math.pi * elapsed / 120.0))
            # Decode slows down with its load; now and then past the TPOT SLO.
            running = sum(len(d.active) for d in decodes)
            for d in decodes:
                d.token_delay_s = tpot_s * (0.35 + 0.12 * running / max(1, len(decodes)))
            for p in prefills:
                p.delay_s = 0.01 + 0.004 * p.running
            # 8 s of every 45 s, decode cannot load the transferred KV and recomputes it.
            lose = (elapsed % 45.0) > 37.0
            for d in decodes:
                d.lose_kv = lose
            task = asyncio.create_task(one(client))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            await asyncio.sleep(rng.expovariate(max(0.05, rps)))


async def main_async(args: argparse.Namespace) -> None:
    import uvicorn

    app, deps, prefills, decodes = build_app(args.num_prefill, args.num_decode, args.ttft_slo,
                                             args.tpot_slo)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port,
                                           log_level="warning"))
    serving = asyncio.create_task(server.serve())
    while not server.started:
        if serving.done():
            await serving  # raises the bind error, if any
            return
        await asyncio.sleep(0.05)
    base = f"http://{args.host}:{args.port}"
    print(f"pdserve demo (fake workers) on {base}  dashboard: {base}/dashboard  "
          f"metrics: {base}/metrics", flush=True)
    traffic = None
    if args.rps > 0:
        traffic = asyncio.create_task(drive_traffic(base, prefills, decodes, args.rps, args.tpot_slo))
    try:
        await serving
    finally:
        if traffic is not None:
            traffic.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--rps", type=float, default=4.0, help="mean request rate (0: no traffic)")
    parser.add_argument("--num-prefill", type=int, default=2)
    parser.add_argument("--num-decode", type=int, default=2)
    parser.add_argument("--ttft-slo", type=float, default=0.25, help="seconds")
    parser.add_argument("--tpot-slo", type=float, default=0.05, help="seconds")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main_async(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
