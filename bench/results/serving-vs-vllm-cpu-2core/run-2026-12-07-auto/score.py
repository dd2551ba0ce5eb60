"""Mode auto's pick in each cell of the SLO sweep against the measured goodput there.

    python bench/results/serving-vs-vllm-cpu-2core/run-2026-12-07-auto/score.py seed0.txt [seed1.txt ...]

For every (TTFT, TPOT) cell it asks the planner what `pdserve serve --mode auto
--embedded-model small --kv-cache-gib 2 --workload configs/small-workload-512-1536.yaml`
would serve (pdserve/auto_mode.py, the same call), maps that to the measured deployment of
the same layout, and reads the measured goodputs from each run's SLO-sweep table (the
output of `python -m bench.slo_sweep`, at the end of the run's text file).
"""

from __future__ import annotations

import sys
from pathlib import Path

from cluster.config import load_config
from cluster.planner.problem import build_problem
from cluster.planner.search import search
from pdserve.auto_mode import plan_request, planner_workload
from pdserve.launcher import resolve_model_path

HERE = Path(__file__).parent
COLUMNS = ["vllm", "pdserve-in-router", "auto-disagg-fe", "auto-colocated-2", "auto-disagg-shared"]


def measured(path: Path) -> dict[tuple[float, float], dict[str, float]]:
    text = path.read_text().split("goodput = highest probed rate")[1].split("\n\n")[0]
    out = {}
    for line in text.splitlines()[3:]:
        f = line.split()
        if len(f) >= 2 + len(COLUMNS):
            out[(float(f[0]), float(f[1]))] = dict(zip(COLUMNS, map(float, f[2:2 + len(COLUMNS)])))
    return out


def pick(ttft: float, tpot: float) -> str:
    config = load_config(overrides={
        "mode": "auto", "model": {"embedded": "small", "max_model_len": 2048},
        "slo": {"ttft_s": ttft, "tpot_s": tpot},
        "planner": {"workload": str(HERE / "configs" / "small-workload-512-1536.yaml"), "kv_cache_gib": 2}})
    request = plan_request(config, resolve_model_path(config), 2, planner_workload(config))
    outcome = search(build_problem(request))
    if outcome.front_end_layout == "reserved":
        return "pdserve-in-router"
    if outcome.front_end_layout == "with_prefill":
        return "auto-disagg-fe"
    return "auto-colocated-2" if outcome.serve_colocated else "auto-disagg-shared"


def main(paths: list[str]) -> None:
    runs = [(p, measured(HERE / p)) for p in paths]
    cells = sorted(runs[0][1])
    picks = {cell: pick(*cell) for cell in cells}
    for name, table in runs:
        at_best = below = counted = 0
        print(f"\n{name}: mode auto's pick, its measured goodput, the best pdserve deployment's, vLLM's (req/s)")
        for cell in cells:
            row, chosen = table[cell], picks[cell]
            best = max(v for k, v in row.items() if k != "vllm")
            mark = "-"
            if best > 0:
                counted += 1
                at_best += row[chosen] == best
                below += row[chosen] < row["vllm"]
                mark = "best" if row[chosen] == best else "MISS"
            print(f"  TTFT {cell[0]:>4g} s TPOT {cell[1]:>5g} s  {chosen:<20} {row[chosen]:>4g}  "
                  f"best {best:>4g}  vLLM {row['vllm']:>4g}  {mark}")
        print(f"  cells where some deployment meets the SLO: {counted}; the pick is the best in "
              f"{at_best}; below vLLM in {below}")


if __name__ == "__main__":
    main(sys.argv[1:])
