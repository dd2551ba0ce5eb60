"""Re-judge a finished `pdserve bench compare` run at other SLOs, without re-running it.

A fixed-rate sweep (`compare --full-sweep --bisect-steps 0`) records every request's TTFT
and TPOT at every probed rate, so attainment and goodput at any other SLO follow from the
same data. Goodput here is the highest probed rate whose attainment, and that of every
lower probed rate, meets the target.

    python -m bench.rejudge bench/results/X/comparison.json --ttft 1.5 --tpot 0.025 0.04 0.06
    python -m bench.rejudge comparison.json --compact out.json   # drop per-token gaps
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.errors import BenchError


def request_meets(record: dict, ttft_s: float, tpot_s: float) -> bool:
    if record.get("outcome") != "ok" or record.get("ttft_s") is None:
        return False
    if record["ttft_s"] > ttft_s:
        return False
    n = record.get("num_output_tokens") or 0
    if n <= 1:
        return True
    return (record["e2e_s"] - record["ttft_s"]) / (n - 1) <= tpot_s


def attainment_by_rate(target: dict, ttft_s: float, tpot_s: float) -> list[tuple[float, float]]:
    rows = []
    for m in target["measurements"]:
        records = m["records"]
        met = sum(request_meets(r, ttft_s, tpot_s) for r in records)
        rows.append((float(m["summary"]["rate_rps"]), met / len(records) if records else 0.0))
    return sorted(rows)


def goodput(rows: list[tuple[float, float]], attainment_target: float) -> float:
    best = 0.0
    for rate, att in rows:
        if att < attainment_target:
            break
        best = rate
    return best


def _units(target: dict) -> float:
    return float(target["goodput"].get("units", {}).get("count") or 1)


def report(data: dict, ttft_values: list[float], tpot_values: list[float], target_share: float) -> str:
    labels = [t["label"] for t in data["targets"]]
    rates = sorted({float(m["summary"]["rate_rps"]) for t in data["targets"] for m in t["measurements"]})
    lines = [f"attainment target {target_share:.0%}; probed rates {rates} req/s",
             f"{'TTFT s':>7} {'TPOT s':>7}  " + "  ".join(f"{l:>22}" for l in labels) + "   ratio b/a"]
    for ttft in ttft_values:
        for tpot in tpot_values:
            cells, per_unit = [], []
            for t in data["targets"]:
                g = goodput(attainment_by_rate(t, ttft, tpot), target_share)
                per_unit.append(g / _units(t))
                cells.append(f"{g:6.2f} req/s ({per_unit[-1]:5.2f}/unit)")
            ratio = per_unit[1] / per_unit[0] if len(per_unit) == 2 and per_unit[0] > 0 else float("nan")
            lines.append(f"{ttft:7.3f} {tpot:7.3f}  " + "  ".join(f"{c:>22}" for c in cells) + f"   {ratio:6.2f}x")
    return "\n".join(lines)


def compact(data: dict) -> dict:
    """The same comparison without per-token gaps (a small file to keep in the repo)."""
    out = json.loads(json.dumps(data))
    for t in out["targets"]:
        for m in t["measurements"]:
            for r in m["records"]:
                r.pop("itl_s", None)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.rejudge", description=__doc__.splitlines()[0])
    p.add_argument("comparison", type=Path)
    p.add_argument("--ttft", type=float, nargs="+", help="TTFT SLOs in seconds (default: the run's)")
    p.add_argument("--tpot", type=float, nargs="+", help="TPOT SLOs in seconds (default: the run's)")
    p.add_argument("--attainment", type=float, help="attainment target (default: the run's)")
    p.add_argument("--compact", type=Path, help="also write the comparison without per-token gaps")
    args = p.parse_args(argv)
    try:
        try:
            data = json.loads(args.comparison.read_text())
            slo = data["slo"]
            data["targets"][0]["measurements"]
        except (OSError, ValueError, KeyError, IndexError) as e:
            raise BenchError(f"{args.comparison}: not a comparison.json from `pdserve bench compare` ({e})")
        print(report(data, args.ttft or [slo["ttft_s"]], args.tpot or [slo["tpot_s"]],
                     args.attainment or slo["attainment"]))
        if args.compact:
            args.compact.write_text(json.dumps(compact(data), separators=(",", ":")))
            print(f"wrote {args.compact}")
    except BenchError as e:
        print(f"pdserve bench: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
