"""Wall time of the planner's search on the comparison set at full fidelity (issue 16).

    python -m bench.planner_speed [--exhaustive] [--workers N] CASE...

CASE: opt13b-sharegpt-1x4, opt13b-sharegpt-2x8, opt66b-sharegpt-1x8, opt66b-humaneval-1x8
(`tests/planner/test_planner_comparison.py`), 3,000 requests x 3 seeds per evaluation. One
line per case: goodput, seconds of `search()`, simulations, plan. To compare two versions
side by side, run it from each checkout (a `git worktree` of the older one) in turns.
"""

from __future__ import annotations

import argparse
import time

from cluster.planner.problem import build_problem
from cluster.planner.search import search
from tests.planner.test_planner_comparison import CASES, comparison_request


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="+", choices=sorted(CASES))
    parser.add_argument("--exhaustive", action="store_true")
    parser.add_argument("--workers", type=int, help="search.workers (default: this process's cores)")
    args = parser.parse_args()
    spec = {"num_requests": 3000, "num_seeds": 3, "exhaustive": args.exhaustive}
    if args.workers is not None:
        spec["workers"] = args.workers
    for case in args.cases:
        problem = build_problem(comparison_request(case, **spec))
        start = time.perf_counter()
        outcome = search(problem)
        seconds = time.perf_counter() - start
        print(f"{case:<22} {'exhaustive' if args.exhaustive else 'default':<10} "
              f"{outcome.best.goodput_rps:7.2f} req/s {seconds:6.1f} s "
              f"{outcome.num_simulations:4d} sims  {outcome.best.plan.label}", flush=True)


if __name__ == "__main__":
    main()
