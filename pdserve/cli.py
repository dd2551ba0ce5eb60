"""The `pdserve` command: serve, scale, plan, profile, bench.

Errors a user can fix (a bad flag, an invalid config, an unreachable server) print one
readable line and exit with status 2; they never end in a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Any

from bench import cli as bench_cli
from cluster import profiler
from cluster.config import ConfigError, ServeConfig, dump_config, load_config
from cluster.planner import cli as planner_cli


def _mode(args: argparse.Namespace) -> str | None:
    """`--mode`, or auto where nothing else chooses the deployment: no config file, no pool
    flag, no cluster to join, and a CPU host (the planner's profiles are of CPU engines)."""
    if args.mode is not None:
        return args.mode
    if args.config is not None or args.ray_address is not None or any(
            v is not None for v in (args.num_prefill, args.num_decode, args.num_instances)):
        return None
    from cluster.engine_host import is_cuda_available

    return None if is_cuda_available() else "auto"


def _serve_overrides(args: argparse.Namespace, mode: str | None = None) -> dict[str, Any]:
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
    put("mode", mode)
    put("router.host", args.host)
    put("router.port", args.port)
    put("router.api_key", args.api_key)
    put("prefill.num_instances", args.num_prefill)
    put("decode.num_instances", args.num_decode)
    put("colocated.num_instances", args.num_instances)
    put("kv_transfer.transport", args.transport)
    put("kv_transfer.on_failure", args.on_failure)
    put("slo.ttft_s", args.ttft_slo)
    put("slo.tpot_s", args.tpot_slo)
    put("ray.address", args.ray_address)
    put("planner.workload", args.workload)
    put("planner.profile", args.planner_profile)
    if mode == "auto":
        put("planner.kv_cache_gib", args.kv_cache_gib)
    elif args.kv_cache_gib is not None:
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
    p.add_argument("--mode", choices=["disaggregated", "colocated", "auto"],
                   help="auto: plan the mode and pools for the SLO and --workload on this CPU "
                   "host (the default without --config or pool flags on a CPU host)")
    p.add_argument("--workload", type=Path, metavar="FILE",
                   help="mode auto: the workload to plan for (a `pdserve bench --workload` file)")
    p.add_argument("--planner-profile", type=Path, metavar="FILE",
                   help="mode auto: latency profile of the model (`pdserve profile`); the "
                   "embedded models have one")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` on the API (also "
                   "router.api_key or PDSERVE_API_KEY; docs/security.md)")
    p.add_argument("--num-prefill", type=int, help="prefill instances (disaggregated)")
    p.add_argument("--num-decode", type=int, help="decode instances (disaggregated)")
    p.add_argument("--num-instances", type=int, help="instances (colocated)")
    p.add_argument("--transport", choices=["auto", "shm", "tcp", "dist", "cuda_ipc"])
    p.add_argument("--on-failure", choices=["recompute", "fail"])
    p.add_argument("--ttft-slo", type=float, help="TTFT SLO in seconds")
    p.add_argument("--tpot-slo", type=float, help="TPOT SLO in seconds")
    p.add_argument("--kv-cache-gib", type=int, help="CPU KV-cache space per instance (GiB)")
    p.add_argument("--ray-address", help="existing Ray cluster (default: start a local one)")
    p.add_argument("--runtime", choices=["serve", "actors"], default="serve",
                   help="serve (default): the Ray Serve application of pdserve.serve_app, as "
                   "`serve run deploy/ray/serve.yaml` deploys it; actors: the previous launcher "
                   "(one Ray actor per instance, no supervision or scaling), for comparison")
    p.add_argument("--ingress", choices=["direct", "proxy"], default="direct",
                   help="how HTTP reaches the router when Ray is started here: direct "
                   "(default): the router replica serves router.port itself (Serve's direct "
                   "ingress, no proxy hop); proxy: Serve's HTTP proxy on router.port. On an "
                   "existing cluster its own setting applies (docs/serve.md)")
    p.add_argument("--print-config", action="store_true",
                   help="print the validated config as YAML and exit")


def _run_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = load_config(args.config, _serve_overrides(args, _mode(args)))
    if config.mode == "auto":
        config = _plan_auto(config)
    if args.print_config:
        print(dump_config(config), end="")
        return 0
    if args.runtime == "actors":
        from pdserve.launcher import StartupError, serve

        if config.ray.stream_relay:
            raise ConfigError("ray.stream_relay: the stream relay is a Ray Serve deployment; "
                              "use --runtime serve")
        if config.ray.engine_in_router:
            raise ConfigError("ray.engine_in_router: the engine in the router replica is a Ray "
                              "Serve layout; use --runtime serve")
        if config.ray.control_plane_nice is not None:
            logging.getLogger("pdserve").info("ray.control_plane_nice applies to the Serve runtime; "
                                              "Ray's processes keep their niceness here")

        try:
            asyncio.run(serve(config))
        except KeyboardInterrupt:
            pass
        except StartupError as e:
            print(f"pdserve: {e}", file=sys.stderr)
            return 1
        return 0
    from pdserve.serving import ServeStartError, serve_forever

    try:
        serve_forever(config, ingress=args.ingress)
    except KeyboardInterrupt:
        pass
    except ServeStartError as e:
        print(f"pdserve: {e}", file=sys.stderr)
        return 1
    return 0


def _plan_auto(config: ServeConfig) -> ServeConfig:
    """Mode auto's deployment for this host (pdserve/auto_mode.py)."""
    from cluster.engine_host import is_cuda_available
    from pdserve.auto_mode import resolve_auto_mode
    from pdserve.launcher import resolve_model_path

    if is_cuda_available():
        raise ConfigError("mode auto plans a CPU host's cores; on GPUs, plan with `pdserve plan` "
                          "and a profile of your GPU, then serve the config it writes")
    return resolve_auto_mode(config, resolve_model_path(config), sorted(os.sched_getaffinity(0)))


def _add_scale(sub) -> None:
    p = sub.add_parser("scale", help="resize a pool of a running deployment",
                       description="Set the number of instances of one pool of a running "
                       "pdserve Serve application. New instances join routing once their engine "
                       "is ready; removed ones finish the requests they hold first.")
    p.add_argument("pool", choices=["prefill", "decode", "colocated"])
    p.add_argument("num_instances", type=int)
    p.add_argument("--ray-address", default=None, help="the cluster (default: RAY_ADDRESS or auto)")
    p.add_argument("--app-name", default="pdserve", help="Serve application name")
    p.add_argument("--namespace", default="pdserve")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the new size")


def _run_scale(args: argparse.Namespace) -> int:
    from pdserve.serving import ServeStartError, scale

    try:
        states = scale(args.app_name, args.pool, args.num_instances, args.ray_address,
                       args.namespace, args.timeout)
    except ServeStartError as e:
        print(f"pdserve: {e}", file=sys.stderr)
        return 1
    print(f"{args.pool}: {states.get('RUNNING', 0)} running")
    return 0


def _subcommand(sub, name: str, module: Any, help_text: str) -> None:
    """A subcommand implemented by a module with `add_arguments(parser)` and `run(args)`."""
    p = sub.add_parser(name, help=help_text)
    module.add_arguments(p)
    p.set_defaults(_run=module.run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description="Disaggregated prefill/decode "
                                     "LLM serving on Ray and vLLM.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    _add_scale(sub)
    _subcommand(sub, "plan", planner_cli, "plan pool sizes and parallelism for SLOs")
    _subcommand(sub, "profile", profiler, "profile the engine and fit a latency model")
    _subcommand(sub, "bench", bench_cli, "measure SLO attainment and goodput")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            return _run_serve(args)
        if args.command == "scale":
            return _run_scale(args)
        return int(args._run(args) or 0)
    except ConfigError as e:
        print(f"pdserve: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
