"""Fault harness, short form: bounded load through the real router and real worker
channels (msgpack over TCP) to fake workers, in three phases, with a fault injected at a
precise moment, and every request's ending recorded.

    python -m bench.faults --fault kill-decode --requests 60

Phases: *steady* (load starts), *fault* (at `--fault-at-s` the fault is injected),
*recovery* (at `--recover-at-s` the instance comes back on its old address); then a final
batch checks that full capacity returned. Faults:

| fault | what the router sees | like |
| --- | --- | --- |
| `kill-decode`, `kill-prefill` | the instance's channel server closes every connection and stops listening | SIGKILL of the worker process (the kernel closes its sockets) |
| `stop-decode` | connections stay open, nothing answers: no deltas, no stats, until `--timeout-s` + 1.5 s have passed | SIGSTOP past every timeout |

Each request (streamed) ends as one of: `complete` (finish reason and `data: [DONE]`),
`clean_error` (an HTTP error in OpenAI's format, or an error event then `[DONE]`),
`broken` (the stream ended without either, or the client gave up after `--timeout-s`).
Checks: no `broken`, nothing waited longer than `--timeout-s`, no staged KV left on the
prefills once their decodes are back, and the final batch completes in full.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass, field

import httpx
import uvicorn

FAULTS = ("kill-decode", "kill-prefill", "stop-decode")


@dataclass
class Ending:
    outcome: str  # complete | clean_error | broken
    phase: str  # steady | fault | recovery | final
    seconds: float
    detail: str = ""


@dataclass
class HarnessResult:
    fault: str
    endings: list[Ending] = field(default_factory=list)
    leaked_staged: int = 0
    timeout_s: float = 0.0

    def table(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for e in self.endings:
            out.setdefault(e.phase, {}).setdefault(e.outcome, 0)
            out[e.phase][e.outcome] += 1
        return out

    @property
    def checks(self) -> dict[str, bool]:
        final = [e for e in self.endings if e.phase == "final"]
        return {
            "no_broken_stream": all(e.outcome != "broken" for e in self.endings),
            "nothing_waited_past_the_timeout": all(e.seconds <= self.timeout_s for e in self.endings),
            "no_staged_kv_left": self.leaked_staged == 0,
            "full_capacity_returned": bool(final) and all(e.outcome == "complete" for e in final),
        }


class _Frozen:
    """Wraps a fake worker so that, once frozen, no call returns (SIGSTOP's view)."""

    def __init__(self, worker):
        self._worker = worker
        self.instance_id = worker.instance_id
        self.thawed = asyncio.Event()
        self.thawed.set()

    async def _gate(self):
        await self.thawed.wait()

    async def prefill(self, req):
        await self._gate()
        return await self._worker.prefill(req)

    async def release_kv(self, handle):
        await self._gate()
        return await self._worker.release_kv(handle)

    async def abort(self, request_id):
        await self._gate()
        return await self._worker.abort(request_id)

    async def stats(self):
        await self._gate()
        return await self._worker.stats()

    async def generate(self, req):
        await self._gate()
        async for delta in self._worker.generate(req):
            await self._gate()
            yield delta


async def run_harness(fault: str, *, num_requests: int = 60, concurrency: int = 6,
                      fault_at_s: float = 0.6, recover_at_s: float | None = None,
                      timeout_s: float = 10.0,
                      max_tokens: int = 40, token_delay_s: float = 0.01) -> HarnessResult:
    from cluster.channel import ChannelServer, WorkerChannelClient
    from cluster.config import RouterConfig, ServeConfig, SLOConfig
    from cluster.tiny_model import ensure_tiny_model
    from router.build import build_router
    from router.tokenizer import ModelTokenizer
    from tests.fakes import FakeDecodeWorker, FakePrefillWorker

    if fault not in FAULTS:
        raise ValueError(f"unknown fault {fault!r}; one of {', '.join(FAULTS)}")
    if recover_at_s is None:  # a stopped instance stays stopped past every timeout
        recover_at_s = fault_at_s + (timeout_s + 1.5 if fault == "stop-decode" else 2.0)
    prefill_fakes = [FakePrefillWorker(f"prefill-{i}") for i in range(2)]
    decode_fakes = [FakeDecodeWorker(f"decode-{i}", prefills=prefill_fakes,
                                     token_delay_s=token_delay_s) for i in range(2)]
    workers = [_Frozen(w) for w in prefill_fakes + decode_fakes]
    servers = [ChannelServer(w) for w in workers]
    addresses = [await s.start() for s in servers]
    clients = [WorkerChannelClient(a, w.instance_id, "prefill" if i < 2 else "decode")
               for i, (a, w) in enumerate(zip(addresses, workers))]
    config = ServeConfig(slo=SLOConfig(ttft_s=1.0, tpot_s=0.1),
                         router=RouterConfig(stats_interval_s=0.1, max_queued_requests=4096))
    app, deps = build_router(config, ModelTokenizer(ensure_tiny_model("tiny")), "pdserve-tiny",
                             prefill=clients[:2], decode=clients[2:])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    serving = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    target = {"kill-decode": 2, "kill-prefill": 0, "stop-decode": 2}[fault]
    result = HarnessResult(fault=fault, timeout_s=timeout_s)
    started = time.monotonic()
    phase = "steady"

    async def inject() -> None:
        nonlocal phase
        await asyncio.sleep(fault_at_s)
        phase = "fault"
        if fault.startswith("kill"):
            await servers[target].close()
        else:
            workers[target].thawed.clear()
        await asyncio.sleep(recover_at_s - fault_at_s)
        phase = "recovery"
        if fault.startswith("kill"):
            port = int(addresses[target].rsplit(":", 1)[1])
            servers[target] = ChannelServer(workers[target], "127.0.0.1", port)
            await servers[target].start()
        else:
            workers[target].thawed.set()

    async def one(http: httpx.AsyncClient, i: int, tag: str | None = None) -> None:
        t0 = time.monotonic()
        at = tag or phase
        body = {"model": "pdserve-tiny", "prompt": f"request {i} " * 8, "max_tokens": max_tokens,
                "ignore_eos": True, "stream": True}
        try:
            async with asyncio.timeout(timeout_s):
                async with http.stream("POST", "/v1/completions", json=body) as r:
                    text = (await r.aread()).decode(errors="replace")
                    status = r.status_code
            ending = _classify(status, text)
        except (TimeoutError, httpx.HTTPError) as e:
            ending = ("broken", f"{type(e).__name__}: client gave up or connection failed")
        result.endings.append(Ending(ending[0], at, time.monotonic() - t0, ending[1]))

    try:
        async with httpx.AsyncClient(base_url=url, timeout=timeout_s + 5) as http:
            while (await http.get("/health")).status_code != 200:
                await asyncio.sleep(0.02)
            injector = asyncio.create_task(inject())
            queue = iter(range(num_requests))

            async def client() -> None:
                for i in queue:
                    await one(http, i)

            await asyncio.gather(*(client() for _ in range(concurrency)))
            await injector
            # Capacity: once the instance is back and polled healthy, a full batch completes.
            for _ in range(100):
                if all(v.is_available for v in deps.pool.all()):
                    break
                await asyncio.sleep(0.05)
            await asyncio.gather(*(one(http, num_requests + k, "final") for k in range(2 * concurrency)))
        await asyncio.sleep(0.5)
        result.leaked_staged = sum(len(p.staged) for p in prefill_fakes)
    finally:
        server.should_exit = True
        await serving
        for c in clients:
            await c.close()
        for s in servers:
            await s.close()
        for w in workers:
            w.thawed.set()
    result.elapsed_s = time.monotonic() - started  # type: ignore[attr-defined]
    return result


def _classify(status: int, text: str) -> tuple[str, str]:
    events = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    if status != 200:
        try:
            err = json.loads(text)["error"]
            return "clean_error", f"HTTP {status}: {err['message'][:80]}"
        except (ValueError, KeyError, TypeError):
            return "broken", f"HTTP {status} without an OpenAI error body"
    if not events or events[-1] != "[DONE]":
        return "broken", "stream ended without [DONE]"
    bodies = [json.loads(e) for e in events[:-1]]
    errors = [b["error"] for b in bodies if "error" in b]
    if errors:
        return "clean_error", f"error event: {errors[0]['message'][:80]}"
    if not any(c.get("finish_reason") for b in bodies for c in b.get("choices", ())):
        return "broken", "[DONE] without a finish reason"
    return "complete", ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__.split("\n\n")[0])
    p.add_argument("--fault", choices=FAULTS + ("all",), default="all")
    p.add_argument("--requests", type=int, default=60)
    p.add_argument("--concurrency", type=int, default=6)
    p.add_argument("--timeout-s", type=float, default=10.0)
    args = p.parse_args(argv)
    ok = True
    for fault in (FAULTS if args.fault == "all" else (args.fault,)):
        result = asyncio.run(run_harness(fault, num_requests=args.requests,
                                         concurrency=args.concurrency, timeout_s=args.timeout_s))
        waits = [e.seconds for e in result.endings]
        print(f"{fault}: {json.dumps(result.table())}  longest wait {max(waits):.2f} s  "
              f"staged left {result.leaked_staged}  checks {json.dumps(result.checks)}")
        ok = ok and all(result.checks.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
