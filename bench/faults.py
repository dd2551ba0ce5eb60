"""Fault harness: bounded streamed load in three phases (steady, fault, recovery) and a
final batch, with one fault injected at a precise moment and every request's ending
recorded.

(Over ~350 lines on purpose: one command with two forms, over fakes in this process and
against a live deployment; they share the phases, the per-request outcome rules and the
checks, which must be the same code for the short form in CI to vouch for the long one.)

    python -m bench.faults --fault all                       # short form, fake workers (CI)
    python -m bench.faults --url http://127.0.0.1:8000 --fault kill-decode \\
        --target ServeReplica:pdserve:decode                 # long form, a live deployment

Short form: the real router and real worker channels (msgpack over TCP) to fake workers
(2 prefill, 2 decode; greedy: the next token is a function of the sequence, so every
answer is checked token for token). Long form: any running deployment, faults by signal
to a process found by `--target` (a substring of its command line, e.g. a Serve replica's
``ray::ServeReplica:pdserve:decode``); the deployment must replace what was killed.

| fault | short form (fakes) | long form (signal) | like |
| --- | --- | --- | --- |
| `kill-prefill`, `kill-decode` | the instance's channel server closes every connection and stops listening; back on its old address after `recover_after_s` | SIGKILL | the process died (the kernel closes its sockets) |
| `stop-prefill`, `stop-decode` | connections stay open, nothing answers (no deltas, no replies, no stats) until `--timeout-s` + 1.5 s | SIGSTOP, SIGCONT after `--timeout-s` + 1.5 s | a frozen process, past every timeout |
| `stall-transfer` | decodes' KV fetches stall mid-segment (switch: `kvtransfer.testing.TRANSFER_STALL_SWITCH`) until the transfer timeout, then take the `on_failure` path | (not in the long form) | a sender that stops sending halfway |

Each request (streamed, greedy, `return_token_ids`) ends as one of: `complete`,
`retried` (complete after its prefill was retried elsewhere), `migrated` (complete after
its stream moved to another instance), `clean_error` (an HTTP error in OpenAI's format, or
an error event then `[DONE]`), `broken` (the stream ended without `[DONE]` or an error
event, or the client gave up after `--timeout-s`). Retried/migrated come from the
request's trace (`GET /v1/requests/{id}/trace`). Checks: no `broken`; nothing waited longer
than `--timeout-s`; every answer is exactly the uninterrupted one (short form), so no
token was repeated or lost; no staged KV left (fake prefills' staged sets; `/dev/shm`
segments in the long form); the final batch completes in full (capacity returned).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

FAULTS = ("kill-prefill", "kill-decode", "stop-prefill", "stop-decode", "stall-transfer")
LIVE_FAULTS = ("kill-prefill", "kill-decode", "kill-router", "stop-prefill", "stop-decode")
OUTCOMES = ("complete", "retried", "migrated", "clean_error", "broken")


@dataclass
class Ending:
    outcome: str  # one of OUTCOMES
    phase: str  # steady | fault | recovery | final
    seconds: float
    detail: str = ""
    is_exact: bool | None = None  # the answer equals the uninterrupted one (None: not checked)
    prompt: str = ""
    token_ids: list[int] = field(default_factory=list)


@dataclass
class HarnessResult:
    fault: str
    endings: list[Ending] = field(default_factory=list)
    leaked_staged: int = 0
    # Requests a worker still holds once the load is over (fakes: decodes' active streams and
    # running prefills; the engine's KV blocks of a real worker). None: not measured.
    left_on_workers: int | None = None
    timeout_s: float = 0.0
    stall_timeout_s: float | None = None
    elapsed_s: float = 0.0
    capacity_back_s: float | None = None  # fault to every instance routable again
    # Long form: each live engine's KV-cache use (0..1 of its blocks) once the load is over
    # and idle, from the router's polled stats (/dashboard/data). None: not measured.
    kv_usage_left: dict[str, float] | None = None
    # Every answer has exactly this many tokens (greedy with ignore_eos). None: not checked.
    num_tokens_expected: int | None = None
    # Long form: complete answers (not recovered) re-run as a control of the greedy re-run
    # comparison: (equal, compared).
    control_exact: tuple[int, int] | None = None

    def table(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for e in self.endings:
            out.setdefault(e.phase, {}).setdefault(e.outcome, 0)
            out[e.phase][e.outcome] += 1
        return out

    def by_outcome(self) -> dict[str, dict[str, float]]:
        """Per outcome: how many, and their longest and median time."""
        out = {}
        for outcome in OUTCOMES:
            times = sorted(e.seconds for e in self.endings if e.outcome == outcome)
            if times:
                out[outcome] = {"count": len(times), "max_s": round(times[-1], 3),
                                "median_s": round(times[len(times) // 2], 3)}
        return out

    @property
    def checks(self) -> dict[str, bool]:
        final = [e for e in self.endings if e.phase == "final"]
        held = {} if self.left_on_workers is None else {
            "no_request_left_on_a_worker": self.left_on_workers == 0}
        if self.kv_usage_left is not None:
            held["no_kv_blocks_left_on_an_engine"] = all(
                u == 0 for u in self.kv_usage_left.values())
        if self.num_tokens_expected is not None:
            held["every_answer_has_every_token"] = all(
                len(e.token_ids) == self.num_tokens_expected for e in self.endings
                if e.outcome in ("complete", "retried", "migrated"))
        return held | {
            "no_broken_stream": all(e.outcome != "broken" for e in self.endings),
            "nothing_waited_past_the_timeout": all(e.seconds <= self.timeout_s for e in self.endings),
            "no_token_repeated_or_missing": all(e.is_exact is not False for e in self.endings),
            "no_staged_kv_left": self.leaked_staged == 0,
            "full_capacity_returned": bool(final) and all(
                e.outcome in ("complete", "retried", "migrated") for e in final),
        }

    def to_dict(self) -> dict:
        return {"fault": self.fault, "timeout_s": self.timeout_s,
                "stall_timeout_s": self.stall_timeout_s, "elapsed_s": round(self.elapsed_s, 2),
                "capacity_back_s": self.capacity_back_s, "leaked_staged": self.leaked_staged,
                "left_on_workers": self.left_on_workers, "kv_usage_left": self.kv_usage_left,
                "num_tokens_expected": self.num_tokens_expected,
                "control_exact": self.control_exact,
                "by_phase": self.table(), "by_outcome": self.by_outcome(), "checks": self.checks,
                "endings": [asdict(e) for e in self.endings]}


# -- one request --------------------------------------------------------------------------
Expected = Callable[[list[int], int], list[int]]  # (prompt ids, max_tokens) -> the answer


async def one_request(http: httpx.AsyncClient, model: str, prompt: str, max_tokens: int,
                      timeout_s: float, expected: Expected | None = None) -> Ending:
    """Send one streamed greedy request; classify how it ended. `phase` is filled in by the
    caller."""
    t0 = time.monotonic()
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
            "temperature": 0.0, "stream": True, "return_token_ids": True}
    request_id = None
    try:
        async with asyncio.timeout(timeout_s):
            async with http.stream("POST", "/v1/completions", json=body) as r:
                request_id = r.headers.get("x-request-id")
                text = (await r.aread()).decode(errors="replace")
                status = r.status_code
        outcome, detail, prompt_ids, token_ids = _classify(status, text)
    except httpx.ConnectError as e:
        # No connection was made (nothing listens: a killed router before its replacement);
        # nothing was sent or half-received, and the client knows it at once.
        return Ending("clean_error", "", time.monotonic() - t0,
                      f"connection refused ({type(e).__name__})", prompt=prompt)
    except (TimeoutError, httpx.HTTPError) as e:
        return Ending("broken", "", time.monotonic() - t0,
                      f"{type(e).__name__}: client gave up or connection failed ({e})"[:160])
    seconds = time.monotonic() - t0
    is_exact = None
    if outcome == "complete":
        if expected is not None and prompt_ids is not None:
            is_exact = token_ids == expected(prompt_ids, max_tokens)
        # The id the router traces under is the body's (`X-Request-Id` is Ray Serve's own
        # behind Serve's ingress).
        request_id = _body_id(text) or request_id
        if request_id is not None:
            outcome, detail = await _recovered(http, request_id, outcome, detail)
    return Ending(outcome, "", seconds, detail, is_exact, prompt, token_ids)


async def _recovered(http: httpx.AsyncClient, request_id: str, outcome: str,
                     detail: str) -> tuple[str, str]:
    try:
        trace = (await http.get(f"/v1/requests/{request_id}/trace")).json()
    except (httpx.HTTPError, ValueError):
        return outcome, detail
    if trace.get("num_migrations"):
        reasons = ",".join(m["reason"] for m in trace["migrations"])
        return "migrated", f"{trace['num_migrations']} migration(s): {reasons}"
    if trace.get("num_prefill_retries"):
        return "retried", f"{trace['num_prefill_retries']} retry(ies): " + ",".join(
            trace["prefill_retry_reasons"])
    return outcome, detail


def _body_id(text: str) -> str | None:
    for line in text.splitlines():
        if line.startswith("data: {"):
            try:
                return json.loads(line[len("data: "):]).get("id")
            except ValueError:
                return None
    return None


def _classify(status: int, text: str) -> tuple[str, str, list[int] | None, list[int]]:
    """(outcome, detail, prompt ids, output ids) of one streamed answer."""
    events = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    if status != 200:
        try:
            err = json.loads(text)["error"]
            return "clean_error", f"HTTP {status}: {err['message'][:80]}", None, []
        except (ValueError, KeyError, TypeError):
            return "broken", f"HTTP {status} without an OpenAI error body", None, []
    if not events or events[-1] != "[DONE]":
        return "broken", "stream ended without [DONE]", None, []
    bodies = [json.loads(e) for e in events[:-1]]
    errors = [b["error"] for b in bodies if "error" in b]
    prompt_ids, token_ids = None, []
    for b in bodies:
        for c in b.get("choices", ()):
            if "prompt_token_ids" in c:
                prompt_ids = c["prompt_token_ids"]
            token_ids.extend(c.get("token_ids") or ())
    if errors:
        return "clean_error", f"error event: {errors[0]['message'][:80]}", prompt_ids, token_ids
    if not any(c.get("finish_reason") for b in bodies for c in b.get("choices", ())):
        return "broken", "[DONE] without a finish reason", prompt_ids, token_ids
    return "complete", "", prompt_ids, token_ids


# -- the load around a fault ----------------------------------------------------------------
async def drive(url: str, model: str, inject: Callable[[Callable[[str], None]], object], *,
                num_requests: int, concurrency: int, timeout_s: float, max_tokens: int,
                expected: Expected | None, is_back: Callable[[], object],
                headers: dict[str, str] | None = None, final_batch: int | None = None,
                stable_s: float = 0.0, prompt_words: int = 8,
                pause_after_error_s: float = 0.0) -> tuple[list[Ending], float | None]:
    """Closed-loop load of at least `num_requests`, and on until `inject(set_phase)` has
    returned (so the load spans the fault and the start of recovery); then, once
    `is_back()` (awaitable -> bool) has held for `stable_s`, a final batch. Request i's
    prompt is "request i " `prompt_words` times. A client that got anything but a complete
    answer waits `pause_after_error_s` before its next request (as a client backing off
    does; without it, clean 503s in ~5 ms spin the load and take the cores the replacement
    needs). Returns the endings and how long after the start of the fault phase capacity
    was back (None: never, within 120 s)."""
    endings: list[Ending] = []
    phase = {"now": "steady", "fault_at": None}

    def set_phase(name: str) -> None:
        phase["now"] = name
        if name == "fault":
            phase["fault_at"] = time.monotonic()

    async def one(http, i: int, tag: str | None = None) -> None:
        at = tag or phase["now"]
        ending = await one_request(http, model, f"request {i} " * prompt_words, max_tokens,
                                   timeout_s, expected)
        ending.phase = at
        endings.append(ending)
        if ending.outcome not in ("complete", "retried", "migrated") and pause_after_error_s:
            await asyncio.sleep(pause_after_error_s)

    back_after = None
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s + 5, headers=headers) as http:
        while True:
            try:
                if (await http.get("/health")).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.05)
        injector = asyncio.ensure_future(inject(set_phase))
        counter = iter(range(1_000_000))

        async def client() -> None:
            for i in counter:
                if i >= num_requests and injector.done():
                    return
                await one(http, i)

        await asyncio.gather(*(client() for _ in range(concurrency)))
        await injector
        # Capacity: once every instance is routable again (and stays so for stable_s), a
        # full batch completes.
        back_since = None
        deadline = time.monotonic() + 120.0
        while time.monotonic() < deadline:
            if await is_back():
                now = time.monotonic()
                if back_since is None:
                    back_since = now
                    if phase["fault_at"] is not None:
                        back_after = now - phase["fault_at"]
                if now - back_since >= stable_s:
                    break
            else:
                back_since = back_after = None
            await asyncio.sleep(0.1)
        n = final_batch if final_batch is not None else 2 * concurrency
        await asyncio.gather(*(one(http, num_requests + k, "final") for k in range(n)))
    return endings, back_after


# -- short form: fake workers behind real channels ------------------------------------------
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


def _fake_prefill_class():
    import msgspec

    from tests.fakes import FakePrefillWorker

    class AbortablePrefill(FakePrefillWorker):
        """As prefill_worker.PrefillWorker does: an abort that arrives while the prompt is
        computed releases the KV it stages (the router moved on: nobody will claim it).
        A reply already computed when the process froze is not covered: its segment waits
        for the producer's lease (kv_transfer.lease_s), as in a real deployment."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._in_flight: set[str] = set()
            self._aborted_in_flight: set[str] = set()

        async def prefill(self, req):
            self._in_flight.add(req.request_id)
            try:
                result = await super().prefill(req)
            finally:
                self._in_flight.discard(req.request_id)
            if req.request_id in self._aborted_in_flight:
                self._aborted_in_flight.discard(req.request_id)
                if result.kv_handle is not None:
                    await self.release_kv(result.kv_handle)
                return msgspec.structs.replace(result, kv_handle=None, finish_reason="abort")
            return result

        async def abort(self, request_id):
            if request_id in self._in_flight:
                self._aborted_in_flight.add(request_id)
            await super().abort(request_id)

    return AbortablePrefill


def _fake_decode_class():
    from kvtransfer.testing import transfer_stall_requested
    from tests.fakes import FakeDecodeWorker

    class StallableDecode(FakeDecodeWorker):
        """A fake decode whose KV fetch, while the stall switch is on, stalls mid-segment
        for `transfer_timeout_s` and then fails as a real fetch does (KVTransferError),
        taking the recompute path (kv_transfer.on_failure = recompute)."""

        transfer_timeout_s = 0.5

        async def generate(self, req):
            if req.kv_handle is not None and transfer_stall_requested():
                await asyncio.sleep(self.transfer_timeout_s)
                owner = next((p for p in self.prefills
                              if p.instance_id == req.kv_handle.producer_id), None)
                if owner is not None:
                    # The producer keeps its segment after a failed fetch; its lease
                    # reclaims it (here at once: fakes have no sweeper).
                    owner.claim(req.kv_handle)
                self.lose_kv = True
                try:
                    async for delta in super().generate(req):
                        yield delta
                finally:
                    self.lose_kv = False
                return
            async for delta in super().generate(req):
                yield delta

    return StallableDecode


async def run_harness(fault: str, *, num_requests: int = 60, concurrency: int = 6,
                      fault_at_s: float = 0.6, recover_after_s: float | None = None,
                      timeout_s: float = 10.0, stall_timeout_s: float | None = 1.0,
                      migration_limit: int = 2, max_tokens: int = 40,
                      token_delay_s: float = 0.01) -> HarnessResult:
    from cluster.channel import ChannelServer, WorkerChannelClient
    from cluster.config import RouterConfig, ServeConfig, SLOConfig
    from cluster.tiny_model import ensure_tiny_model
    from kvtransfer.testing import TRANSFER_STALL_SWITCH
    from router.build import build_router
    from router.tokenizer import ModelTokenizer
    from tests.fakes import next_token

    if fault not in FAULTS:
        raise ValueError(f"unknown fault {fault!r}; one of {', '.join(FAULTS)}")
    if recover_after_s is None:  # a stopped instance stays stopped past every timeout
        recover_after_s = timeout_s + 1.5 if fault.startswith("stop") else 2.0
    prefill_fakes = [_fake_prefill_class()(f"prefill-{i}") for i in range(2)]
    decode_class = _fake_decode_class()
    decode_fakes = [decode_class(f"decode-{i}", prefills=prefill_fakes,
                                 token_delay_s=token_delay_s) for i in range(2)]
    workers = [_Frozen(w) for w in prefill_fakes + decode_fakes]
    servers = [ChannelServer(w) for w in workers]
    addresses = [await s.start() for s in servers]
    clients = [WorkerChannelClient(a, w.instance_id, "prefill" if i < 2 else "decode")
               for i, (a, w) in enumerate(zip(addresses, workers))]
    router_config = RouterConfig(stats_interval_s=0.1, max_queued_requests=4096,
                                 stream_stall_timeout_s=stall_timeout_s,
                                 migration_limit=migration_limit, breaker_open_s=1.0)
    config = ServeConfig(slo=SLOConfig(ttft_s=1.0, tpot_s=0.1), router=router_config)
    app, deps = build_router(config, ModelTokenizer(ensure_tiny_model("tiny")), "pdserve-tiny",
                             prefill=clients[:2], decode=clients[2:])
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    serving = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    target = {"kill-decode": 2, "kill-prefill": 0, "stop-decode": 2, "stop-prefill": 0,
              "stall-transfer": None}[fault]
    result = HarnessResult(fault=fault, timeout_s=timeout_s, stall_timeout_s=stall_timeout_s)
    started = time.monotonic()
    switch = Path(os.environ.get(TRANSFER_STALL_SWITCH, ""))

    async def inject(set_phase) -> None:
        await asyncio.sleep(fault_at_s)
        set_phase("fault")
        if fault.startswith("kill"):
            await servers[target].close()
        elif fault.startswith("stop"):
            workers[target].thawed.clear()
        else:
            switch.touch()
        await asyncio.sleep(recover_after_s)
        set_phase("recovery")
        if fault.startswith("kill"):
            port = int(addresses[target].rsplit(":", 1)[1])
            servers[target] = ChannelServer(workers[target], "127.0.0.1", port)
            await servers[target].start()
        elif fault.startswith("stop"):
            workers[target].thawed.set()
        else:
            switch.unlink(missing_ok=True)

    async def is_back() -> bool:
        return all(v.is_available for v in deps.pool.all())

    def expected(prompt_ids: list[int], n: int) -> list[int]:
        ids = list(prompt_ids)
        for _ in range(n):
            ids.append(next_token(ids))
        return ids[len(prompt_ids):]

    if fault == "stall-transfer" and not str(switch):
        raise ValueError(f"stall-transfer needs {TRANSFER_STALL_SWITCH} set to a switch file path")
    try:
        result.endings, result.capacity_back_s = await drive(
            url, "pdserve-tiny", inject, num_requests=num_requests, concurrency=concurrency,
            timeout_s=timeout_s, max_tokens=max_tokens, expected=expected, is_back=is_back)
        await asyncio.sleep(0.5)
        result.leaked_staged = sum(len(p.staged) for p in prefill_fakes)
        result.left_on_workers = (sum(len(d.active) for d in decode_fakes)
                                  + sum(p.running for p in prefill_fakes))
    finally:
        server.should_exit = True
        await serving
        for c in clients:
            await c.close()
        for s in servers:
            await s.close()
        for w in workers:
            w.thawed.set()
        if fault == "stall-transfer":
            switch.unlink(missing_ok=True)
    result.elapsed_s = time.monotonic() - started
    return result


# -- long form: a live deployment, faults by signal ------------------------------------------
def find_target(pattern: str) -> int:
    """The pid of one process whose command line contains `pattern` (the newest one)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "create_time"]):
        cmd = " ".join(proc.info["cmdline"] or ())
        if pattern in cmd and proc.info["pid"] != os.getpid():
            found.append((proc.info["create_time"], proc.info["pid"]))
    if not found:
        raise LookupError(f"no process has {pattern!r} in its command line")
    return max(found)[1]


def staged_on_host(staging_dir: Path = Path("/dev/shm")) -> int:
    return len(list(staging_dir.glob("pdserve-kv-*")))


async def _instances_ready(http: httpx.AsyncClient) -> dict[str, int]:
    text = (await http.get("/metrics")).text
    ready: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith("pdserve_instances{") and 'state="ready"' in line:
            role = line.split('role="', 1)[1].split('"', 1)[0]
            ready[role] = int(float(line.rsplit(" ", 1)[1]))
    return ready


async def _engines_idle(http: httpx.AsyncClient) -> tuple[int | None, dict[str, float] | None]:
    """(requests the live engines still run or queue, each engine's KV-cache use) from the
    router's latest stats poll (`/dashboard/data`); (None, None) if it cannot be read.
    vLLM counts a freed block, prefix-cached or not, as free: an idle engine reads 0.0."""
    try:
        rows = (await http.get("/dashboard/data")).json()["pool"]
    except (httpx.HTTPError, ValueError, KeyError):
        return None, None
    rows = [r for r in rows if r["is_healthy"] and r["kv_cache_usage"] is not None]
    held = sum(r["num_running_reqs"] + r["num_waiting_reqs"] for r in rows)
    return held, {f'{r["role"]}/{r["instance_id"]}': r["kv_cache_usage"] for r in rows}


async def run_live(url: str, model: str, fault: str, target: str, *, num_requests: int = 60,
                   concurrency: int = 4, fault_at_s: float = 5.0, timeout_s: float = 60.0,
                   stall_timeout_s: float | None = None, max_tokens: int = 32,
                   api_key: str | None = None, settle_s: float = 10.0, prompt_words: int = 8,
                   num_controls: int = 8) -> HarnessResult:
    """The same phases against a running deployment; the fault is a signal to `target`.
    Once idle: staged segments in /dev/shm and each engine's KV-cache use (the router's
    polled engine stats), then every retried or migrated answer, and `num_controls`
    answers that were not, compared token for token with the same greedy request sent
    again."""
    if fault not in LIVE_FAULTS:
        raise ValueError(f"unknown fault {fault!r}; one of {', '.join(LIVE_FAULTS)}")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    result = HarnessResult(fault=fault, timeout_s=timeout_s, stall_timeout_s=stall_timeout_s,
                           num_tokens_expected=max_tokens)
    hold_s = timeout_s + 1.5
    async with httpx.AsyncClient(base_url=url, timeout=10, headers=headers) as http:
        before = await _instances_ready(http)
        staged_before = staged_on_host()

        async def is_back() -> bool:
            try:
                now = await _instances_ready(http)
            except httpx.HTTPError:
                return False
            return all(now.get(role, 0) >= n for role, n in before.items())

        async def inject(set_phase) -> None:
            await asyncio.sleep(fault_at_s)
            pid = find_target(target)
            set_phase("fault")
            if fault.startswith("kill"):
                # The replica and its descendants (the vLLM engine core), as the loss of
                # its container would; an orphaned engine core would hold cores and memory.
                import psutil

                doomed = [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]
                for p in doomed:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(p, signal.SIGKILL)
                await asyncio.sleep(5.0)
            else:
                os.kill(pid, signal.SIGSTOP)
                try:
                    await asyncio.sleep(hold_s)
                finally:
                    os.kill(pid, signal.SIGCONT)
            set_phase("recovery")

        started = time.monotonic()
        # A killed router replica takes its port down: the load must reach the others, or
        # wait for the replacement; the client timeout bounds it either way.
        result.endings, result.capacity_back_s = await drive(
            url, model, inject, num_requests=num_requests, concurrency=concurrency,
            timeout_s=timeout_s, max_tokens=max_tokens, expected=None, is_back=is_back,
            headers=headers, stable_s=10.0, prompt_words=prompt_words, pause_after_error_s=0.2)
        await asyncio.sleep(settle_s)
        result.leaked_staged = max(0, staged_on_host() - staged_before)
        result.left_on_workers, result.kv_usage_left = await _engines_idle(http)
        # Recovered answers against the same greedy request on the healthy deployment; a
        # few that were not recovered as a control (greedy on these engines is
        # deterministic, so a difference in a recovered one is the recovery's).
        controls = [e for e in result.endings if e.outcome == "complete"][:num_controls]
        equal = 0
        async with httpx.AsyncClient(base_url=url, timeout=timeout_s, headers=headers) as again:
            for e in result.endings:
                if e.outcome in ("retried", "migrated") or any(e is c for c in controls):
                    rerun = await one_request(again, model, e.prompt, max_tokens, timeout_s)
                    is_exact = rerun.token_ids == e.token_ids if rerun.outcome == "complete" else None
                    if e.outcome == "complete":
                        equal += bool(is_exact)
                    else:
                        e.is_exact = is_exact
        result.control_exact = (equal, len(controls))
        result.elapsed_s = time.monotonic() - started
    return result


# -- command --------------------------------------------------------------------------------
def _print(result: HarnessResult) -> None:
    waits = [e.seconds for e in result.endings] or [0.0]
    print(f"{result.fault}: {json.dumps(result.table())}  by outcome "
          f"{json.dumps(result.by_outcome())}  longest wait {max(waits):.2f} s  "
          f"staged left {result.leaked_staged}  engine KV use left "
          f"{json.dumps(result.kv_usage_left)}  requests left on engines {result.left_on_workers}  "
          f"control reruns equal {result.control_exact}  capacity back after "
          f"{result.capacity_back_s if result.capacity_back_s is None else round(result.capacity_back_s, 1)} s  "
          f"checks {json.dumps(result.checks)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__.split("\n\n")[0])
    p.add_argument("--fault", choices=sorted(set(FAULTS) | set(LIVE_FAULTS)) + ["all"], default="all")
    p.add_argument("--requests", type=int, default=60)
    p.add_argument("--concurrency", type=int, default=6)
    p.add_argument("--timeout-s", type=float, default=10.0, help="client timeout per request")
    p.add_argument("--stall-timeout-s", type=float, default=1.0,
                   help="short form: the router's stream_stall_timeout_s")
    p.add_argument("--url", help="long form: a running deployment")
    p.add_argument("--model", default="pdserve-tiny")
    p.add_argument("--target", help="long form: command-line substring of the process to signal")
    p.add_argument("--fault-at-s", type=float, default=None)
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--prompt-words", type=int, default=8,
                   help="long form: request i's prompt is 'request i ' this many times")
    p.add_argument("--api-key", default=os.environ.get("PDSERVE_API_KEY"))
    p.add_argument("--output", type=Path, help="write the results as JSON")
    args = p.parse_args(argv)
    ok = True
    results = []
    if args.url:
        if args.fault == "all" or not args.target:
            p.error("the long form needs one --fault and its --target")
        result = asyncio.run(run_live(
            args.url, args.model, args.fault, args.target, num_requests=args.requests,
            concurrency=args.concurrency, timeout_s=args.timeout_s,
            fault_at_s=args.fault_at_s if args.fault_at_s is not None else 5.0,
            max_tokens=args.max_tokens or 32, api_key=args.api_key,
            prompt_words=args.prompt_words))
        results.append(result)
        _print(result)
        ok = all(result.checks.values())
    else:
        for fault in (FAULTS if args.fault == "all" else (args.fault,)):
            if fault == "stall-transfer" and not os.environ.get("PDSERVE_TEST_TRANSFER_STALL"):
                import tempfile

                os.environ["PDSERVE_TEST_TRANSFER_STALL"] = os.path.join(
                    tempfile.mkdtemp(prefix="pdserve-faults-"), "stall")
            result = asyncio.run(run_harness(
                fault, num_requests=args.requests, concurrency=args.concurrency,
                timeout_s=args.timeout_s, stall_timeout_s=args.stall_timeout_s,
                **({"fault_at_s": args.fault_at_s} if args.fault_at_s is not None else {}),
                **({"max_tokens": args.max_tokens} if args.max_tokens else {})))
            results.append(result)
            _print(result)
            ok = ok and all(result.checks.values())
    if args.output:
        args.output.write_text(json.dumps([r.to_dict() for r in results], indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
