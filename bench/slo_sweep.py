"""SLO sweep of a finished `pdserve bench compare` run, any number of targets.

For every (TTFT, TPOT) SLO pair, re-judged from the run's per-request records (as
`bench.rejudge` does, which prints two targets and their ratio):

- goodput: the highest probed rate whose attainment, and that of every lower probed
  rate, meets the target share;
- SLO goodput at each probed rate: requests meeting both SLOs per second of that run;

and each target's ratio to the first (put the peer first).

    python -m bench.slo_sweep comparison.json --ttft 0.5 1 2 3 --tpot 0.02 0.05 0.1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.errors import BenchError
from bench.rejudge import attainment_by_rate, goodput, request_meets
from bench.report import format_table


def met_per_s(measurement: dict, ttft_s: float, tpot_s: float) -> float:
    records = measurement["records"]
    met = sum(request_meets(r, ttft_s, tpot_s) for r in records)
    return met / max(float(measurement["summary"]["wall_time_s"]), 1e-9)


def _ratio(value: float, base: float) -> str:
    if base > 0:
        return f"{value / base:.2f}x"
    return "-" if value == 0 else "inf"


def sweep(data: dict, ttft_values: list[float], tpot_values: list[float],
          target_share: float) -> str:
    targets = data["targets"]
    labels = [t["label"] for t in targets]
    rates = sorted({float(m["summary"]["rate_rps"]) for t in targets for m in t["measurements"]})
    headers = ["TTFT s", "TPOT s"] + [f"goodput {l}" for l in labels] + \
        [f"{l}/first" for l in labels[1:]]
    rows = []
    for ttft in ttft_values:
        for tpot in tpot_values:
            g = [goodput(attainment_by_rate(t, ttft, tpot), target_share) for t in targets]
            rows.append([f"{ttft:g}", f"{tpot:g}"] + [f"{x:g}" for x in g]
                        + [_ratio(x, g[0]) for x in g[1:]])
    out = [f"attainment target {target_share:.0%}; probed rates {rates} req/s",
           "goodput = highest probed rate meeting the target (and every lower one)",
           format_table(headers, rows), ""]
    for rate in rates:
        headers = ["TTFT s", "TPOT s"] + [f"{l} met/s" for l in labels] + \
            [f"{l}/first" for l in labels[1:]]
        rows = []
        for ttft in ttft_values:
            for tpot in tpot_values:
                vals = []
                for t in targets:
                    m = next((m for m in t["measurements"]
                              if float(m["summary"]["rate_rps"]) == rate), None)
                    vals.append(met_per_s(m, ttft, tpot) if m else float("nan"))
                rows.append([f"{ttft:g}", f"{tpot:g}"] + [f"{v:.3g}" for v in vals]
                            + [_ratio(v, vals[0]) for v in vals[1:]])
        out += [f"at {rate:g} req/s: requests meeting both SLOs per second", 
                format_table(headers, rows), ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.slo_sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("comparison", type=Path)
    p.add_argument("--ttft", type=float, nargs="+", required=True, help="TTFT SLOs (s)")
    p.add_argument("--tpot", type=float, nargs="+", required=True, help="TPOT SLOs (s)")
    p.add_argument("--attainment", type=float, default=None,
                   help="attainment target (default: the run's)")
    args = p.parse_args(argv)
    try:
        try:
            data = json.loads(args.comparison.read_text())
            share = args.attainment or data["slo"]["attainment"]
            data["targets"][0]["measurements"]
        except (OSError, ValueError, KeyError, IndexError) as e:
            raise BenchError(f"{args.comparison}: not a comparison.json from "
                             f"`pdserve bench compare` ({e})") from None
        print(sweep(data, args.ttft, args.tpot, share))
    except BenchError as e:
        print(f"pdserve bench: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
