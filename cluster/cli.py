"""The `pdserve` command: serve, plan, profile, bench.

Errors a user can fix (a bad flag, an invalid config, an unreachable server) print one
readable line and exit with status 2; they never end in a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

from cluster.config import ConfigError, dump_config, load_config


def _serve_overrides(args: argparse.Namespace) -> dict[str, Any]:
    o: dict[str, Any] = {}

    def put(path: str, value: Any) -> None:
        if value is None:
            return
        node = o
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value

    put("model.path", args.model)
    put("model.embedded", args.embedded_model)
    put("model.max_model_len", args.max_model_len)
    put("mode", args.mode)
    put("router.host", args.host)
    put("router.port", args.port)
    put("prefill.num_instances", args.num_prefill)
    put("decode.num_instances", args.num_decode)
    put("colocated.num_instances", args.num_instances)
    put("kv_transfer.transport", args.transport)
    put("kv_transfer.on_failure", args.on_failure)
    put("slo.ttft_s", args.ttft_slo)
    put("slo.tpot_s", args.tpot_slo)
    put("ray.address", args.ray_address)
    if args.kv_cache_gib is not None:
        for role in ("prefill", "decode", "colocated"):
            put(f"{role}.kv_cache_gib", args.kv_cache_gib)
    return o


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="start a deployment and its OpenAI-compatible router",
                       description="Start prefill and decode pools (or colocated instances) on "
                       "Ray and serve the OpenAI API. Flags override the --config file.")
    p.add_argument("--config", type=Path, help="deployment YAML (see deploy/)")
    p.add_argument("--model", help="local Hugging Face model directory (default: embedded model)")
    p.add_argument("--embedded-model", choices=["tiny", "small"], help="embedded model to serve")
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--mode", choices=["disaggregated", "colocated"])
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--num-prefill", type=int, help="prefill instances (disaggregated)")
    p.add_argument("--num-decode", type=int, help="decode instances (disaggregated)")
    p.add_argument("--num-instances", type=int, help="instances (colocated)")
    p.add_argument("--transport", choices=["auto", "shm", "tcp", "dist", "cuda_ipc"])
    p.add_argument("--on-failure", choices=["recompute", "fail"])
    p.add_argument("--ttft-slo", type=float, help="TTFT SLO in seconds")
    p.add_argument("--tpot-slo", type=float, help="TPOT SLO in seconds")
    p.add_argument("--kv-cache-gib", type=int, help="CPU KV-cache space per instance (GiB)")
    p.add_argument("--ray-address", help="existing Ray cluster (default: start a local one)")
    p.add_argument("--print-config", action="store_true",
                   help="print the validated config as YAML and exit")


def _run_serve(args: argparse.Namespace) -> int:
    config = load_config(args.config, _serve_overrides(args))
    if args.print_config:
        print(dump_config(config), end="")
        return 0
    from cluster.launcher import StartupError, serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        asyncio.run(serve(config))
    except KeyboardInterrupt:
        pass
    except StartupError as e:
        print(f"pdserve: {e}", file=sys.stderr)
        return 1
    return 0


def _optional_subcommand(sub, name: str, module: str, help_text: str) -> None:
    """Subcommands whose modules may be absent from a minimal install."""
    try:
        mod = __import__(module, fromlist=["add_arguments", "run"])
    except ImportError:
        return
    p = sub.add_parser(name, help=help_text)
    mod.add_arguments(p)
    p.set_defaults(_run=mod.run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description="Disaggregated prefill/decode "
                                     "LLM serving on Ray and vLLM.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    _optional_subcommand(sub, "plan", "cluster.planner.cli", "plan pool sizes and parallelism for SLOs")
    _optional_subcommand(sub, "profile", "cluster.profiler", "profile the engine and fit a latency model")
    _optional_subcommand(sub, "bench", "bench.cli", "measure SLO attainment and goodput")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            return _run_serve(args)
        return int(args._run(args) or 0)
    except ConfigError as e:
        print(f"pdserve: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
