"""Text tables and JSON files for benchmark results (no computation happens here)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

from bench.experiment import Measurement
from bench.goodput import GoodputResult, Units
from bench.metrics import Distribution, RunSummary


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(headers, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value * 1e3:.1f}"


def _pct(value: float) -> str:
    return f"{value * 100:.1f}%"


def format_rate(rate_rps: float | None) -> str:
    return "trace" if rate_rps is None else f"{rate_rps:.3g}"


def format_probe_line(summary: RunSummary) -> str:
    verdict = "meets" if summary.meets_target else "misses"
    p90 = lambda d: _ms(d.p90 if d else None)  # noqa: E731
    line = (
        f"rate {format_rate(summary.rate_rps)} req/s: attainment {_pct(summary.attainment)} "
        f"({verdict} {_pct(summary.slo.attainment)}; TTFT {_pct(summary.ttft_attainment)}, "
        f"TPOT {_pct(summary.tpot_attainment)}), p90 TTFT {p90(summary.ttft_s)} ms, "
        f"p90 TPOT {p90(summary.tpot_s)} ms, {summary.num_ok}/{summary.num_sent} ok"
    )
    return line


def _distribution_row(name: str, dist: Distribution | None) -> list[str]:
    if dist is None:
        return [name, "-", "-", "-", "-", "-"]
    return [name, _ms(dist.mean), _ms(dist.p50), _ms(dist.p90), _ms(dist.p99), _ms(dist.max)]


def format_summary(summary: RunSummary) -> str:
    slo = summary.slo
    lines = [
        "rate (offered)     "
        + ("trace replayed at its own pace" if summary.rate_rps is None
           else f"{summary.rate_rps:.3g} req/s"),
        f"requests           {summary.num_sent} sent, {summary.num_ok} ok"
        + (f", {summary.num_not_sent} not sent (duration bound)" if summary.num_not_sent else ""),
        f"SLO                TTFT <= {slo.ttft_s * 1e3:g} ms, TPOT <= {slo.tpot_s * 1e3:g} ms, "
        f"target {_pct(slo.attainment)}",
        f"attainment         {_pct(summary.attainment)} "
        f"(TTFT {_pct(summary.ttft_attainment)}, TPOT {_pct(summary.tpot_attainment)}) -> "
        + ("meets target" if summary.meets_target else "misses target"),
        f"throughput         {summary.request_throughput_rps:.3g} req/s, "
        f"{summary.output_throughput_tps:.4g} output tok/s, "
        f"{summary.input_throughput_tps:.4g} input tok/s over {summary.wall_time_s:.1f} s",
        "",
        format_table(
            ["latency (ms)", "mean", "p50", "p90", "p99", "max"],
            [_distribution_row("TTFT", summary.ttft_s), _distribution_row("TPOT", summary.tpot_s),
             _distribution_row("ITL", summary.itl_s), _distribution_row("e2e", summary.e2e_s)],
        ),
    ]
    failed = {k: v for k, v in summary.outcome_counts.items() if k != "ok"}
    if failed:
        lines.append("failed: " + ", ".join(f"{n} {k}" for k, n in sorted(failed.items()))
                     + f"; first error: {summary.first_error}")
    lines += _warnings(summary)
    return "\n".join(lines)


def _warnings(summary: RunSummary) -> list[str]:
    warnings = []
    if summary.num_prompt_len_mismatches:
        warnings.append(
            f"warning: the server counted other prompt lengths than built for "
            f"{summary.num_prompt_len_mismatches} requests; is --tokenizer the served model's?"
        )
    if summary.num_output_len_mismatches:
        warnings.append(
            f"warning: {summary.num_output_len_mismatches} requests got another output length "
            "than asked for; does the server honour ignore_eos and min_tokens?"
        )
    if summary.max_send_lag_s > 0.05:
        warnings.append(
            f"warning: the client sent requests up to {summary.max_send_lag_s * 1e3:.0f} ms late; "
            "it may be overloaded"
        )
    return warnings


def format_goodput(result: GoodputResult, units: Units | None) -> str:
    bound = "" if result.is_upper_bounded else " (every probed rate met the target: a lower bound)"
    line = f"goodput {result.goodput_rps:.3g} req/s{bound}"
    if units is not None and units.count > 0:
        line += f", {result.goodput_rps / units.count:.3g} req/s per {units.name} ({units})"
    return line


def measurement_json(measurement: Measurement, include_records: bool = True) -> dict[str, Any]:
    data: dict[str, Any] = {"summary": measurement.summary.to_json()}
    run = measurement.run
    data["num_not_sent"] = run.num_not_sent
    if include_records:
        data["records"] = [r.to_json() for r in run.records]
    return data


def goodput_json(result: GoodputResult, units: Units | None) -> dict[str, Any]:
    return {
        "goodput_rps": result.goodput_rps,
        "lowest_failing_rate_rps": result.lowest_failing_rate_rps,
        "units": None if units is None else {"count": units.count, "name": units.name},
        "goodput_per_unit_rps": (result.goodput_rps / units.count
                                 if units is not None and units.count > 0 else None),
        "probes": [asdict(p) for p in result.probes],
    }


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")
