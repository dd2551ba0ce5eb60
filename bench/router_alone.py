"""The router alone: pdserve's real router over zero-latency in-process workers.

Isolates the router's own CPU cost (HTTP, tokenization, routing, the handoff state
machine, detokenization, SSE) from the engines and from Ray: a prefill returns its first
token at once, a decode yields one `TokenDelta` per token with only an event-loop turn
between tokens (one "engine step"). Pin it to one core and drive it from another:

    taskset -c 0 python -m bench.router_alone --port 8300 --mode colocated &
    taskset -c 1 python -m bench.vllm_client bench serve --base-url http://127.0.0.1:8300 \\
        --model pdserve-tiny --tokenizer "$(python -c 'from cluster.tiny_model import \\
        ensure_tiny_model as e; print(e("tiny"))')" --dataset-name random \\
        --random-input-len 512 --random-output-len 64 --ignore-eos --num-prompts 2000 \\
        --request-rate inf --max-concurrency 64 --seed 0

Requests/s and streamed tokens/s at saturation are then the router's ceiling on one core.
`--channel` puts the fake workers in a child process behind worker channels
(cluster/channel.py), so the router pays the channel's cost as with real workers.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import AsyncIterator

from cluster.wire import EngineRequest, KVHandle, PrefillResult, TokenDelta, WorkerStats

_FIRST_TOKEN_ID = 10  # any id of the tiny vocabulary that is not special
# Older wire versions have no block_size in WorkerStats (the profile compares versions).
_BLOCK = {"block_size": 16} if "block_size" in WorkerStats.__struct_fields__ else {}


def _token(i: int) -> int:
    return _FIRST_TOKEN_ID + (i * 7919) % 1000


class ZeroLatencyPrefill:
    def __init__(self, instance_id: str) -> None:
        self.instance_id = instance_id

    async def prefill(self, req: EngineRequest) -> PrefillResult:
        now = time.time()
        return PrefillResult(
            request_id=req.request_id, first_token_id=_token(0), finish_reason=None,
            kv_handle=KVHandle(producer_id=self.instance_id, data=req.request_id.encode()),
            num_prompt_tokens=len(req.prompt_token_ids), num_cached_tokens=0,
            prefill_start_s=now, prefill_end_s=now)

    async def release_kv(self, handle: KVHandle) -> bool:
        return True

    async def abort(self, request_id: str) -> None:
        return None

    async def stats(self) -> WorkerStats:
        return WorkerStats(instance_id=self.instance_id, role="prefill", is_ready=True,
                           num_running_reqs=0, num_waiting_reqs=0, kv_cache_usage=0.0,
                           num_kv_blocks=100_000, **_BLOCK)


class ZeroLatencyGenerate:
    """Decode (continues after prefill's first token) or colocated (emits all tokens)."""

    def __init__(self, instance_id: str, role: str) -> None:
        self.instance_id = instance_id
        self.role = role
        self.running = 0

    async def generate(self, req: EngineRequest) -> AsyncIterator[TokenDelta]:
        transferred = req.kv_handle is not None
        served_by = "transferred" if transferred else "colocated"
        self.running += 1
        try:
            n_out = req.sampling.max_tokens
            for n in range(n_out):
                await asyncio.sleep(0)  # one engine step: every running request advances
                last = n + 1 == n_out
                yield TokenDelta(token_ids=(_token(n + 1 if transferred else n),),
                                 finish_reason="length" if last else None,
                                 served_by=served_by if n == 0 else None,
                                 num_prompt_tokens_computed=(
                                     (1 if transferred else len(req.prompt_token_ids))
                                     if n == 0 else None))
        finally:
            self.running -= 1

    async def abort(self, request_id: str) -> None:
        return None

    async def stats(self) -> WorkerStats:
        return WorkerStats(instance_id=self.instance_id, role=self.role, is_ready=True,  # type: ignore[arg-type]
                           num_running_reqs=self.running, num_waiting_reqs=0,
                           kv_cache_usage=0.0, num_kv_blocks=100_000, **_BLOCK)


def fake_workers(mode: str, num_instances: int) -> tuple[list, list, list]:
    """(prefill, decode, colocated) zero-latency workers of a deployment."""
    if mode == "disaggregated":
        return ([ZeroLatencyPrefill(f"prefill-{i}") for i in range(num_instances)],
                [ZeroLatencyGenerate(f"decode-{i}", "decode") for i in range(num_instances)], [])
    return [], [], [ZeroLatencyGenerate(f"colocated-{i}", "colocated")
                    for i in range(num_instances)]


async def host_workers(mode: str, num_instances: int) -> None:
    """Serve the fake workers over worker channels (cluster/channel.py) and print one JSON
    line [{instance_id, role, address}, ...]; run until killed."""
    import json

    from cluster.channel import ChannelServer

    prefill, decode, colocated = fake_workers(mode, num_instances)
    listed = []
    servers = []
    for role, workers in (("prefill", prefill), ("decode", decode), ("colocated", colocated)):
        for worker in workers:
            server = ChannelServer(worker, "127.0.0.1", 0)
            servers.append(server)
            listed.append({"instance_id": worker.instance_id, "role": role,
                           "address": await server.start()})
    print(json.dumps(listed), flush=True)
    await asyncio.Event().wait()


def _channel_workers(mode: str, num_instances: int, core: int | None):
    """Start `host_workers` in a child process (on `core`); channel clients to its workers."""
    import atexit
    import json
    import os
    import subprocess

    from cluster.channel import WorkerChannelClient

    child = subprocess.Popen(
        [sys.executable, "-m", "bench.router_alone", "--host-workers", "--mode", mode,
         "--num-instances", str(num_instances)], stdout=subprocess.PIPE, text=True,
        preexec_fn=(lambda: os.sched_setaffinity(0, {core})) if core is not None else None)
    atexit.register(child.kill)
    assert child.stdout is not None
    line = child.stdout.readline()
    if not line:
        raise SystemExit("router_alone: the worker host did not start")
    clients: dict[str, list] = {"prefill": [], "decode": [], "colocated": []}
    for entry in json.loads(line):
        clients[entry["role"]].append(
            WorkerChannelClient(entry["address"], entry["instance_id"], entry["role"]))
    return clients["prefill"], clients["decode"], clients["colocated"]


def build_app(mode: str, num_instances: int, model: str = "tiny", workers=None):
    from cluster.config import ServeConfig
    from cluster.tiny_model import ensure_tiny_model
    from router.build import build_router
    from router.tokenizer import ModelTokenizer

    size = {"num_instances": num_instances}
    config = ServeConfig(mode=mode, prefill=size, decode=size, colocated=size)
    prefill, decode, colocated = workers or fake_workers(mode, num_instances)
    if mode != "disaggregated":
        prefill, decode = [], []
    app, _ = build_router(config, ModelTokenizer(ensure_tiny_model(model)), f"pdserve-{model}",
                          prefill=prefill, decode=decode, colocated=colocated)
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.router_alone", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8300)
    parser.add_argument("--mode", choices=["colocated", "disaggregated"], default="colocated")
    parser.add_argument("--num-instances", type=int, default=1,
                        help="fake instances per pool (default 1)")
    parser.add_argument("--embedded-model", default="tiny", help="tokenizer and model name")
    parser.add_argument("--channel", action="store_true",
                        help="host the workers in another process and reach them over worker "
                        "channels (cluster/channel.py), as `pdserve serve` does")
    parser.add_argument("--workers-core", type=int, default=None,
                        help="with --channel: the core of the worker process")
    parser.add_argument("--host-workers", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.host_workers:
        asyncio.run(host_workers(args.mode, args.num_instances))
        return 0
    import uvicorn

    workers = (_channel_workers(args.mode, args.num_instances, args.workers_core)
               if args.channel else None)
    # The uvicorn settings of `pdserve serve` (its launcher), access log included.
    uvicorn.run(build_app(args.mode, args.num_instances, args.embedded_model, workers),
                host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
