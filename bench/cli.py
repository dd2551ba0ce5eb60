"""`pdserve bench`: load generation, goodput search and side-by-side comparison.

    pdserve bench run      (--url URL | --config FILE) --rate R   [workload, arrival, SLO flags]
    pdserve bench goodput  (--url URL | --config FILE)            [... search flags]
    pdserve bench compare  (--config-a FILE | --url-a URL) (--config-b FILE | --url-b URL)
                           [--target [LABEL=]FILE.yaml|URL|vllm[:cores=0-1] ...]

`add_arguments(parser)` installs the sub-commands on a parser and `run(args)` executes the
parsed namespace; `python -m bench.cli ...` does both. Exit status: 0 done, 2 a problem
the user can fix (printed as one line, no traceback), 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import options
from bench.compare import (RoundRun, Target, TargetResult, benchmark_rounds,
                           benchmark_target, comparison_table, round_table,
                           open_target, pick_cdf_rate, rate_table, write_outputs)
from bench.errors import BenchError
from bench.experiment import Measurement, measure, warm_up
from bench.loadgen import check_server
from bench.plots import plot_attainment_vs_rate
from bench.report import (format_goodput, format_probe_line, format_summary, goodput_json,
                          measurement_json, write_json)


# ----------------------------------------------------------------------------- arguments

def _add_target_args(parser: argparse.ArgumentParser, suffix: str = "",
                     required: bool = True) -> None:
    group = parser.add_mutually_exclusive_group(required=required)
    name = f" {suffix.upper()}" if suffix else ""
    flag = f"-{suffix}" if suffix else ""
    group.add_argument(f"--url{flag}", help=f"base URL of an already-running server{name}")
    group.add_argument(f"--config{flag}", type=Path,
                       help=f"deployment config{name} to start with `pdserve serve`")
    parser.add_argument(f"--model{flag}", default=None,
                        help="model name to send (default: first id of GET /v1/models)")
    parser.add_argument(f"--num-units{flag}", type=float, default=None,
                        help="GPUs (or CPU cores) the deployment uses, for goodput per unit "
                        "(default: derived from the config)")


def _add_serve_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("starting deployments (with --config)")
    group.add_argument("--port", type=int, default=None,
                       help="port for a started deployment (default: a free one)")
    group.add_argument("--serve-command", default=None,
                       help="command that takes `serve --config FILE --port P` "
                       "(default: pdserve)")
    group.add_argument("--health-timeout-s", type=float, default=600.0,
                       help="how long a started deployment may take to answer /health")


def _add_workload_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("workload")
    group.add_argument("--num-requests", type=int, default=200,
                       help="requests per measurement (default 200)")
    group.add_argument("--seed", type=int, default=0,
                       help="seed of lengths, prompts and arrivals")
    group.add_argument("--tokenizer", default=None,
                       help="tokenizer directory of the served model (default: the config's "
                       "model.path, else its embedded model)")
    group.add_argument("--workload", type=Path, default=None, metavar="FILE",
                       help="workload file (lengths, arrival, rate; cluster/workload_schema.py), "
                       "the same file `pdserve plan --workload` plans for; its rate applies "
                       "when --rate is not given")
    group.add_argument("--dataset", type=Path, default=None,
                       help="CSV of input_len,output_len pairs to draw lengths from")
    group.add_argument("--max-context", type=int, default=None,
                       help="clip prompt + output to this many tokens")
    for side, default in (("input", 128), ("output", 64)):
        group.add_argument(f"--{side}-dist", choices=["fixed", "uniform", "lognormal"],
                           default="fixed", help=f"synthetic {side} length distribution")
        group.add_argument(f"--{side}-len", type=int, default=default,
                           help=f"{side} length (fixed) or mean (lognormal); default {default}")
        group.add_argument(f"--{side}-min", type=int, default=1,
                           help=f"smallest {side} length (uniform, lognormal)")
        group.add_argument(f"--{side}-max", type=int, default=None,
                           help=f"largest {side} length (uniform: required)")
        group.add_argument(f"--{side}-sigma", type=float, default=1.0,
                           help=f"lognormal sigma of log({side} length)")


def _add_arrival_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("arrivals")
    group.add_argument("--arrival", choices=["poisson", "gamma", "trace"], default="poisson")
    group.add_argument("--cv", type=float, default=1.0,
                       help="coefficient of variation of gamma inter-arrival gaps (burstiness)")
    group.add_argument("--trace", type=Path, default=None,
                       help="CSV or JSONL trace with a timestamp column (and optionally "
                       "input_len, output_len) for --arrival trace")
    group.add_argument("--trace-time-unit", choices=["s", "ms"], default="s")


def _add_slo_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("SLO (default: the config's slo, else pdserve's defaults)")
    group.add_argument("--slo-ttft-s", type=float, default=None)
    group.add_argument("--slo-tpot-s", type=float, default=None)
    group.add_argument("--attainment-target", type=float, default=None)


def _add_run_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("run bounds")
    group.add_argument("--duration-s", type=float, default=None,
                       help="send no request later than this after a measurement starts")
    group.add_argument("--request-timeout-s", type=float, default=300.0)
    group.add_argument("--drain-timeout-s", type=float, default=None,
                       help="after the last send, abandon requests still running after this")
    group.add_argument("--num-warmup", type=int, default=1,
                       help="short unmeasured requests sent first (0: none)")
    group.add_argument("--continuous-usage", action="store_true",
                       help="ask for per-chunk usage (vLLM continuous_usage_stats) to split "
                       "multi-token chunks exactly")
    group.add_argument("--no-progress", action="store_true", help="no progress bar")
    group.add_argument("--client", choices=["pdserve", "vllm"], default="pdserve",
                       help="load generator: pdserve's own (default), or vLLM's `vllm bench "
                       "serve` (random dataset of the same lengths, seed and arrivals; one "
                       "run per rate, its per-request results judged here)")
    group.add_argument("--vllm-backend", choices=["openai", "openai-chat"], default="openai",
                       help="with --client vllm: completions or chat completions")


def _add_search_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("goodput search")
    group.add_argument("--rates", type=float, nargs="+", default=None,
                       help="rates (req/s) to sweep; default: geometric from --start-rate")
    group.add_argument("--start-rate", type=float, default=1.0)
    group.add_argument("--growth-factor", type=float, default=2.0)
    group.add_argument("--min-rate", type=float, default=0.01)
    group.add_argument("--max-rate", type=float, default=1000.0)
    group.add_argument("--bisect-steps", type=int, default=4)
    group.add_argument("--rel-tolerance", type=float, default=0.05,
                       help="stop bisecting when (hi - lo) / lo is this small")
    group.add_argument("--full-sweep", action="store_true",
                       help="probe every --rates value even after one misses the target")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Install `run`, `goodput` and `compare` on `parser` (e.g. the `pdserve bench` one)."""
    commands = parser.add_subparsers(dest="bench_command", required=True, metavar="COMMAND")

    run_parser = commands.add_parser("run", help="measure one server at one rate")
    _add_target_args(run_parser)
    _add_serve_args(run_parser)
    run_parser.add_argument("--rate", type=float, default=None,
                            help="request rate in req/s (a trace without it replays as recorded)")
    run_parser.add_argument("--output-json", type=Path, default=None,
                            help="write the summary and every request record here")

    goodput_parser = commands.add_parser("goodput", help="search one server's goodput")
    _add_target_args(goodput_parser)
    _add_serve_args(goodput_parser)
    goodput_parser.add_argument("--output-dir", type=Path, default=None,
                                help="write goodput.json and attainment_vs_rate.png here")

    compare_parser = commands.add_parser(
        "compare", help="goodput of two deployments side by side, same workload and seed")
    for suffix in ("a", "b"):
        _add_target_args(compare_parser, suffix, required=False)
        compare_parser.add_argument(f"--label-{suffix}", default=None,
                                    help="name in the table and plots")
    peers = compare_parser.add_argument_group(
        "more targets, and the plain-vLLM peer (see bench/peer_vllm.py)")
    peers.add_argument("--target", action="append", default=[], metavar="[LABEL=]SPEC",
                       help="a deployment to compare, after -a and -b (repeatable): a "
                       "deployment config FILE.yaml, a running server's URL, or `vllm` "
                       "(plain vLLM's OpenAI server on the same model: vLLM's default core "
                       "binding), `vllm:cores=0-1` (engine threads bound to cores 0-1), "
                       "optionally `:cpus=LIST` (the server's affinity; default: all of ours)")
    peers.add_argument("--peer-config", type=Path, default=None,
                       help="deployment config whose model and engine settings the vLLM "
                       "peer mirrors (default: the first config compared)")
    peers.add_argument("--peer-args", default="",
                       help="extra flags for the vLLM server, e.g. '--max-num-batched-tokens 4096'")
    _add_serve_args(compare_parser)
    compare_parser.add_argument("--cdf-rate", type=float, default=None,
                                help="rate of the TTFT/TPOT CDF plots (default: the highest "
                                "common rate where one deployment meets the target)")
    compare_parser.add_argument("--output-dir", type=Path, default=None,
                                help="default: bench/results/tmp/compare-<time>")
    compare_parser.add_argument("--rounds", type=int, default=1,
                                help="take turns: N rounds, each starting every target in "
                                "a rotated order and measuring every rate, pooled per rate "
                                "(needs --rates and --full-sweep; evens out a machine whose "
                                "speed drifts)")

    for sub in (run_parser, goodput_parser, compare_parser):
        _add_workload_args(sub)
        _add_arrival_args(sub)
        _add_slo_args(sub)
        _add_run_args(sub)
    for sub in (goodput_parser, compare_parser):
        _add_search_args(sub)


# ------------------------------------------------------------------------------ helpers

def _log_dir(output_dir: Path | None) -> Path:
    """Where started deployments log: the output dir, else a fresh temporary dir."""
    return output_dir if output_dir is not None else Path(tempfile.mkdtemp(prefix="pdserve-bench-"))


def _print_measurement(measurement: Measurement) -> None:
    print(format_probe_line(measurement.summary), flush=True)


def _settings_json(args: argparse.Namespace) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
            if not callable(v)}


# ------------------------------------------------------------------------------ commands

def _run_command(args: argparse.Namespace) -> int:
    workload = options.workload_file_from_args(args)
    if args.rate is None and workload is not None:
        args.rate = workload.rate  # the workload file's rate, unless --rate says otherwise
    if args.rate is None and args.arrival != "trace":
        raise BenchError("--rate is required unless --arrival trace")
    target, config = options.target_from_args(args)
    experiment = options.experiment_from_args(args, config, check_first=(target,))
    log_dir = _log_dir(args.output_json.parent if args.output_json else None)
    with open_target(target, log_dir, options.serve_options_from_args(args)) as base_url:
        model = check_server(base_url, target.model)
        asyncio.run(warm_up(experiment, base_url, model))
        measurement = asyncio.run(measure(experiment, base_url, model, args.rate))
    print(format_summary(measurement.summary))
    if args.output_json is not None:
        write_json(args.output_json, {"settings": _settings_json(args), "url": base_url,
                                      "model": model, **measurement_json(measurement)})
        print(f"wrote {args.output_json}")
    return 0


def _goodput_command(args: argparse.Namespace) -> int:
    target, config = options.target_from_args(args)
    experiment = options.experiment_from_args(args, config, check_first=(target,))
    output_dir = args.output_dir
    search = options.search_from_args(args, experiment.slo)
    result = benchmark_target(target, experiment, search, _log_dir(output_dir),
                              options.serve_options_from_args(args),
                              on_measurement=_print_measurement)
    print(format_goodput(result.goodput, target.units))
    if output_dir is not None:
        write_json(output_dir / "goodput.json", {
            "settings": _settings_json(args), "url": result.base_url, "model": result.model,
            "goodput": goodput_json(result.goodput, target.units),
            "measurements": [measurement_json(m) for m in result.measurements],
        })
        plot_attainment_vs_rate(
            {target.label: [(m.summary.rate_rps, m.summary.attainment)
                            for m in result.measurements if m.summary.rate_rps is not None]},
            experiment.slo.attainment, output_dir / "attainment_vs_rate.png",
            goodputs_rps={target.label: result.goodput.goodput_rps})
        print(f"wrote {output_dir}/goodput.json and attainment_vs_rate.png")
    return 0


def _compare_targets(args: argparse.Namespace) -> list[tuple[Target, Any]]:
    pairs: list[tuple[Target, Any]] = []
    for suffix in ("a", "b"):
        if getattr(args, f"url_{suffix}") is not None or getattr(args, f"config_{suffix}") is not None:
            pairs.append(options.target_from_args(args, suffix))
    peer_config = options.load_serve_config(args.peer_config)
    mirrored = peer_config or next((c for _, c in pairs if c is not None), None)
    pairs += options.targets_from_specs(args.target, mirrored, tuple(shlex.split(args.peer_args)))
    if len(pairs) < 2:
        raise BenchError("compare needs at least two targets (--config-a/--url-a, "
                         "--config-b/--url-b, --target)")
    seen: set[str] = set()
    unique = []
    for target, config in pairs:
        label, n = target.label, 1
        while label in seen:
            n += 1
            label = f"{target.label} ({n})"
        seen.add(label)
        unique.append((dataclasses.replace(target, label=label), config))
    return unique


def _compare_command(args: argparse.Namespace) -> int:
    if args.rounds != 1 and not (args.rates and args.full_sweep):
        raise BenchError("--rounds needs fixed rates measured in full (--rates ... --full-sweep)")
    pairs = _compare_targets(args)
    targets = [t for t, _ in pairs]
    configs = [c for _, c in pairs if c is not None]
    if (len(configs) > 1 and args.tokenizer is None
            and len({(c.model.path, c.model.embedded) for c in configs}) > 1):
        print("warning: the configs serve different models; prompts are built with the "
              "first one's tokenizer (pass --tokenizer to choose)", file=sys.stderr)
    # The SLO and tokenizer come from the first config: every deployment must be judged
    # by the same SLO for the comparison to mean anything.
    first_config = configs[0] if configs else options.load_serve_config(args.peer_config)
    experiment = options.experiment_from_args(args, first_config, check_first=tuple(targets))
    search = options.search_from_args(args, experiment.slo)
    output_dir = args.output_dir or (
        Path("bench/results/tmp") / time.strftime("compare-%Y%m%d-%H%M%S"))
    output_dir.mkdir(parents=True, exist_ok=True)
    results: list[TargetResult] = []
    serve = options.serve_options_from_args(args)
    rounds: list[RoundRun] = []
    if args.rounds != 1:
        if args.cdf_rate is not None and args.cdf_rate not in (search.rates_rps or ()):
            raise BenchError("with --rounds, --cdf-rate must be one of --rates")
        results, rounds = benchmark_rounds(
            targets, experiment, search, args.rounds, output_dir, serve,
            on_measurement=_print_measurement,
            on_start=lambda r, t: print(f"== round {r + 1}/{args.rounds}: {t.label} "
                                        f"({t.source})", flush=True))
        print()
        print(round_table(rounds))
        for result in results:
            print(f"{result.target.label}, pooled: "
                  f"{format_goodput(result.goodput, result.target.units)}", flush=True)
    for target in targets if args.rounds == 1 else ():
        print(f"== {target.label} ({target.source})", flush=True)
        results.append(benchmark_target(target, experiment, search, output_dir, serve,
                                        extra_rate_rps=args.cdf_rate,
                                        on_measurement=_print_measurement))
        print(format_goodput(results[-1].goodput, target.units), flush=True)
    cdf_rate = args.cdf_rate if args.cdf_rate is not None else pick_cdf_rate(
        results, experiment.slo.attainment)
    print()
    print(comparison_table(results, cdf_rate))
    if len(results) > 1 and all(r.measurements for r in results):
        print()
        print(rate_table(results))
    paths = write_outputs(results, experiment, cdf_rate, output_dir, _settings_json(args),
                          rounds=rounds)
    print(f"\nwrote {', '.join(p.name for p in paths)} to {output_dir}")
    return 0


_COMMANDS = {"run": _run_command, "goodput": _goodput_command, "compare": _compare_command}


def run(args: argparse.Namespace) -> int:
    """Execute a namespace parsed by a parser that went through `add_arguments`."""
    try:
        return _COMMANDS[args.bench_command](args)
    except BenchError as e:
        print(f"pdserve bench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pdserve bench: interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pdserve bench", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
