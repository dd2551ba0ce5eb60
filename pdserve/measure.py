"""Side-by-side measurements of the Serve runtime against the previous launcher.

    python -m pdserve.measure ttft [--runtimes serve serve-proxy actors] [--requests 40] [serve flags...]
    python -m pdserve.measure fakes [--requests 200] [--variants uvicorn proxy direct]

`ttft` starts `pdserve serve` for each runtime in turn (same config, same machine, one
after the other: `serve` is the Serve application with direct ingress, `serve-proxy` the
same through Serve's HTTP proxy, `actors` the previous launcher), records the cold start
(exec to /health 200), then p50/p90 TTFT of sequential streamed requests (low load: one at
a time) and stops it. `fakes` does the same without engines: the router alone in uvicorn
over in-process fakes, then the Serve application over fake replicas in each Serve
variant, so what differs is the cost of Serve's HTTP path and the worker channel.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ttfts(url: str, n: int, model: str = "pdserve-tiny", max_tokens: int = 8) -> list[float]:
    out = []
    with httpx.Client(timeout=120) as client:
        for i in range(n + 3):
            body = {"model": model, "prompt": f"request {i}: the quick brown fox", "stream": True,
                    "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
            t0 = time.perf_counter()
            first = None
            with client.stream("POST", f"{url}/v1/completions", json=body) as r:
                r.raise_for_status()
                for line in r.iter_lines():
                    if line.startswith("data: {") and first is None and json.loads(line[6:])["choices"]:
                        first = time.perf_counter() - t0
            if i >= 3:  # the first requests warm caches and connections
                out.append(first)
    return out


def _summary(name: str, xs: list[float]) -> str:
    xs = sorted(xs)
    p90 = xs[int(0.9 * (len(xs) - 1))]
    return f"{name}: p50 TTFT {statistics.median(xs) * 1000:.1f} ms, p90 {p90 * 1000:.1f} ms (n={len(xs)})"


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 900) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; see {log}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("server did not become healthy")


# `ttft --runtimes`: what each name runs.
RUNTIME_FLAGS = {
    "serve": ["--runtime", "serve"],  # the Serve application, direct ingress (the default)
    "serve-proxy": ["--runtime", "serve", "--ingress", "proxy"],  # ... through Serve's proxy
    "actors": ["--runtime", "actors"],  # the previous launcher: one Ray actor per instance
}


def measure_runtime(runtime: str, n: int, extra: list[str], started: float | None = None) -> str:
    port = _free_port()
    log = Path(f"/tmp/pdserve-measure-{runtime}-{port}.log")
    t0 = time.monotonic()
    flags = RUNTIME_FLAGS[runtime]
    proc = subprocess.Popen([sys.executable, "-m", "pdserve.cli", "serve", *flags,
                             "--port", str(port), *extra], cwd=ROOT, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        cold = _wait_healthy(url, proc, log)
        del t0
        return f"{_summary(runtime, _ttfts(url, n))}; cold start {cold:.1f} s"
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# Ray Serve settings of each fake-worker variant (`fakes`): set before Ray starts, so that
# Serve's controller and replicas read them.
# (The router replica runs the router on its own event loop in both: placement.INGRESS_ENV_VARS.)
SERVE_VARIANTS = {
    "proxy": False,  # Serve's HTTP proxy, then a Ray actor call into the router replica
    "direct": True,  # what `pdserve serve` sets: the router replica serves HTTP itself
}


def _variant_env(variant: str, config) -> dict[str, str]:
    from pdserve.serving import direct_ingress_env

    return direct_ingress_env(config) if SERVE_VARIANTS[variant] else {}


async def _serve_fakes(n: int, variant: str = "proxy") -> str:
    from cluster.config import ServeConfig

    port = _free_port()
    config = ServeConfig.model_validate({"router": {"port": port}})
    env = _variant_env(variant, config)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import ray
    from ray import serve

    from pdserve.serve_app import build_application, parse_args

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "PDSERVE_FAKE_TOKEN_DELAY_S": "0"}})
    try:
        direct = "RAY_SERVE_ENABLE_DIRECT_INGRESS" in env
        serve.start(http_options={"host": "127.0.0.1", "port": _free_port() if direct else port})
        serve.run(build_application(parse_args({}), worker_factory="tests.serve.fake_workers:make_worker"),
                  name="pdserve", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
        return _summary(f"serve + fake workers ({variant})", await asyncio.to_thread(_ttfts, url, n))
    finally:
        serve.shutdown()
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


async def _uvicorn_fakes(n: int) -> str:
    import uvicorn

    from cluster.config import ServeConfig
    from cluster.tiny_model import ensure_tiny_model
    from router.build import build_router
    from router.tokenizer import ModelTokenizer

    sys.path.insert(0, str(ROOT))
    from tests.serve.fake_workers import make_worker

    os.environ["PDSERVE_FAKE_TOKEN_DELAY_S"] = "0"
    config = ServeConfig()
    prefill = make_worker("prefill", "prefill-0", None, None, None)
    decode = make_worker("decode", "decode-0", None, None, None)
    app, _ = build_router(config, ModelTokenizer(ensure_tiny_model("tiny")), "pdserve-tiny",
                          prefill=[prefill], decode=[decode])
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.ensure_future(server.serve())
    url = f"http://127.0.0.1:{port}"
    try:
        while not server.started:
            await asyncio.sleep(0.05)
        return _summary("uvicorn router + in-process fake workers", await asyncio.to_thread(_ttfts, url, n))
    finally:
        server.should_exit = True
        await task


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pdserve.measure")
    sub = parser.add_subparsers(dest="what", required=True)
    t = sub.add_parser("ttft")
    t.add_argument("--runtimes", nargs="+", default=["serve", "actors"], choices=list(RUNTIME_FLAGS))
    t.add_argument("--requests", type=int, default=40)
    f = sub.add_parser("fakes")
    f.add_argument("--requests", type=int, default=200)
    f.add_argument("--variants", nargs="+", default=["uvicorn", *SERVE_VARIANTS],
                   choices=["uvicorn", *SERVE_VARIANTS],
                   help="uvicorn: the router alone over in-process fakes; the others: the Serve "
                   "application over fake replicas, with Serve's proxy or direct ingress")
    args, extra = parser.parse_known_args(argv)
    if args.what == "ttft":
        for runtime in args.runtimes:
            print(measure_runtime(runtime, args.requests, extra), flush=True)
    else:
        for variant in args.variants:
            run = _uvicorn_fakes(args.requests) if variant == "uvicorn" else _serve_fakes(args.requests, variant)
            print(asyncio.run(run), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
