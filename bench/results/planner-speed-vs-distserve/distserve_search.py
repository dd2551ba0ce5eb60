"""DistServe's placement search on OPT-13B ShareGPT, timed: what its own runtime benchmark
(simdistserve/benchmarks/figure12-runtime/01-run-benchmark.py, branch feat-add-simulator)
does for one cluster shape, with its settings (N=300 requests, esp=0.25, per-GPU rate up to
5, SLO 200 ms TTFT / 100 ms TPOT at P90, one bisection per configuration in its own process).

One change: the number of processes is an argument. The benchmark runs cpu_count - 2 at
once, which is 0 on a 2-core machine (it then waits forever for a free slot).

    PYTHONPATH=<DistServe checkout> python distserve_search.py NODES GPUS_PER_NODE PROCESSES
"""

import sys
import time
from multiprocessing import Process
from time import sleep

from simdistserve.benchmarks.search_binary import run_binary_search
from simdistserve.benchmarks.search_configs import get_distserve_configs
from simdistserve.constants import ModelTypes


def run(num_node: int, num_gpu_per_node: int, processes: int) -> int:
    # is_high_affinity=False: the "DistLow" rows of DistServe's runtime figure.
    configs = get_distserve_configs(ModelTypes.opt_13b, num_node, num_gpu_per_node, False)
    running: list[Process] = []
    for pid, config in enumerate(configs):
        while len(running) >= processes:
            done = [p for p in running if not p.is_alive()]
            for p in done:
                p.join()
                running.remove(p)
            if not done:
                sleep(0.2)
        proc = Process(target=run_binary_search,
                       args=(ModelTypes.opt_13b, config, "distserve", (200, 100, 90, 90)),
                       kwargs=dict(max_per_gpu_rate=5, pid=pid, esp=0.25, N=300))
        proc.start()
        running.append(proc)
    for p in running:
        p.join()
    return len(configs)


if __name__ == "__main__":
    nodes, per_node, processes = map(int, sys.argv[1:4])
    start = time.perf_counter()
    n = run(nodes, per_node, processes)
    print(f"DistServe search {nodes}x{per_node} (low affinity): {n} configurations, "
          f"{processes} processes, {time.perf_counter() - start:.1f} s", flush=True)
