"""DistServe's placement search on OPT-13B ShareGPT, timed: what its own runtime benchmark
(simdistserve/benchmarks/figure12-runtime/01-run-benchmark.py, branch feat-add-simulator)
does for one cluster shape, with its settings (N=300 requests, esp=0.25, per-GPU rate up to
5, SLO 200 ms TTFT / 100 ms TPOT at P90, one bisection per configuration in its own process).

Two changes:
- the number of processes is an argument. The benchmark runs cpu_count - 2 at once, which
  is 0 on a 2-core machine (it then waits forever for a free slot);
- the prompts are sampled from a lengths CSV (the ShareGPT lengths the planner's comparison
  set uses), so both searches sample the same distribution. DistServe reads them from
  `data/sharegpt.dataset`, a marshal file its preprocessing writes and this repository does
  not (tests/test_no_pickle.py), so its sampler is replaced by one that draws the same way
  (`random.sample` over the rows) from the CSV. Its worker processes are forked, so they
  inherit the replacement.

    PYTHONPATH=<DistServe checkout> python distserve_search.py NODES GPUS_PER_NODE PROCESSES LENGTHS_CSV
"""

import csv
import random
import sys
import time
from multiprocessing import Process
from time import sleep

import simdistserve.benchmarks.simulate_dist as simulate_dist
from simdistserve.base.request import Request
from simdistserve.benchmarks.search_binary import run_binary_search
from simdistserve.benchmarks.search_configs import get_distserve_configs
from simdistserve.constants import ModelTypes


def use_lengths_csv(path: str) -> None:
    with open(path) as f:
        rows = [(int(r["input_len"]), int(r["output_len"])) for r in csv.DictReader(f)]

    def sample_requests(_dataset_path, num_prompts: int) -> list[Request]:
        # As DistServe's `base.workload.sample_requests`, with the rows from the CSV.
        return [Request(env=None, req_id=i, prefill_length=p, output_lens=d)
                for i, (p, d) in enumerate(random.sample(rows, num_prompts))]

    simulate_dist.sample_requests = sample_requests
    simulate_dist.check_dataset_existence = lambda _path: None


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
    use_lengths_csv(sys.argv[4])
    start = time.perf_counter()
    n = run(nodes, per_node, processes)
    print(f"DistServe search {nodes}x{per_node} (low affinity): {n} configurations, "
          f"{processes} processes, {time.perf_counter() - start:.1f} s", flush=True)
