"""SyntheticTrace replay against DistServe's real-A100 ground truth (OPT-13B, ShareGPT lengths).

`tests/planner/data/distserve_opt13b_sharegpt_a100.csv.gz` holds every request of the
labelled runs in DistServe's alignment data (LLMServe/DistServe, branch feat-add-simulator,
simdistserve/benchmarks/alignment/data-ground-truth/opt-13b-sharegpt/, Apache-2.0): per
request the prompt and output length, the issue time, and the measured TTFT and TPOT.
SyntheticTrace names: `distserve-c<tp><pp>d<tp><pp>-<N>-<rate>` (prefill and decode parallelism,
requests, req/s) and `vllm-<N>-<rate>` (colocated vLLM, TP1). The replay feeds the recorded
arrivals and lengths to the simulator and compares the share of requests meeting TTFT <=
250 ms and TPOT <= 100 ms with the measured share, trace by trace, saturated ones included.

The engine settings are the ones DistServe ran with (context batch 8192 tokens, decode batch
1024, 0.95 of GPU memory: `max_num_tokens.csv`). `kv_load_gb_s: 60` is the one number
fitted to these traces (DistServe migrates KV inside its decode loop; the TPOT medians fit
50-60 equally well, the attainment rows pick 60); the rest is the published profile,
framework overhead on, paged decode (and colocated) memory, pipeline stages sharing the
decode instance's micro-batches and drained by each migration.
"""

from __future__ import annotations

import csv
import gzip
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from cluster.config import SLOConfig
from cluster.planner.inputs import PlanRequest
from cluster.planner.plans import ParallelConfig
from cluster.planner.problem import build_problem
from cluster.planner.simulator import DisaggregatedSystem, simulate_colocated, simulate_disaggregated

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
DATA = Path(__file__).parent / "data" / "distserve_opt13b_sharegpt_a100.csv.gz"
SLO = SLOConfig(ttft_s=0.25, tpot_s=0.1, attainment=0.9)
DISTSERVE_ENGINE = {"prefill_token_budget": 8192, "max_num_seqs": 1024, "kv_load_gb_s": 60.0}
VLLM_ENGINE = {"prefill_token_budget": 16384, "max_num_seqs": 1024}


def _traces() -> dict[str, np.ndarray]:
    rows: dict[str, list] = defaultdict(list)
    with gzip.open(DATA, "rt", newline="") as f:
        for r in csv.DictReader(f):
            rows[r["trace"]].append((float(r["issue_ms"]) / 1000, int(r["prompt_len"]),
                                     int(r["output_len"]), float(r["ttft_ms"]) / 1000,
                                     float(r["tpot_ms"]) / 1000))
    return {name: np.array(v) for name, v in rows.items()}


def _problem(shared: Path, profile: str, engine: dict):
    return build_problem(PlanRequest.model_validate({
        "model": "facebook/opt-13b", "profile": str(shared / profile),
        "kv_capacity_csv": str(shared / "max_num_tokens.csv"), "slo": SLO.model_dump(),
        "workload": {"lengths": {"kind": "fixed", "input_len": 512, "output_len": 64}},
        "engine": engine}))


def _replay(name: str, t: np.ndarray, distserve, vllm) -> float:
    arrival, ins, outs = t[:, 0], t[:, 1].astype(np.int64), t[:, 2].astype(np.int64)
    if name.startswith("vllm"):
        result = simulate_colocated(vllm.colocated_pool(1, 1, "prefill_priority"), arrival, ins, outs)
    else:
        c = name.split("-")[1]  # c<tp><pp>d<tp><pp>
        prefill, decode = ParallelConfig(int(c[1]), int(c[2])), ParallelConfig(int(c[4]), int(c[5]))
        system = DisaggregatedSystem(distserve.prefill_pool(prefill, 1), distserve.decode_pool(decode, 1))
        result = simulate_disaggregated(system, arrival, ins, outs)
    return result.attainment(SLO)


@pytest.fixture(scope="module")
def replay_table() -> list[tuple[str, float, float]]:
    shared = SHARED_DATA
    if not (shared / "profiler-a100-80g.distserve.json").is_file():
        pytest.skip(f"reference data not found at {shared}")
    distserve = _problem(shared, "profiler-a100-80g.distserve.json", DISTSERVE_ENGINE)
    vllm = _problem(shared, "profiler-a100-80g.vllm.json", VLLM_ENGINE)
    table = []
    for name, t in sorted(_traces().items()):
        real = float(((t[:, 3] <= SLO.ttft_s) & (t[:, 4] <= SLO.tpot_s)).mean())
        table.append((name, real, _replay(name, t, distserve, vllm)))
    print("\ntrace                         real %   sim %   error")
    for name, real, sim in table:
        print(f"{name:<28} {100 * real:7.1f} {100 * sim:7.1f} {100 * (sim - real):+7.1f}")
    return table


def test_data_covers_saturation():
    traces = _traces()
    assert len(traces) == 28 and sum(len(t) for t in traces.values()) == 15900
    attainment = [((t[:, 3] <= 0.25) & (t[:, 4] <= 0.1)).mean() for t in traces.values()]
    assert min(attainment) < 0.1 and max(attainment) > 0.95  # idle to collapsed


def test_disaggregated_replay_within_five_points_but_at_the_pp2_cliff(replay_table):
    errors = {name: 100 * abs(sim - real) for name, real, sim in replay_table if name.startswith("distserve")}
    assert len(errors) == 20
    # Every TP2 -> TP1 trace, from 98% down to 10% attainment, within 5 points.
    assert max(e for n, e in errors.items() if "c21d11" in n) <= 5.0 + 1e-9
    # Decode TP1 x PP2: the decode loop awaits each KV migration, which drains the pipeline
    # (decode_pool's lane stalls). Within 5 points except at 10 req/s, past the real
    # collapse, where the model's cliff sits a little late (+6.1): the open gap,
    # docs/planner.md.
    pp2 = {n: e for n, e in errors.items() if "c21d12" in n}
    assert sorted(pp2.values())[-2] <= 5.0 and max(pp2.values()) <= 7.0
    assert np.mean(list(errors.values())) <= 1.6


def test_colocated_vllm_replay(replay_table):
    errors = [100 * abs(sim - real) for name, real, sim in replay_table if name.startswith("vllm")]
    assert len(errors) == 8
    assert np.mean(errors) <= 9.0 and max(errors) <= 16.0
