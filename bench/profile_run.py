"""Profile a serving deployment at saturation: py-spy on its processes under `vllm bench serve`.

    python -m bench.profile_run serve --config deploy/configs/disaggregated.yaml \\
        --rate 32 --output-dir /tmp/prof-disagg
    python -m bench.profile_run router-alone --mode colocated --output-dir /tmp/prof-router

`serve` starts `pdserve serve --config FILE` (or `--serve-command`), warms it up, drives
it with vLLM's client (`bench.vllm_client bench serve`, random 512/64 prompts, Poisson
arrivals at `--rate`), and while the load runs records every Python process of the
deployment with py-spy (`--rate 100 --nonblocking --format raw`) for `--duration-s`,
together with each process's CPU time from /proc. `router-alone` does the same for the
router over zero-latency workers (`bench.router_alone`; `--channel`: in another process
behind worker channels) pinned to `--router-core`, the client, py-spy (and the fake
workers) on `--client-core`, at `--request-rate inf` with `--max-concurrency`.

Writes: `<process>.txt` (py-spy raw stacks), `cpu.json` (CPU seconds per process over
the window), `client.json` (vLLM's result with per-request details), `summary.txt`
(per-stage CPU per request and per token; see `bench.profile_summary`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench.profile_summary import format_report

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _python() -> str:
    return sys.executable


def _py_spy() -> str:
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else (shutil.which("py-spy") or "py-spy")


def _serve_module() -> str:
    """The module of `pdserve serve` in the tree on sys.path (it moved between versions)."""
    import importlib.util

    for name in ("pdserve.cli", "cluster.cli"):
        try:
            if importlib.util.find_spec(name) is not None:
                return name
        except ModuleNotFoundError:
            continue
    raise SystemExit("profile_run: cannot find pdserve's CLI module")


def _wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"profile_run: server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("profile_run: server not healthy in time")


def _session_processes(sid: int) -> dict[int, str]:
    """pid -> short name of every process in session `sid`."""
    out: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[3]) != sid:  # field 6 (session) after pid and comm
            continue
        out[int(entry.name)] = cmdline.strip() or stat[stat.index("(") + 1:stat.rindex(")")]
    return out


def _cpu_s(pid: int) -> float | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime + stime


def _short_name(pid: int, cmdline: str) -> str:
    m = re.match(r"(ray::\S+|VLLM::\S+)", cmdline)
    if m:
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", m.group(1))
    if "--host-workers" in cmdline:
        return "fake-workers"
    if "bench.router_alone" in cmdline or " serve" in cmdline:
        return "router"
    base = Path(cmdline.split(" ")[0]).name if cmdline else "proc"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", base)


def _wait_busy(client: subprocess.Popen, log: Path, timeout_s: float = 300.0) -> None:
    """Until the client says its timed run began (it builds its prompts first). Watching a
    process's CPU does not work for every runtime: under Ray Serve the router is a replica
    process, not the one started here."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and client.poll() is None:
        time.sleep(0.5)
        if b"Starting main benchmark run" in log.read_bytes():
            return
    raise SystemExit("profile_run: the load never started (see client.log)")


def _deployment_processes(leader: int) -> dict[int, str]:
    """pid -> command line of the server's processes: its session, and its descendants
    wherever their session is (Ray's daemons and workers start sessions of their own)."""
    from cluster.reaper import descendants

    procs = _session_processes(leader)
    for pid in descendants(leader):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        procs.setdefault(pid, cmd.strip())
    return procs


def _client_argv(args: argparse.Namespace, base_url: str, model: str, tokenizer: str,
                 num_prompts: int, rate: str, result: Path, max_concurrency: int | None) -> list[str]:
    argv = [_python(), "-m", "bench.vllm_client", "bench", "serve", "--backend", "openai",
            "--base-url", base_url, "--model", model, "--tokenizer", tokenizer,
            "--dataset-name", "random", "--random-input-len", str(args.input_len),
            "--random-output-len", str(args.output_len), "--random-range-ratio", "0",
            "--ignore-eos", "--num-prompts", str(num_prompts), "--request-rate", rate,
            "--seed", str(args.seed), "--disable-tqdm", "--save-result", "--save-detailed",
            "--result-dir", str(result.parent), "--result-filename", result.name,
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99"]
    if max_concurrency:
        argv += ["--max-concurrency", str(max_concurrency)]
    return argv


def _profile(args: argparse.Namespace, base_url: str, model: str, tokenizer: str, sid: int,
             client_prefix: list[str], rate: str, max_concurrency: int | None) -> None:
    out = args.output_dir
    # Warm-up (not measured): compiles, caches, connections.
    subprocess.run(client_prefix + _client_argv(args, base_url, model, tokenizer, 16, "inf",
                                                out / "warmup.json", 4),
                   check=True, stdout=subprocess.DEVNULL)
    result = out / "client.json"
    client = subprocess.Popen(client_prefix + _client_argv(
        args, base_url, model, tokenizer, args.num_prompts, rate, result, max_concurrency),
        stdout=(out / "client.log").open("wb"), stderr=subprocess.STDOUT)
    # The client builds its prompts first (seconds): start recording once the router works.
    _wait_busy(client, out / "client.log")
    time.sleep(args.settle_s)
    procs = {pid: cmd for pid, cmd in _deployment_processes(sid).items()
             if "python" in cmd or cmd.startswith(("ray::", "VLLM::"))}
    names: dict[int, str] = {}
    for pid, cmd in sorted(procs.items()):
        name = _short_name(pid, cmd)
        while name in names.values():
            name += "_"
        names[pid] = name
    before = {pid: _cpu_s(pid) for pid in names}
    t0 = time.monotonic()
    spies = []
    for pid, name in names.items():
        if args.only and not any(k in name for k in args.only):
            continue
        spies.append(subprocess.Popen(
            client_prefix + [_py_spy(), "record", "--pid", str(pid), "--rate", str(args.spy_rate),
                             "--nonblocking", "--format", "raw", "--duration",
                             str(int(args.duration_s)), "-o", str(out / f"{name}.txt")],
            stdout=subprocess.DEVNULL, stderr=(out / f"{name}.spy.log").open("wb")))
    for spy in spies:
        spy.wait()
    window_s = time.monotonic() - t0
    after = {pid: _cpu_s(pid) for pid in names}
    client.wait()
    data = json.loads(result.read_text())
    cpu = {names[pid]: {"pid": pid, "cmd": procs[pid][:200],
                        "cpu_s": round(after[pid] - before[pid], 3)
                        if after[pid] is not None and before[pid] is not None else None}
           for pid in names}
    completed_rps = data["completed"] / data["duration"]
    tokens_ps = data["total_output_tokens"] / data["duration"]
    window_requests = completed_rps * window_s
    window_tokens = tokens_ps * window_s
    (out / "cpu.json").write_text(json.dumps(
        {"window_s": window_s, "window_requests": window_requests, "window_tokens": window_tokens,
         "load_average": os.getloadavg(), "processes": cpu}, indent=1))
    lines = [f"client: {data['completed']} completed, {data.get('failed', 0)} failed, "
             f"{completed_rps:.2f} req/s, {tokens_ps:.0f} output tok/s, "
             f"p50 TTFT {data.get('median_ttft_ms', 0):.1f} ms, "
             f"p50 TPOT {data.get('median_tpot_ms', 0):.2f} ms",
             f"window {window_s:.1f} s ~ {window_requests:.0f} requests, "
             f"{window_tokens:.0f} tokens; load average {os.getloadavg()}",
             "CPU per process over the window (from /proc):"]
    for name, entry in sorted(cpu.items(), key=lambda kv: -(kv[1]["cpu_s"] or 0)):
        c = entry["cpu_s"] or 0.0
        lines.append(f"  {name:<40} {c:7.2f} s  {c / window_s:6.1%} of a core  "
                     f"{c / max(window_requests, 1) * 1e6:8.0f} us/req  "
                     f"{c / max(window_tokens, 1) * 1e6:7.1f} us/token")
    for name in names.values():
        path = out / f"{name}.txt"
        if path.is_file() and path.stat().st_size:
            lines.append(format_report(path, args.spy_rate, int(window_requests),
                                       int(window_tokens), args.top, cpu[name]["cpu_s"]))
    text = "\n".join(lines)
    (out / "summary.txt").write_text(text + "\n")
    print(text)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["serve", "router-alone"])
    parser.add_argument("--config", type=Path, help="deployment config (serve)")
    parser.add_argument("--serve-command", default=None,
                        help="command taking `serve --config F --port P` (default: this "
                        "interpreter's pdserve CLI module)")
    parser.add_argument("--mode", choices=["colocated", "disaggregated"], default="colocated",
                        help="router-alone: fake deployment mode")
    parser.add_argument("--channel", action="store_true",
                        help="router-alone: fake workers in a process behind worker channels "
                        "(on the client core)")
    parser.add_argument("--router-core", type=int, default=0)
    parser.add_argument("--client-core", type=int, default=1)
    parser.add_argument("--port", type=int, default=8310)
    parser.add_argument("--rate", default="32", help="request rate of the load (serve)")
    parser.add_argument("--max-concurrency", type=int, default=64, help="router-alone")
    parser.add_argument("--num-prompts", type=int, default=600)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--settle-s", type=float, default=3.0)
    parser.add_argument("--duration-s", type=float, default=12.0)
    parser.add_argument("--spy-rate", type=int, default=100)
    parser.add_argument("--only", nargs="*", default=None,
                        help="py-spy only processes whose name contains one of these")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--output-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    from cluster.tiny_model import ensure_tiny_model

    base_url = f"http://127.0.0.1:{args.port}"
    log = (args.output_dir / "server.log").open("wb")
    if args.what == "serve":
        if args.config is None:
            parser.error("serve needs --config")
        from cluster.config import load_config

        config = load_config(args.config)
        tokenizer = str(Path(config.model.path) if config.model.path
                        else ensure_tiny_model(config.model.embedded))
        model = config.model.served_model_name or (
            f"pdserve-{config.model.embedded}" if not config.model.path else Path(tokenizer).name)
        serve = (args.serve_command.split() if args.serve_command
                 else [_python(), "-m", _serve_module()])
        proc = subprocess.Popen(serve + ["serve", "--config", str(args.config), "--port",
                                         str(args.port)], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        client_prefix: list[str] = []
        rate, max_concurrency = args.rate, None
    else:
        tokenizer = str(ensure_tiny_model("tiny"))
        model = "pdserve-tiny"
        channel = (["--channel", "--workers-core", str(args.client_core)]
                   if args.channel else [])
        proc = subprocess.Popen(["taskset", "-c", str(args.router_core), _python(), "-m",
                                 "bench.router_alone", "--port", str(args.port), "--mode",
                                 args.mode, *channel], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        client_prefix = ["taskset", "-c", str(args.client_core)]
        rate, max_concurrency = "inf", args.max_concurrency
    try:
        _wait_healthy(base_url, proc)
        _profile(args, base_url, model, tokenizer, proc.pid, client_prefix, rate, max_concurrency)
    finally:
        _stop(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
