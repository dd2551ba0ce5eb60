"""`pdserve plan`: choose a disaggregated deployment for an SLO, write it as a serve config.

    python -m cluster.planner.cli --model facebook/opt-13b \
        --profile ../shared/data/profiler-a100-80g.distserve.json \
        --workload-csv ../shared/data/sharegpt_opt_lengths.csv \
        --ttft-s 0.25 --tpot-s 0.1 --attainment 0.9 --nodes 2 --gpus-per-node 8 \
        --output deploy/plan.yaml

Inputs come from `--config plan.yaml` (the `PlanRequest` tree) and/or flags; flags win.
With `--rate` the planner finds the fewest GPUs sustaining that rate, otherwise the highest
goodput within the GPU budget. Exit codes: 0 plan written, 1 no plan meets the target,
2 bad input (one-line message on stderr).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from cluster.config import ConfigError, dump_config
from cluster.workload_schema import WorkloadError, load_workload_file

from .goodput import MAX_RATE
from .live import describe, fetch_metrics, live_figures, parse_prometheus_text, whatif_overrides
from .deployment import colocated_to_serve_config, load_base_config, plan_to_serve_config
from .inputs import PlanRequest
from .problem import build_problem
from .report import render_report
from .search import search

_PLACEMENTS = {"high-node-affinity": ("high_node_affinity",), "low-node-affinity": ("low_node_affinity",),
               "both": ("high_node_affinity", "low_node_affinity")}


_HINTS = {"model": "--model", "profile": "--profile",
          "workload": "--workload-csv, --input-len/--output-len or --input-len-range/--output-len-range",
          "workload.lengths": "--workload-csv, --input-len/--output-len or --input-len-range/--output-len-range"}


class InputError(ValueError):
    """Planner input that cannot be used; the message is one line."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `pdserve plan`. Every default is None so that `--config` values survive."""
    a = parser.add_argument
    a("--config", type=Path, help="YAML file with planner inputs (see docs/planner.md); flags override it")
    g = parser.add_argument_group("model")
    g.add_argument("--model", help="local model dir with config.json, or facebook/opt-13b|opt-66b|opt-175b")
    g.add_argument("--profile", type=Path, help="latency profile JSON (DistServe format)")
    g.add_argument("--profile-model", help="model key inside the profile (default: --model)")
    g.add_argument("--kv-capacity-csv", type=Path,
                   help="model,tp,pp,max_num_tokens table overriding the computed KV capacity")
    g = parser.add_argument_group("SLO")
    g.add_argument("--ttft-s", type=float, help="time-to-first-token SLO, seconds")
    g.add_argument("--tpot-s", type=float, help="time-per-output-token SLO, seconds")
    g.add_argument("--attainment", type=float, help="share of requests meeting both SLOs (0-1]")
    g = parser.add_argument_group("workload")
    g.add_argument("--workload", type=Path, metavar="FILE",
                   help="workload file (lengths, arrival, rate; cluster/workload_schema.py), the "
                   "same file `pdserve bench --workload` sends; it replaces --config's workload, "
                   "flags still win")
    g.add_argument("--workload-csv", type=Path, help="CSV of input_len,output_len to resample")
    g.add_argument("--input-len", type=int, help="fixed prompt length")
    g.add_argument("--output-len", type=int, help="fixed output length")
    g.add_argument("--input-len-range", type=int, nargs=2, metavar=("MIN", "MAX"), help="uniform prompt lengths")
    g.add_argument("--output-len-range", type=int, nargs=2, metavar=("MIN", "MAX"), help="uniform output lengths")
    g.add_argument("--rate", type=float, help="target req/s: plan the fewest GPUs that sustain it")
    g.add_argument("--burstiness", type=float, metavar="CV",
                   help="coefficient of variation of arrival gaps (1 = Poisson, >1 burstier)")
    g = parser.add_argument_group("cluster")
    g.add_argument("--device", choices=["gpu", "cpu"],
                   help="what a unit is: a GPU (default), or a CPU core running one TP1 instance "
                   "(then --gpus-per-node counts cores and --gpu-memory-gib is the KV cache per core)")
    g.add_argument("--nodes", type=int, help="number of nodes")
    g.add_argument("--gpus-per-node", type=int, help="GPUs per node")
    g.add_argument("--gpu-memory-gib", type=float, help="memory per GPU, GiB")
    g.add_argument("--gpu-memory-utilization", type=float, help="share of GPU memory the engine uses")
    g.add_argument("--intra-node-bandwidth-gb-s", type=float, help="NVLink GB/s per GPU pair")
    g.add_argument("--inter-node-bandwidth-gb-s", type=float, help="NIC GB/s per node")
    g.add_argument("--transfer-latency-ms", type=float, help="fixed cost per KV transfer, ms")
    g.add_argument("--max-gpus", type=int, help="GPU budget (default: all GPUs)")
    g = parser.add_argument_group("engine")
    g.add_argument("--prefill-token-budget", type=int, help="prompt tokens per prefill batch")
    g.add_argument("--max-num-seqs", type=int, help="most requests per decode batch")
    g.add_argument("--first-token-source", choices=["prefill", "decode"],
                   help="who releases the first token (default prefill)")
    g.add_argument("--framework-overhead", action=argparse.BooleanOptionalAction, default=None,
                   help="add DistServe's per-iteration framework overhead (default on; never "
                   "added to a profile of whole iterations, as `pdserve profile` writes)")
    g.add_argument("--iteration-time-scale", type=float,
                   help="multiply every profiled iteration time (co-located processes share the units)")
    g = parser.add_argument_group("front end (CPU hosts; docs/planner.md, 'The front end on a CPU host')")
    g.add_argument("--front-end-cpu-ms", type=float, metavar="MS",
                   help="CPU ms the front end (router, replicas, Ray, engine schedulers) spends per "
                   "request (measured: python -m bench.profile_run serve); 0: not modelled")
    g.add_argument("--front-end-cpu-ms-per-token", type=float, metavar="MS",
                   help="CPU ms the front end spends per output token")
    g.add_argument("--front-end-layout", choices=["shared", "reserved", "with_prefill", "auto"],
                   help="front end on the engines' cores, on reserved cores, on the prefill "
                   "instances' cores, or plan each (default auto)")
    g.add_argument("--front-end-cores", type=int, help="cores a reserved front end takes (default 1)")
    g.add_argument("--shared-core-step-ms", type=float, metavar="MS",
                   help="extra ms per engine iteration when the engines share their cores with "
                   "their schedulers and the front end (measured; default 0)")
    g.add_argument("--scheduler-poll-share", type=float, metavar="X",
                   help="an engine computing on a core that hosts k engine schedulers takes "
                   "1 + X*k times its profiled time (measured; default 0)")
    g = parser.add_argument_group("search")
    g.add_argument("--placement", choices=sorted(_PLACEMENTS), help="placement algorithms (default both)")
    g.add_argument("--max-pipeline-parallel", type=int, help="largest pipeline degree to try")
    g.add_argument("--num-requests", type=int, help="requests per simulated trace")
    g.add_argument("--num-seeds", type=int, help="independent traces per evaluation")
    g.add_argument("--seed", type=int, help="base seed")
    g.add_argument("--num-verify", type=int, help="configurations co-simulated in full")
    g.add_argument("--workers", type=int,
                   help="processes for independent simulations (default: this process's cores)")
    g.add_argument("--compare-colocated", action="store_true", default=None,
                   help="also report the best colocated deployment")
    g.add_argument("--colocated-profile", type=Path,
                   help="profile of the colocated baseline's engine (default: --profile)")
    g.add_argument("--from-metrics", metavar="URL",
                   help="what-if from a live deployment: read its router's /metrics (rate, mean "
                   "lengths, SLO) and plan the fewest GPUs for that traffic; flags still win")
    g = parser.add_argument_group("output")
    g.add_argument("--output", "-o", type=Path, help="write the deployment YAML here (default: print it)")
    g.add_argument("--base-config", type=Path, help="serve config YAML whose other settings the plan keeps")


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value


def _flag_overrides(args: argparse.Namespace) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    simple = {
        "model": "model", "profile": "profile", "profile_model": "profile_model",
        "kv_capacity_csv": "kv_capacity_csv", "colocated_profile": "colocated_profile",
        "ttft_s": "slo.ttft_s", "tpot_s": "slo.tpot_s", "attainment": "slo.attainment",
        "rate": "workload.rate",
        "device": "cluster.device", "nodes": "cluster.num_nodes", "gpus_per_node": "cluster.gpus_per_node",
        "gpu_memory_gib": "cluster.gpu_memory_gib",
        "gpu_memory_utilization": "cluster.gpu_memory_utilization",
        "intra_node_bandwidth_gb_s": "cluster.intra_node_bandwidth_gb_s",
        "inter_node_bandwidth_gb_s": "cluster.inter_node_bandwidth_gb_s",
        "transfer_latency_ms": "cluster.transfer_latency_ms", "max_gpus": "cluster.max_gpus",
        "prefill_token_budget": "engine.prefill_token_budget", "max_num_seqs": "engine.max_num_seqs",
        "first_token_source": "engine.first_token_source",
        "framework_overhead": "engine.framework_overhead",
        "iteration_time_scale": "engine.iteration_time_scale",
        "max_pipeline_parallel": "search.max_pipeline_parallel",
        "num_requests": "search.num_requests", "num_seeds": "search.num_seeds",
        "seed": "search.seed", "num_verify": "search.num_verify", "workers": "search.workers",
        "compare_colocated": "search.compare_colocated",
        "front_end_cpu_ms": "front_end.cpu_ms_per_request",
        "front_end_cpu_ms_per_token": "front_end.cpu_ms_per_output_token",
        "front_end_layout": "front_end.layout", "front_end_cores": "front_end.reserved_cores",
        "shared_core_step_ms": "front_end.shared_core_step_ms",
        "scheduler_poll_share": "front_end.scheduler_poll_share",
    }
    for attr, dotted in simple.items():
        value = getattr(args, attr, None)
        if value is not None:
            _set(tree, dotted, str(value) if isinstance(value, Path) else value)
    if getattr(args, "placement", None) is not None:
        _set(tree, "search.placements", list(_PLACEMENTS[args.placement]))
    if getattr(args, "burstiness", None) is not None:
        cv = args.burstiness
        _set(tree, "workload.arrival", {"process": "poisson"} if cv == 1.0 else {"process": "gamma", "cv": cv})
    lengths = _length_flags(args)
    if lengths is not None:
        _set(tree, "workload.lengths", lengths)
    return tree


def _length_flags(args: argparse.Namespace) -> dict[str, Any] | None:
    csv_path = getattr(args, "workload_csv", None)
    fixed = (getattr(args, "input_len", None), getattr(args, "output_len", None))
    ranges = (getattr(args, "input_len_range", None), getattr(args, "output_len_range", None))
    given = [name for name, on in (("--workload-csv", csv_path is not None),
                                   ("--input-len/--output-len", any(v is not None for v in fixed)),
                                   ("--*-len-range", any(v is not None for v in ranges))) if on]
    if len(given) > 1:
        raise InputError(f"choose one way to give lengths, not {' and '.join(given)}")
    if csv_path is not None:
        return {"kind": "csv", "path": str(csv_path)}
    if any(v is not None for v in fixed):
        if None in fixed:
            raise InputError("--input-len and --output-len go together")
        return {"kind": "fixed", "input_len": fixed[0], "output_len": fixed[1]}
    if any(v is not None for v in ranges):
        if None in ranges:
            raise InputError("--input-len-range and --output-len-range go together")
        (i_lo, i_hi), (o_lo, o_hi) = ranges
        return {"kind": "uniform", "input_len_min": i_lo, "input_len_max": i_hi,
                "output_len_min": o_lo, "output_len_max": o_hi}
    return None


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "lengths":
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value  # a lengths spec replaces the file's whole (other kind's) spec
    return merged


def _one_line(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-")) or "input"
        msg = e["msg"]
        if e["type"] == "missing":
            msg = "required (give " + _HINTS.get(where, "it") + " or set it in --config)"
        parts.append(f"{where}: {msg}")
    return "invalid planner input: " + "; ".join(parts)


def build_request(args: argparse.Namespace) -> PlanRequest:
    data: dict[str, Any] = {}
    if getattr(args, "config", None) is not None:
        try:
            loaded = yaml.safe_load(Path(args.config).read_text())
        except FileNotFoundError:
            raise InputError(f"planner config not found: {args.config}") from None
        except (OSError, yaml.YAMLError) as e:
            raise InputError(f"cannot read planner config {args.config}: {' '.join(str(e).split())}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise InputError(f"planner config {args.config} must hold a mapping")
        data = loaded or {}
    if getattr(args, "workload", None) is not None:
        try:
            workload = load_workload_file(args.workload)
        except WorkloadError as e:
            raise InputError(str(e)) from None
        data = {**data, "workload": workload.model_dump(mode="json", exclude_none=True)}
    live = getattr(args, "live_overrides", None)
    if live:
        data = _merge(data, live)
    data = _merge(data, _flag_overrides(args))
    try:
        return PlanRequest.model_validate(data)
    except ValidationError as e:
        raise InputError(_one_line(e)) from None


def _fail(message: str) -> int:
    print(f"pdserve plan: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


def _read_live(args: argparse.Namespace) -> None:
    """--from-metrics: fetch, parse, and keep the overrides and a description on `args`."""
    url = getattr(args, "from_metrics", None)
    if not url:
        return
    figures = live_figures(parse_prometheus_text(fetch_metrics(url)))
    have_lengths = any(getattr(args, k, None) is not None for k in
                       ("workload", "workload_csv", "input_len", "input_len_range")) \
        or bool(getattr(args, "config", None))
    args.live_overrides = whatif_overrides(figures, have_lengths)
    args.live_description = describe(figures, url, have_lengths)


def run(args: argparse.Namespace) -> int:
    try:
        _read_live(args)
        request = build_request(args)
        problem = build_problem(request)
        base = load_base_config(getattr(args, "base_config", None))
    except ConfigError as e:
        return _fail(f"base config: {'; '.join(line.strip() for line in str(e).splitlines())}")
    except (ValueError, OSError) as e:
        return _fail(str(e))
    start = time.perf_counter()
    outcome = search(problem)
    elapsed = time.perf_counter() - start
    best = outcome.best
    if best is not None and best.is_capped:
        return _fail(f"the SLO does not bind: {best.plan.label} meets TTFT {request.slo.ttft_s:g} s "
                     f"and TPOT {request.slo.tpot_s:g} s at every rate up to the search ceiling "
                     f"({MAX_RATE:g} req/s), so it cannot size a deployment; tighten --ttft-s/--tpot-s")
    if getattr(args, "live_description", None):
        print(args.live_description + "\n")
    print(render_report(outcome, problem, elapsed))
    if outcome.front_end_layout is not None:  # the deployment follows the chosen layout
        request = request.with_front_end_layout(outcome.front_end_layout)
    if outcome.serve_colocated:
        top = outcome.best_colocated
        text = dump_config(colocated_to_serve_config(top.config, top.num_instances, request, base))
    elif best is None or best.goodput_rps <= 0:
        return 1
    else:
        text = dump_config(plan_to_serve_config(best.plan, request, base))
    output = getattr(args, "output", None)
    if output is None:
        print("\n# deployment (pdserve serve --config FILE)\n" + text, end="")
        return 0
    try:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(text)
    except OSError as e:
        return _fail(f"cannot write {output}: {e}")
    print(f"\nWrote deployment config to {output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pdserve plan", description="Plan a disaggregated prefill/decode deployment for an SLO.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
