"""Live figures of a running pdserve, read from its Prometheus `/metrics` text.

`parse_prometheus_text` and `live_figures` are pure; `fetch_metrics` is the only I/O (stdlib
urllib, loopback or cluster-internal URL). `pdserve plan --from-metrics URL` uses them for an
offline what-if: "what would the planner deploy for the traffic this deployment sees now?"

What the metrics hold, and so what a what-if can use: the arrival rate (requests ended per
second over the router's sliding window), mean prompt and output lengths (token counters /
requests), the SLO targets, the measured attainment and mean TTFT/TPOT, and the instances
per role. Length *distributions* are not exported, so unless the user gives a length CSV the
what-if plans for the observed means (a fixed-length workload, said so in its output).
"""

from __future__ import annotations

import math
import re
import urllib.error
import urllib.request
from dataclasses import dataclass

_LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(\s+\S+)?$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class LiveMetricsError(ValueError):
    """Metrics that cannot be read or lack what planning needs; one-line message."""


def parse_prometheus_text(text: str) -> Samples:
    """{(metric name, sorted labels): value} of every sample line (comments skipped)."""
    out: Samples = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if m is None:
            raise LiveMetricsError(f"metrics line {number} is not Prometheus text: {line[:80]!r}")
        labels = tuple(sorted(_LABEL.findall(m.group(3) or "")))
        try:
            value = float(m.group(4))
        except ValueError:
            raise LiveMetricsError(f"metrics line {number}: value {m.group(4)!r} is not a number") from None
        out[(m.group(1), labels)] = value
    return out


def _total(samples: Samples, name: str, **match: str) -> float | None:
    values = [v for (n, labels), v in samples.items() if n == name
              and all(dict(labels).get(k) == want for k, want in match.items())]
    return sum(values) if values else None


@dataclass(frozen=True)
class LiveFigures:
    arrival_rate_rps: float
    num_requests: float
    mean_prompt_tokens: float
    mean_output_tokens: float
    attainment: float | None
    ttft_target_s: float | None
    tpot_target_s: float | None
    attainment_target: float | None
    mean_ttft_s: float | None
    mean_tpot_s: float | None
    instances: dict[str, int]  # role -> ready instances


def live_figures(samples: Samples) -> LiveFigures:
    requests = _total(samples, "pdserve_requests_total")
    prompt = _total(samples, "pdserve_prompt_tokens_total")
    output = _total(samples, "pdserve_generation_tokens_total")
    rate = _total(samples, "pdserve_throughput_requests_per_second")
    missing = [name for name, v in (("pdserve_requests_total", requests),
                                    ("pdserve_prompt_tokens_total", prompt),
                                    ("pdserve_generation_tokens_total", output),
                                    ("pdserve_throughput_requests_per_second", rate)) if v is None]
    if missing:
        raise LiveMetricsError(f"the metrics lack {', '.join(missing)}: is this a pdserve router's /metrics?")
    if not requests:
        raise LiveMetricsError("the deployment has served no requests yet: nothing to plan from")
    if not rate or rate <= 0:
        raise LiveMetricsError("no requests ended in the router's last window: the rate is 0")

    def mean(name: str) -> float | None:
        s, c = _total(samples, f"{name}_sum"), _total(samples, f"{name}_count")
        return s / c if s is not None and c else None

    roles = {dict(labels).get("role") for (n, labels) in samples if n == "pdserve_instances"}
    return LiveFigures(
        arrival_rate_rps=rate, num_requests=requests,
        mean_prompt_tokens=prompt / requests, mean_output_tokens=output / requests,
        attainment=_total(samples, "pdserve_slo_attainment_ratio"),
        ttft_target_s=_total(samples, "pdserve_slo_target_seconds", kind="ttft"),
        tpot_target_s=_total(samples, "pdserve_slo_target_seconds", kind="tpot"),
        attainment_target=_total(samples, "pdserve_slo_attainment_target_ratio"),
        mean_ttft_s=mean("pdserve_request_ttft_seconds"),
        mean_tpot_s=mean("pdserve_request_tpot_seconds"),
        instances={r: int(_total(samples, "pdserve_instances", role=r, state="ready") or 0)
                   for r in sorted(r for r in roles if r)},
    )


def fetch_metrics(url: str, timeout_s: float = 10.0) -> str:
    """GET the Prometheus text at `url` (a pdserve router's /metrics)."""
    if not url.startswith(("http://", "https://")):
        raise LiveMetricsError(f"--from-metrics needs an http(s) URL, got {url!r}")
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.read().decode("utf-8", errors="replace")
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise LiveMetricsError(f"cannot read metrics from {url}: {reason}") from None


def whatif_overrides(figures: LiveFigures, have_lengths: bool) -> dict:
    """PlanRequest fields the live figures supply (the user's flags still win)."""
    tree: dict = {"workload": {"rate": round(figures.arrival_rate_rps, 6)}, "slo": {}}
    if not have_lengths:
        tree["workload"]["lengths"] = {"kind": "fixed",
                                       "input_len": max(1, math.ceil(figures.mean_prompt_tokens)),
                                       "output_len": max(1, math.ceil(figures.mean_output_tokens))}
    for key, value in (("ttft_s", figures.ttft_target_s), ("tpot_s", figures.tpot_target_s),
                       ("attainment", figures.attainment_target)):
        if value is not None and value > 0:
            tree["slo"][key] = value
    return tree


def describe(figures: LiveFigures, url: str, have_lengths: bool) -> str:
    parts = [f"live deployment at {url}: {figures.arrival_rate_rps:.2f} req/s, "
             f"{figures.num_requests:.0f} requests so far, prompt mean {figures.mean_prompt_tokens:.0f} "
             f"and output mean {figures.mean_output_tokens:.0f} tokens"]
    if figures.attainment is not None:
        parts.append(f"attainment {100 * figures.attainment:.1f}%")
    if figures.instances:
        parts.append("instances " + ", ".join(f"{n} {r}" for r, n in figures.instances.items()))
    text = "; ".join(parts)
    if not have_lengths:
        text += ("\n  (the metrics give mean lengths only: planning for fixed lengths at the means; "
                 "pass --workload-csv for the real distribution)")
    return text
