"""A soak: bounded load against a running pdserve for N minutes, sampling what leaks.

(Just over ~350 lines: one command; its load loop, its samplers (RSS, file descriptors,
staged segments, Ray's object store) and the flatness verdict share one report.)

    python -m bench.soak --url http://127.0.0.1:8000 --minutes 10 --pid <pdserve serve pid>

Load: `--concurrency` closed-loop clients, each sending one request after another (half
streamed, half whole), fixed prompt length and `max_tokens`: the offered load stays
bounded however fast or slow the server is. Every `--interval-s` (60 s) it samples:

- RSS and open file descriptors of every pdserve process: the `--pid` roots and all their
  descendants (for a local `pdserve serve`: the router, Ray's GCS and raylet, every worker
  actor), else every process whose command line names pdserve or a Ray worker;
- staged KV segments (files named ``pdserve-kv-*``) in `--staging-dir` (/dev/shm);
- Ray object-store use (Ray's own memory summary, `ray memory --stats-only`), from the GCS
  at `--ray-address`, else the GCS of the Ray among the sampled processes (a local
  `pdserve serve` starts Ray with `ray.init()`, which publishes no address for `auto`:
  its `gcs_server` command line names the session directory, which holds the port).

After the load it waits for in-flight requests to end and samples once more. It prints a
table per sample and the least-squares slope of each series per minute, over the samples
after the first (allocator and cache warm-up), and with `--check` exits 1 unless every
slope is within its bound and no staged segment is left: the target is flat.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

SEGMENT_GLOB = "pdserve-kv-*"


@dataclass
class Sample:
    t_s: float
    rss_mib: dict[str, float]  # "pid name" -> RSS
    num_fds: dict[str, int]
    num_segments: int
    segment_mib: float
    object_store_mib: float | None
    num_ok: int  # requests completed so far
    num_failed: int
    num_rejected: int  # 429 (admission control; not a failure of the soak)

    @property
    def total_rss_mib(self) -> float:
        return sum(self.rss_mib.values())

    @property
    def total_fds(self) -> int:
        return sum(self.num_fds.values())


@dataclass
class SoakResult:
    samples: list[Sample] = field(default_factory=list)
    slopes_per_min: dict[str, float] = field(default_factory=dict)
    verdicts: dict[str, bool] = field(default_factory=dict)
    statuses: dict[str, int] = field(default_factory=dict)

    @property
    def is_flat(self) -> bool:
        return all(self.verdicts.values())


# -- what is sampled -----------------------------------------------------------------------
def pdserve_processes(roots: list[int]) -> list[psutil.Process]:
    """The roots and their descendants; without roots, processes naming pdserve or Ray
    workers in their command line."""
    found: dict[int, psutil.Process] = {}
    if roots:
        for pid in roots:
            try:
                root = psutil.Process(pid)
                found[pid] = root
                found.update({c.pid: c for c in root.children(recursive=True)})
            except psutil.NoSuchProcess:
                continue
        return list(found.values())
    me = psutil.Process().pid
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or ())
        if proc.info["pid"] != me and ("pdserve" in cmd or cmd.startswith("ray::")) \
                and "bench.soak" not in cmd:
            found[proc.info["pid"]] = proc
    return list(found.values())


def _label(proc: psutil.Process) -> str:
    try:
        cmd = proc.cmdline()
        name = cmd[0].rsplit("/", 1)[-1] if cmd else proc.name()
        if name.startswith("ray::"):
            name = cmd[0]
        elif "-m" in cmd:
            name = f"{name} -m {cmd[cmd.index('-m') + 1]}" if cmd.index("-m") + 1 < len(cmd) else name
        return f"{proc.pid} {name[:40]}"
    except (psutil.Error, IndexError):
        return f"{proc.pid} ?"


def process_figures(procs: list[psutil.Process]) -> tuple[dict[str, float], dict[str, int]]:
    rss: dict[str, float] = {}
    fds: dict[str, int] = {}
    for proc in procs:
        try:
            label = _label(proc)
            rss[label] = proc.memory_info().rss / 2**20
            fds[label] = proc.num_fds()
        except psutil.Error:
            continue  # gone between listing and reading
    return rss, fds


def staged_segments(staging_dir: Path) -> tuple[int, float]:
    files = list(Path(staging_dir).glob(SEGMENT_GLOB))
    size = 0
    for f in files:
        try:
            size += f.stat().st_size
        except FileNotFoundError:
            pass
    return len(files), size / 2**20


_PLASMA = re.compile(r"Plasma memory usage\s+([\d.]+)\s*MiB")


def gcs_address(procs: list[psutil.Process]) -> str | None:
    """The GCS address of the Ray whose `gcs_server` is among `procs`: its node address and
    the port it wrote to its session directory (`gcs_server_port_<node id>`)."""
    for proc in procs:
        try:
            cmd = proc.cmdline()
        except psutil.Error:
            continue
        if not cmd or not cmd[0].endswith("gcs_server"):
            continue
        args = dict(a.split("=", 1) for a in cmd[1:] if a.startswith("--") and "=" in a)
        session, host = args.get("--session-dir"), args.get("--node-ip-address")
        if not session or not host:
            continue
        for port_file in Path(session).glob("gcs_server_port_*"):
            port = port_file.read_text().strip()
            if port.isdigit():
                return f"{host}:{port}"
    return None


def object_store_mib(ray_address: str | None) -> float | None:
    """Object-store bytes in use across the cluster (Ray's `ray memory --stats-only`);
    None when there is no Ray to ask or it cannot be reached."""
    if ray_address is None:
        return None
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
        from ray._private.internal_api import memory_summary

        # Ray 2.60 turns token authentication on for a local ray.init() cluster: present
        # the token (~/.ray/auth_token, or RAY_AUTH_TOKEN[_PATH]) as `ray.init` would.
        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
        text = memory_summary(address=ray_address, stats_only=True)
    except Exception:  # Ray absent, unreachable, or its internal API moved
        return None
    match = _PLASMA.search(text)
    return float(match.group(1)) if match else 0.0


# -- load ------------------------------------------------------------------------------------
class Load:
    def __init__(self, url: str, model: str, concurrency: int, prompt_words: int,
                 max_tokens: int, api_key: str | None, timeout_s: float):
        self.url = url.rstrip("/")
        self.model = model
        self.concurrency = concurrency
        self.prompt_words = prompt_words
        self.max_tokens = max_tokens
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout_s = timeout_s
        self.num_ok = self.num_failed = self.num_rejected = 0
        self.statuses: dict[str, int] = {}

    async def run(self, until_s: float) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=self.timeout_s,
                                     headers=self.headers) as client:
            await asyncio.gather(*(self._client(client, i, until_s) for i in range(self.concurrency)))

    async def _client(self, client: httpx.AsyncClient, index: int, until_s: float) -> None:
        n = 0
        while time.monotonic() < until_s:
            n += 1
            words = " ".join(f"w{(index * 7919 + n * 31 + k) % 997}" for k in range(self.prompt_words))
            body = {"model": self.model, "prompt": words, "max_tokens": self.max_tokens,
                    "ignore_eos": True, "stream": n % 2 == 0}
            outcome = await self._one(client, body)
            self.statuses[outcome] = self.statuses.get(outcome, 0) + 1

    async def _one(self, client: httpx.AsyncClient, body: dict[str, Any]) -> str:
        try:
            if body["stream"]:
                async with client.stream("POST", "/v1/completions", json=body) as r:
                    text = (await r.aread()).decode()
                    status = r.status_code
                complete = text.rstrip().endswith("data: [DONE]") and '"error"' not in text
            else:
                r = await client.post("/v1/completions", json=body)
                status = r.status_code
                complete = status == 200 and r.json()["usage"]["completion_tokens"] == self.max_tokens
        except (httpx.HTTPError, ValueError) as e:
            self.num_failed += 1
            return type(e).__name__
        if status == 429:
            self.num_rejected += 1
        elif status == 200 and complete:
            self.num_ok += 1
        else:
            self.num_failed += 1
        return str(status) if complete or status != 200 else "200-incomplete"


# -- the run ---------------------------------------------------------------------------------
def slope_per_min(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, per minute."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return 0.0
    return 60.0 * sum((t - mean_t) * (v - mean_v) for t, v in points) / var


def judge(result: SoakResult, max_rss_mib_per_min: float, max_fds_per_min: float,
          max_store_mib_per_min: float) -> None:
    samples = result.samples
    steady = samples[1:] if len(samples) >= 3 else samples  # after warm-up
    series: dict[str, list[tuple[float, float]]] = {
        "total_rss_mib": [(s.t_s, s.total_rss_mib) for s in steady],
        "total_fds": [(s.t_s, float(s.total_fds)) for s in steady],
        "staged_segments": [(s.t_s, float(s.num_segments)) for s in steady],
    }
    labels = {k for s in steady for k in s.rss_mib}
    for label in sorted(labels):
        series[f"rss_mib[{label}]"] = [(s.t_s, s.rss_mib[label]) for s in steady if label in s.rss_mib]
        series[f"fds[{label}]"] = [(s.t_s, float(s.num_fds[label])) for s in steady
                                   if label in s.num_fds]
    if all(s.object_store_mib is not None for s in steady):
        series["object_store_mib"] = [(s.t_s, s.object_store_mib) for s in steady]  # type: ignore[misc]
    result.slopes_per_min = {name: slope_per_min(pts) for name, pts in series.items()}
    for name, slope in result.slopes_per_min.items():
        if name.startswith("rss_mib["):
            result.verdicts[name] = slope <= max_rss_mib_per_min
        elif name.startswith("fds[") or name == "total_fds":
            result.verdicts[name] = slope <= max_fds_per_min
        elif name == "object_store_mib":
            result.verdicts[name] = slope <= max_store_mib_per_min
    result.verdicts["no_staged_segment_left"] = samples[-1].num_segments == 0
    result.verdicts["no_failed_request"] = samples[-1].num_failed == 0
    result.verdicts["requests_served"] = samples[-1].num_ok > 0


async def soak(args: argparse.Namespace) -> SoakResult:
    load = Load(args.url, args.model, args.concurrency, args.prompt_words, args.max_tokens,
                args.api_key, args.request_timeout_s)
    result = SoakResult()
    started = time.monotonic()
    until = started + args.minutes * 60.0

    def sample() -> Sample:
        procs = pdserve_processes(args.pid)
        rss, fds = process_figures(procs)
        segments, segment_mib = staged_segments(args.staging_dir)
        s = Sample(t_s=time.monotonic() - started, rss_mib=rss, num_fds=fds,
                   num_segments=segments, segment_mib=segment_mib,
                   object_store_mib=object_store_mib(args.ray_address or gcs_address(procs)),
                   num_ok=load.num_ok, num_failed=load.num_failed, num_rejected=load.num_rejected)
        result.samples.append(s)
        _print_sample(s)
        return s

    _print_header()
    sample()
    runner = asyncio.create_task(load.run(until))
    next_at = started + args.interval_s
    while not runner.done():
        await asyncio.wait({runner}, timeout=max(0.0, next_at - time.monotonic()))
        if time.monotonic() >= next_at - 0.01:
            sample()
            next_at += args.interval_s
    await runner  # the load has ended: every request finished (or failed) by now
    await asyncio.sleep(args.settle_s)  # releases, acks and leases after the last request
    sample()
    result.statuses = dict(load.statuses)
    judge(result, args.max_rss_mib_per_min, args.max_fds_per_min, args.max_store_mib_per_min)
    return result


def _print_header() -> None:
    print(f"{'t (min)':>8} {'ok':>7} {'failed':>7} {'429':>5} {'procs':>6} {'RSS MiB':>9} "
          f"{'fds':>6} {'segments':>9} {'store MiB':>10}", flush=True)


def _print_sample(s: Sample) -> None:
    store = "n/a" if s.object_store_mib is None else f"{s.object_store_mib:.1f}"
    print(f"{s.t_s / 60:8.2f} {s.num_ok:7d} {s.num_failed:7d} {s.num_rejected:5d} "
          f"{len(s.rss_mib):6d} {s.total_rss_mib:9.1f} {s.total_fds:6d} {s.num_segments:9d} "
          f"{store:>10}", flush=True)


def _print_result(result: SoakResult) -> None:
    print("\nslopes per minute (samples after the first):")
    for name, slope in sorted(result.slopes_per_min.items()):
        verdict = result.verdicts.get(name)
        mark = "" if verdict is None else ("  ok" if verdict else "  NOT FLAT")
        print(f"  {name:60s} {slope:+10.3f}{mark}")
    print("statuses:", result.statuses)
    print("verdict:", "flat" if result.is_flat else "NOT flat: " + ", ".join(
        k for k, v in result.verdicts.items() if not v))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="the pdserve router, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", default="pdserve-tiny")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--interval-s", type=float, default=60.0, help="time between samples")
    p.add_argument("--concurrency", type=int, default=4, help="closed-loop clients")
    p.add_argument("--prompt-words", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--api-key", default=None)
    p.add_argument("--request-timeout-s", type=float, default=120.0)
    p.add_argument("--pid", type=int, action="append", default=[],
                   help="root process (repeatable): it and its descendants are sampled")
    p.add_argument("--staging-dir", type=Path, default=Path("/dev/shm"))
    p.add_argument("--ray-address", default=None, help="the GCS to ask for object-store use "
                   "(default: the GCS among the sampled processes)")
    p.add_argument("--settle-s", type=float, default=5.0, help="wait after the load, then sample")
    p.add_argument("--max-rss-mib-per-min", type=float, default=2.0)
    p.add_argument("--max-fds-per-min", type=float, default=0.5)
    p.add_argument("--max-store-mib-per-min", type=float, default=1.0)
    p.add_argument("--output", type=Path, default=None, help="write samples and slopes as JSON")
    p.add_argument("--check", action="store_true", help="exit 1 unless every series is flat")
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.interval_s <= 0 or args.concurrency < 1:
        p.error("--minutes, --interval-s and --concurrency must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = asyncio.run(soak(args))
    except KeyboardInterrupt:
        return 130
    _print_result(result)
    if args.output is not None:
        args.output.write_text(json.dumps({
            "samples": [asdict(s) for s in result.samples], "slopes_per_min": result.slopes_per_min,
            "verdicts": result.verdicts, "statuses": result.statuses}, indent=1))
    return 0 if (result.is_flat or not args.check) else 1


if __name__ == "__main__":
    sys.exit(main())
