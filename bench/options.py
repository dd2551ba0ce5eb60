"""Turning parsed `pdserve bench` flags into the benchmark's typed objects.

Each function reads only the flags it names and validates them; user mistakes raise
`BenchError`. Files are read before servers are contacted and prompts are built, so a
typo fails in a second.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from bench.arrivals import (ArrivalProcess, GammaArrivals, PoissonArrivals, Trace,
                            TraceArrivals, load_trace)
from bench.compare import ServeOptions, Target
from bench.deployment import parse_serve_command
from bench.errors import BenchError
from bench.experiment import Experiment
from bench.goodput import SearchSettings, Units, units_from_config
from bench.loadgen import check_server
from bench.prompts import PromptBuilder
from bench.workload import (LengthDistribution, LengthSource, RequestSpec, SyntheticLengths,
                            TraceLengths, WorkloadFileLengths, build_workload, load_length_csv)
from cluster.workload_schema import WorkloadError, WorkloadFile, load_workload_file
from cluster.config import ConfigError, ServeConfig, SLOConfig, load_config

_NUM_WARMUP_INPUT_TOKENS = 16
_NUM_WARMUP_OUTPUT_TOKENS = 4


def load_serve_config(path: Path | None) -> ServeConfig | None:
    if path is None:
        return None
    try:
        return load_config(path)
    except ConfigError as e:
        raise BenchError(str(e).replace("\n", " ")) from None


def slo_from_args(args: argparse.Namespace, config: ServeConfig | None) -> SLOConfig:
    base = config.slo if config is not None else SLOConfig()
    overrides = {
        "ttft_s": args.slo_ttft_s, "tpot_s": args.slo_tpot_s, "attainment": args.attainment_target,
    }
    try:
        return SLOConfig(**{**base.model_dump(),
                            **{k: v for k, v in overrides.items() if v is not None}})
    except ValueError as e:
        raise BenchError(f"invalid SLO flags: {e}".replace("\n", " ")) from None


def load_tokenizer(args: argparse.Namespace, config: ServeConfig | None) -> tuple[Any, str]:
    if args.tokenizer is not None:
        source = str(args.tokenizer)
    elif config is not None and config.model.path is not None:  # a local model directory
        source = str(config.model.path)
    else:
        from cluster.tiny_model import ensure_tiny_model

        # What `pdserve serve` serves without model.path: the config's embedded model.
        source = str(ensure_tiny_model(config.model.embedded if config is not None else "tiny"))
    from transformers import AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(source), source
    except (OSError, ValueError) as e:
        raise BenchError(f"cannot load a tokenizer from {source}: {e}".splitlines()[0]) from None


def workload_file_from_args(args: argparse.Namespace) -> WorkloadFile | None:
    """`--workload FILE`, read and checked against the flags it replaces."""
    path = getattr(args, "workload", None)
    if path is None:
        return None
    try:
        workload = load_workload_file(path)
    except WorkloadError as e:
        raise BenchError(str(e)) from None
    if args.dataset is not None or args.arrival != "poisson" or args.cv != 1.0:
        raise BenchError("--workload gives lengths and arrivals: no --dataset, --arrival or --cv")
    return workload


def arrivals_from_args(args: argparse.Namespace) -> tuple[ArrivalProcess, Trace | None]:
    workload = workload_file_from_args(args)
    if workload is not None:
        if workload.arrival.process == "gamma":
            return GammaArrivals(cv=workload.arrival.cv, seed=args.seed), None
        return PoissonArrivals(seed=args.seed), None
    if args.arrival == "trace":
        if args.trace is None:
            raise BenchError("--arrival trace needs --trace FILE")
        trace = load_trace(args.trace, args.trace_time_unit)
        return TraceArrivals(trace), trace
    if args.trace is not None:
        raise BenchError("--trace is only used with --arrival trace")
    if args.arrival == "gamma":
        return GammaArrivals(cv=args.cv, seed=args.seed), None
    return PoissonArrivals(seed=args.seed), None


def lengths_from_args(args: argparse.Namespace, trace: Trace | None) -> LengthSource:
    workload = workload_file_from_args(args)
    if workload is not None:
        return WorkloadFileLengths(workload.lengths)
    if args.dataset is not None:
        return load_length_csv(args.dataset)
    if trace is not None and trace.input_lens is not None and trace.output_lens is not None:
        return TraceLengths(trace.input_lens, trace.output_lens)

    def distribution(side: str) -> LengthDistribution:
        return LengthDistribution(
            kind=getattr(args, f"{side}_dist"), mean=getattr(args, f"{side}_len"),
            min_len=getattr(args, f"{side}_min"), max_len=getattr(args, f"{side}_max"),
            sigma=getattr(args, f"{side}_sigma"),
        )

    return SyntheticLengths(distribution("input"), distribution("output"))


def experiment_from_args(
    args: argparse.Namespace, config: ServeConfig | None, check_first: tuple[Target, ...] = ()
) -> Experiment:
    """Read the input files, check the running servers in `check_first`, build prompts.

    Cheap checks come first, so a typo fails in a second, not after building prompts.
    """
    if args.num_requests < 1:
        raise BenchError("--num-requests must be at least 1")
    arrivals, trace = arrivals_from_args(args)
    lengths = lengths_from_args(args, trace)
    client_from_args(args, "")  # flags --client vllm cannot express fail before any work
    for target in check_first:
        if target.url is not None:
            check_server(target.url, target.model)
    num_requests = args.num_requests
    if trace is not None and num_requests > len(trace.timestamps_s):
        print(f"note: the trace holds {len(trace.timestamps_s)} requests; sending that many",
              file=sys.stderr)
        num_requests = len(trace.timestamps_s)
    tokenizer, source = load_tokenizer(args, config)
    builder = PromptBuilder(tokenizer)
    print(f"building {num_requests} prompts with the tokenizer of {source}", file=sys.stderr)
    workload = build_workload(lengths, num_requests, builder, args.seed, args.max_context)
    if workload.num_clipped:
        print(f"note: {workload.num_clipped} requests had their lengths clipped "
              f"(prompt >= {builder.min_tokens} tokens"
              + (f", prompt + output <= {args.max_context}" if args.max_context else "") + ")",
              file=sys.stderr)
    warmup_input_len = max(_NUM_WARMUP_INPUT_TOKENS, builder.min_tokens)
    warmup = tuple(
        RequestSpec(index=-1 - i, input_len=warmup_input_len,
                    output_len=_NUM_WARMUP_OUTPUT_TOKENS,
                    prompt=builder.build(warmup_input_len,
                                         np.random.default_rng([args.seed, 3, i])))
        for i in range(max(args.num_warmup, 0))
    )
    return Experiment(
        client=client_from_args(args, source),
        workload=workload,
        arrivals=arrivals,
        slo=slo_from_args(args, config),
        request_timeout_s=args.request_timeout_s,
        drain_timeout_s=args.drain_timeout_s,
        duration_s=args.duration_s,
        continuous_usage_stats=args.continuous_usage,
        show_progress=not args.no_progress,
        warmup_requests=warmup,
    )


def client_from_args(args: argparse.Namespace, tokenizer_source: str):
    """`--client vllm`: the `vllm bench serve` equivalent of the workload flags, else None."""
    if getattr(args, "client", "pdserve") != "vllm":
        return None
    from bench.vllm_client import VllmBenchClient

    if (args.dataset is not None or args.arrival == "trace" or args.max_context is not None
            or getattr(args, "workload", None) is not None):
        raise BenchError("--client vllm drives vLLM's random dataset: no --dataset, --workload, "
                         "--arrival trace or --max-context")

    def length(side: str) -> tuple[int, float]:
        dist = getattr(args, f"{side}_dist")
        if dist == "fixed":
            return getattr(args, f"{side}_len"), 0.0
        lo, hi = getattr(args, f"{side}_min"), getattr(args, f"{side}_max")
        if dist == "uniform" and hi is not None and hi >= lo >= 1 and (lo + hi) % 2 == 0:
            mean = (lo + hi) // 2
            return mean, (hi - lo) / (hi + lo)
        raise BenchError(f"--client vllm needs --{side}-dist fixed, or uniform with an even "
                         f"--{side}-min + --{side}-max (vLLM samples len * (1 +- ratio))")

    input_len, input_ratio = length("input")
    output_len, output_ratio = length("output")
    burstiness = 1.0 if args.arrival == "poisson" else 1.0 / (args.cv ** 2)
    result_dir = getattr(args, "output_dir", None) or (
        args.output_json.parent if getattr(args, "output_json", None) else None)
    return VllmBenchClient(
        tokenizer=tokenizer_source, input_len=input_len, output_len=output_len,
        input_range_ratio=input_ratio, output_range_ratio=output_ratio, burstiness=burstiness,
        seed=args.seed, backend=args.vllm_backend,
        result_dir=Path(result_dir) / "vllm-bench" if result_dir else None)


def search_from_args(args: argparse.Namespace, slo: SLOConfig) -> SearchSettings:
    return SearchSettings(
        attainment_target=slo.attainment,
        rates_rps=tuple(args.rates) if args.rates else None,
        start_rate_rps=args.start_rate,
        growth_factor=args.growth_factor,
        min_rate_rps=args.min_rate,
        max_rate_rps=args.max_rate,
        num_bisect_steps=args.bisect_steps,
        rel_tolerance=args.rel_tolerance,
        full_sweep=args.full_sweep,
    )


def units_from_args(num_units: float | None, config: ServeConfig | None,
                    started_here: bool = True) -> Units | None:
    """Goodput's divisor: `--num-units`, else from the config; a deployment the benchmark
    starts on this host also counts the front end's core (bench.goodput.units_from_config)."""
    if num_units is not None:
        if num_units <= 0:
            raise BenchError("--num-units must be positive")
        return Units(num_units, units_from_config(config).name if config else "unit")
    if config is None:
        return None
    return units_from_config(config, host_cores=len(os.sched_getaffinity(0)) if started_here else None)


def serve_options_from_args(args: argparse.Namespace) -> ServeOptions:
    return ServeOptions(serve_command=parse_serve_command(args.serve_command), port=args.port,
                        health_timeout_s=args.health_timeout_s)


def peer_target(label: str, spec: str, config: ServeConfig | None,
                extra_args: tuple[str, ...] = ()) -> Target:
    """A plain-vLLM target mirroring `config`'s model (else the embedded tiny model)."""
    from bench.goodput import Units
    from bench.peer_vllm import parse_peer_spec, peer_from_config

    binding, cpus = parse_peer_spec(spec)
    peer = peer_from_config(config if config is not None else ServeConfig(), binding, cpus,
                            extra_args)
    return Target(label=label, peer=peer, units=Units(float(peer.num_cores), "core"))


def parse_target_spec(text: str) -> tuple[str | None, str]:
    """`[LABEL=]SPEC` -> (label or None, spec). A label has no ':' or '/', so
    `vllm:cores=0-1` and URLs with queries are specs, not labels."""
    label, eq, spec = text.partition("=")
    if eq and label and not any(c in label for c in ":/"):
        return label, spec
    return None, text


def targets_from_specs(
    specs: list[str], peer_config: ServeConfig | None, extra_args: tuple[str, ...] = ()
) -> list[tuple[Target, ServeConfig | None]]:
    """`--target [LABEL=]SPEC` values: a URL, `vllm[:options]` or a deployment config."""
    out: list[tuple[Target, ServeConfig | None]] = []
    configs = []
    parsed = []
    for text in specs:
        label, spec = parse_target_spec(text)
        if not spec:
            raise BenchError(f"--target {text!r}: empty spec")
        parsed.append((label, spec))
        if not spec.startswith(("http://", "https://", "vllm")):
            configs.append(load_serve_config(Path(spec)))
    mirrored = peer_config or (configs[0] if configs else None)
    for label, spec in parsed:
        if spec.startswith(("http://", "https://")):
            out.append((Target(label=label or spec, url=spec), None))
        elif spec == "vllm" or spec.startswith("vllm:"):
            out.append((peer_target(label or spec, spec, mirrored, extra_args), None))
        else:
            path = Path(spec)
            config = load_serve_config(path)
            out.append((Target(label=label or path.stem, config_path=path,
                               units=units_from_args(None, config)), config))
    return out


def target_from_args(
    args: argparse.Namespace, suffix: str = ""
) -> tuple[Target, ServeConfig | None]:
    """The target of `--url`/`--config` (with `suffix` "a": `--url-a`/`--config-a`...)."""
    key = f"_{suffix}" if suffix else ""
    url, config_path = getattr(args, f"url{key}"), getattr(args, f"config{key}")
    config = load_serve_config(config_path)
    label = getattr(args, f"label{key}", None) or (
        config_path.stem if config_path is not None else url)
    target = Target(label=label, config_path=config_path, url=url,
                    units=units_from_args(getattr(args, f"num_units{key}"), config,
                                          started_here=url is None),
                    model=getattr(args, f"model{key}"))
    return target, config
