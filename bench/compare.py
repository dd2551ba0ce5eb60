"""Side-by-side goodput comparison of deployments, in one invocation.

For each target in turn: start it (`pdserve serve --config X --port P`, see
`bench.deployment`, or plain vLLM's OpenAI server, see `bench.peer_vllm`) or use an
already-running URL; warm it up; run the same goodput
search with the same `Experiment` (same prompts, lengths, arrival seed); measure the CDF
rate if the search did not; stop it. Then print one table, and write to the output dir:

    comparison.json          settings, per target: goodput, every measurement and record
    attainment_vs_rate.png   attainment of every probe, one line per target
    ttft_cdf.png, tpot_cdf.png
                             latency CDFs of every target at one common rate
    <label>-server.log       output of each started deployment

With `rounds` > 1 (`--rounds N`, fixed rates only) the targets take turns instead: round r
starts each target in an order rotated by r (A B C, B C A, C A B, ...), measures every rate
and stops it, and each target's runs at a rate are pooled across rounds. A machine whose
speed drifts over minutes (shared hosts do: the same vLLM server's TPOT has differed by 2x
between days here) then weighs on every target alike, and the per-round figures in
comparison.json ("rounds") show how large the drift was.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

from bench.deployment import ServerProcess, free_port
from bench.errors import BenchError
from bench.peer_vllm import VllmPeer
from bench.experiment import Experiment, Measurement, find_goodput, measure, warm_up
from bench.goodput import GoodputResult, GoodputSearch, SearchSettings, Units
from bench.loadgen import check_server
from bench.metrics import request_metrics, summarize
from bench.plots import plot_attainment_vs_rate, plot_cdf
from bench.records import RunRecords
from bench.report import (format_rate, format_table, goodput_json, measurement_json,
                          write_json)


@dataclass(frozen=True)
class Target:
    """A deployment to benchmark: a pdserve config to start, a plain-vLLM peer to start,
    or the URL of a running server."""

    label: str
    config_path: Path | None = None
    url: str | None = None
    units: Units | None = None
    model: str | None = None  # None: the first id of GET /v1/models
    peer: VllmPeer | None = None

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.config_path, self.url, self.peer)) != 1:
            raise ValueError("a target needs exactly one of config_path, url and peer")

    @property
    def source(self) -> str:
        if self.peer is not None:
            return self.peer.describe()
        return str(self.url or self.config_path)


@dataclass(frozen=True)
class TargetResult:
    target: Target
    model: str
    base_url: str
    goodput: GoodputResult
    measurements: tuple[Measurement, ...]

    def at_rate(self, rate_rps: float) -> Measurement | None:
        return next((m for m in self.measurements if m.summary.rate_rps == rate_rps), None)


@dataclass(frozen=True)
class ServeOptions:
    serve_command: list[str] | None = None  # None: `pdserve` (bench.deployment)
    port: int | None = None  # None: a free port per deployment
    health_timeout_s: float = 600.0


def _file_label(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label) or "target"


@contextlib.contextmanager
def open_target(target: Target, output_dir: Path, serve: ServeOptions) -> Iterator[str]:
    """Yield the base URL of a ready server; a started one is stopped on exit."""
    if target.url is not None:
        yield target.url.rstrip("/")
        return
    port = serve.port if serve.port is not None else free_port()
    log_path = output_dir / f"{_file_label(target.label)}-server.log"
    if target.peer is not None:
        server = ServerProcess(
            config_path=None, port=port, log_path=log_path,
            health_timeout_s=serve.health_timeout_s, argv=target.peer.argv(port),
            env=target.peer.env(), cpus=target.peer.affinity,
        )
    else:
        assert target.config_path is not None
        server = ServerProcess(
            config_path=target.config_path, port=port, log_path=log_path,
            serve_command=serve.serve_command, health_timeout_s=serve.health_timeout_s,
        )
    with server:
        yield server.base_url


def benchmark_target(
    target: Target,
    experiment: Experiment,
    search: SearchSettings,
    output_dir: Path,
    serve: ServeOptions,
    extra_rate_rps: float | None = None,
    on_measurement: Callable[[Measurement], None] | None = None,
) -> TargetResult:
    """Goodput search on one target (plus a measurement at `extra_rate_rps` if missing)."""
    with open_target(target, output_dir, serve) as base_url:
        model = check_server(base_url, target.model)
        asyncio.run(warm_up(experiment, base_url, model))
        goodput, measurements = asyncio.run(
            find_goodput(experiment, base_url, model, search, on_measurement)
        )
        if extra_rate_rps is not None and all(
            m.summary.rate_rps != extra_rate_rps for m in measurements
        ):
            extra = asyncio.run(measure(experiment, base_url, model, extra_rate_rps))
            measurements.append(extra)
            if on_measurement is not None:
                on_measurement(extra)
    return TargetResult(target, model, base_url, goodput, tuple(measurements))


def pool_measurements(parts: list[Measurement], experiment: Experiment) -> Measurement:
    """One measurement from several runs at the same rate: their records together, over
    their summed wall time (so throughput stays a per-second figure)."""
    if not parts:
        raise ValueError("nothing to pool")
    rates = {m.run.rate_rps for m in parts}
    if len(rates) != 1:
        raise ValueError(f"runs at different rates cannot be pooled: {sorted(map(str, rates))}")
    run = RunRecords(records=tuple(r for m in parts for r in m.run.records),
                     rate_rps=parts[0].run.rate_rps,
                     wall_time_s=sum(m.run.wall_time_s for m in parts),
                     num_not_sent=sum(m.run.num_not_sent for m in parts))
    return Measurement(summarize(run, experiment.slo), run)


@dataclass(frozen=True)
class RoundRun:
    """One target's run at one rate in one round (for the drift report)."""

    round_index: int
    position: int  # its place in that round's order
    label: str
    measurement: Measurement


def round_order(targets: list[Target], round_index: int) -> list[Target]:
    """Round r's order: the targets rotated by r, so each one leads once every n rounds."""
    k = round_index % len(targets)
    return targets[k:] + targets[:k]


def benchmark_rounds(
    targets: list[Target],
    experiment: Experiment,
    search: SearchSettings,
    rounds: int,
    output_dir: Path,
    serve: ServeOptions,
    on_measurement: Callable[[Measurement], None] | None = None,
    on_start: Callable[[int, Target], None] | None = None,
) -> tuple[list[TargetResult], list[RoundRun]]:
    """Every target at every rate of `search.rates_rps`, in `rounds` rotated rounds; each
    target's goodput is judged on its pooled runs at each rate."""
    if search.rates_rps is None or not search.full_sweep:
        raise BenchError("--rounds needs fixed rates measured in full (--rates ... --full-sweep)")
    if rounds < 1:
        raise BenchError(f"--rounds must be at least 1, got {rounds}")
    runs: list[RoundRun] = []
    seen: dict[str, tuple[str, str]] = {}
    for r in range(rounds):
        for position, target in enumerate(round_order(targets, r)):
            if on_start is not None:
                on_start(r, target)
            logged = target if rounds == 1 else replace(target, label=f"{target.label}-round{r + 1}")
            with open_target(logged, output_dir, serve) as base_url:
                model = check_server(base_url, target.model)
                asyncio.run(warm_up(experiment, base_url, model))
                for rate in search.rates_rps:
                    m = asyncio.run(measure(experiment, base_url, model, rate))
                    runs.append(RoundRun(r, position, target.label, m))
                    if on_measurement is not None:
                        on_measurement(m)
            seen[target.label] = (model, base_url)
    results = []
    for target in targets:
        model, base_url = seen[target.label]
        pooled = [pool_measurements([x.measurement for x in runs if x.label == target.label
                                     and x.measurement.run.rate_rps == rate], experiment)
                  for rate in search.rates_rps]
        goodput_search = GoodputSearch(search)
        for m in pooled:
            rate = goodput_search.next_rate()
            assert rate == m.run.rate_rps, (rate, m.run.rate_rps)
            goodput_search.observe(rate, m.summary.attainment)
        results.append(TargetResult(target, model, base_url, goodput_search.result(), tuple(pooled)))
    return results, runs


def round_table(runs: list[RoundRun]) -> str:
    """Each round's own figures, target by target: how far the machine drifted."""
    headers = ["round", "order", "deployment", "rate", "attain", "p50 TTFT ms", "p50 TPOT ms",
               "p90 TPOT ms"]
    rows = []
    for x in runs:
        s = x.measurement.summary
        rows.append([str(x.round_index + 1), str(x.position + 1), x.label, format_rate(s.rate_rps),
                     f"{s.attainment * 100:.1f}%",
                     f"{s.ttft_s.p50 * 1e3:.1f}" if s.ttft_s else "-",
                     f"{s.tpot_s.p50 * 1e3:.2f}" if s.tpot_s else "-",
                     f"{s.tpot_s.p90 * 1e3:.2f}" if s.tpot_s else "-"])
    return format_table(headers, rows)


def pick_cdf_rate(results: list[TargetResult], attainment_target: float) -> float | None:
    """A rate every target was measured at: the highest where one of them still meets the
    target (where the deployments differ most visibly), else the lowest common rate."""
    common = set.intersection(*({m.summary.rate_rps for m in r.measurements} for r in results))
    common.discard(None)
    if not common:
        return None
    passing = [rate for rate in common
               if any(m.summary.attainment >= attainment_target
                      for r in results if (m := r.at_rate(rate)) is not None)]
    return max(passing) if passing else min(common)  # type: ignore[type-var]


def comparison_table(results: list[TargetResult], cdf_rate_rps: float | None) -> str:
    headers = ["deployment", "units", "goodput req/s", "per unit", "vs first"]
    if cdf_rate_rps is not None:
        rate = format_rate(cdf_rate_rps)
        headers += [f"attain@{rate}", f"p90 TTFT ms@{rate}", f"p90 TPOT ms@{rate}",
                    f"out tok/s@{rate}"]
    rows = []
    baseline = None
    for r in results:
        units = r.target.units
        per_unit = (r.goodput.goodput_rps / units.count if units and units.count > 0
                    else r.goodput.goodput_rps)
        if baseline is None:
            baseline = per_unit
        bound = "" if r.goodput.is_upper_bounded else ">="
        row = [
            r.target.label,
            str(units) if units else "-",
            f"{bound}{r.goodput.goodput_rps:.3g}",
            f"{per_unit:.3g}" if units else "-",
            f"{per_unit / baseline:.2f}x" if baseline else "-",
        ]
        if cdf_rate_rps is not None:
            m = r.at_rate(cdf_rate_rps)
            s = m.summary if m else None
            row += [
                f"{s.attainment * 100:.1f}%" if s else "-",
                f"{s.ttft_s.p90 * 1e3:.1f}" if s and s.ttft_s else "-",
                f"{s.tpot_s.p90 * 1e3:.1f}" if s and s.tpot_s else "-",
                f"{s.output_throughput_tps:.4g}" if s else "-",
            ]
        rows.append(row)
    return format_table(headers, rows)


def slo_goodput_rps(m: Measurement) -> float:
    """Requests that met both SLOs per second of the run (vLLM's "request goodput")."""
    s = m.summary
    return s.attainment * s.num_sent / max(s.wall_time_s, 1e-9)


def rate_table(results: list[TargetResult]) -> str:
    """Every target at every rate all of them were measured at: throughput, SLO goodput
    (met requests per second) and its ratio to the first target, latencies."""
    common = sorted(set.intersection(*({m.summary.rate_rps for m in r.measurements
                                        if m.summary.rate_rps is not None} for r in results)))
    headers = ["rate", "deployment", "req/s", "goodput req/s", "vs first", "attain",
               "p50 TTFT ms", "p90 TTFT ms", "p50 TPOT ms", "p90 TPOT ms", "out tok/s"]
    rows = []
    for rate in common:
        base = None
        for r in results:
            m = r.at_rate(rate)
            assert m is not None
            s = m.summary
            good = slo_goodput_rps(m)
            if base is None:
                base = good
            rows.append([
                format_rate(rate), r.target.label, f"{s.request_throughput_rps:.3g}",
                f"{good:.3g}", f"{good / base:.2f}x" if base else "-",
                f"{s.attainment * 100:.1f}%",
                f"{s.ttft_s.p50 * 1e3:.1f}" if s.ttft_s else "-",
                f"{s.ttft_s.p90 * 1e3:.1f}" if s.ttft_s else "-",
                f"{s.tpot_s.p50 * 1e3:.2f}" if s.tpot_s else "-",
                f"{s.tpot_s.p90 * 1e3:.2f}" if s.tpot_s else "-",
                f"{s.output_throughput_tps:.4g}",
            ])
    return format_table(headers, rows)


def write_outputs(
    results: list[TargetResult],
    experiment: Experiment,
    cdf_rate_rps: float | None,
    output_dir: Path,
    settings: dict[str, Any],
    rounds: list[RoundRun] | None = None,
) -> list[Path]:
    """comparison.json and the three plots; returns the paths written."""
    output_dir.mkdir(parents=True, exist_ok=True)
    slo = experiment.slo
    data = {
        "settings": settings,
        "slo": slo.model_dump(),
        "cdf_rate_rps": cdf_rate_rps,
        "targets": [
            {
                "label": r.target.label,
                "config": str(r.target.config_path) if r.target.config_path else None,
                "peer": ({"kind": "vllm", "description": r.target.peer.describe(),
                          "argv": r.target.peer.argv(0)[1:], "binding": r.target.peer.binding,
                          "cores": r.target.peer.affinity,
                          "kv_cache_gib": r.target.peer.kv_cache_gib}
                         if r.target.peer else None),
                "url": r.base_url,
                "model": r.model,
                "goodput": goodput_json(r.goodput, r.target.units),
                "measurements": [measurement_json(m) for m in r.measurements],
            }
            for r in results
        ],
    }
    if rounds:
        data["rounds"] = [{"round": x.round_index + 1, "position": x.position + 1,
                           "label": x.label, "measurement": measurement_json(x.measurement)}
                          for x in rounds]
    paths = [output_dir / "comparison.json", output_dir / "attainment_vs_rate.png"]
    write_json(paths[0], data)
    plot_attainment_vs_rate(
        {r.target.label: [(m.summary.rate_rps, m.summary.attainment) for m in r.measurements
                          if m.summary.rate_rps is not None] for r in results},
        slo.attainment,
        paths[1],
        goodputs_rps={r.target.label: r.goodput.goodput_rps for r in results},
    )
    if cdf_rate_rps is not None:
        ttfts: dict[str, list[float]] = {}
        tpots: dict[str, list[float]] = {}
        for r in results:
            m = r.at_rate(cdf_rate_rps)
            per_request = [request_metrics(rec, slo) for rec in m.run.records] if m else []
            ok = [x for x in per_request if x.is_ok]
            ttfts[r.target.label] = [x.ttft_s for x in ok if x.ttft_s is not None]
            tpots[r.target.label] = [x.tpot_s for x in ok if x.tpot_s is not None]
        rate = format_rate(cdf_rate_rps)
        paths += [output_dir / "ttft_cdf.png", output_dir / "tpot_cdf.png"]
        plot_cdf(ttfts, slo.ttft_s, "TTFT", paths[2], f"TTFT CDF at {rate} req/s")
        plot_cdf(tpots, slo.tpot_s, "TPOT", paths[3], f"TPOT CDF at {rate} req/s")
    return paths
