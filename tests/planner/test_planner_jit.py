"""The simulator's compiled event loops (cluster/planner/jit.py).

numba compiles them with its own typing: integer arithmetic is 64-bit, a list's element type
is fixed by its first element, a mistyped scalar silently becomes another signature. The
same functions also run as plain Python (`NUMBA_DISABLE_JIT=1`), with Python's semantics.
These tests run random cases both ways and require identical outcomes, bit for bit, so the
compiled loops mean what their Python source says. They also check that importing the
planner does not load numba: vLLM's CPU worker fails to start in a process that has
(jit.py says why), and the profiler imports planner modules before it starts its engine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from cluster.planner.colocated import ColocatedPool, simulate_colocated_pool
from cluster.planner.decode_pool import DecodePool, TransferTopology, simulate_decode_pool
from cluster.planner.latency_model import EngineTiming, LatencyProfile
from cluster.planner.prefill_pool import PrefillPool, simulate_prefill_pool

REPO_ROOT = Path(__file__).resolve().parents[2]
NUM_CASES = 40


def _profile(rng: np.random.Generator) -> LatencyProfile:
    return LatencyProfile(prefill=(float(rng.uniform(5, 15)), 0.05, 1e-5),
                          decoding_smallbs=(float(rng.uniform(4, 12)), 4e-4, 0.2),
                          decoding_largebs=(9.0, 3.5e-4, 0.15), decoding_large_small_bs_threshold=16)


def _timing(rng: np.random.Generator, pp: int) -> EngineTiming:
    return EngineTiming(_profile(rng), pp, framework_overhead=bool(rng.random() < 0.5),
                        stage_fixed_cost=str(rng.choice(["split", "per_stage"])))


def _trace(rng: np.random.Generator, max_n: int, max_rate: float = 40.0):
    n = int(rng.integers(1, max_n))
    arrival = np.sort(rng.uniform(0, n / rng.uniform(2, max_rate), n))
    if rng.random() < 0.3:
        arrival = np.round(arrival, 1)  # simultaneous arrivals
    return arrival, rng.integers(1, 1500, n), rng.integers(1, 300, n)


def _decode_case(rng: np.random.Generator):
    arrival, ins, outs = _trace(rng, 300)
    n, k = len(arrival), int(rng.integers(1, 5))
    pool = DecodePool(
        k, _timing(rng, int(rng.choice([1, 2, 4]))), int(rng.integers(500, 60_000)),
        max_num_seqs=int(rng.integers(1, 200)), memory=str(rng.choice(["paged", "reserve"])),
        block_size=int(rng.choice([1, 16])), admission_watermark=float(rng.choice([0.0, 0.01])),
        max_num_batched_tokens=int(rng.integers(1, 300)) if rng.random() < 0.3 else None,
        kv_load_s_per_token=float(rng.choice([0.0, 1e-5])))
    kwargs = {}
    if rng.random() < 0.5:
        num_prefill = int(rng.integers(1, 4))
        kwargs["topology"] = TransferTopology(
            tuple(tuple(sorted(rng.choice(k, int(rng.integers(1, k + 1)), replace=False).tolist()))
                  for _ in range(num_prefill)),
            tuple(tuple(int(rng.integers(0, 3)) for _ in range(k)) for _ in range(num_prefill)),
            tuple(tuple(float(rng.uniform(1e-7, 1e-5)) for _ in range(k)) for _ in range(num_prefill)),
            3, float(rng.uniform(0, 0.01)))
        kwargs["prefill_ids"] = rng.integers(0, num_prefill, n)
    if rng.random() < 0.5:
        kwargs["tpot_base_s"] = arrival
    if rng.random() < 0.7:
        kwargs["tpot_limit_s"] = float(rng.uniform(0.005, 0.2))
    if rng.random() < 0.3:
        kwargs["ttft_deadline_s"] = arrival + rng.uniform(0, 0.5, n)
    if rng.random() < 0.3:
        kwargs["already_violating"] = rng.random(n) < 0.1
    if rng.random() < 0.5:
        kwargs["max_violations"] = int(rng.integers(0, n // 10 + 1))
    out = simulate_decode_pool(arrival, ins, outs, pool, **kwargs)
    return [out.kv_ready_s.tolist(), out.finish_s.tolist(), out.transfer_s.tolist(),
            out.num_violations, out.stopped_early, out.num_preemptions]


def _prefill_case(rng: np.random.Generator):
    arrival, ins, _ = _trace(rng, 2000, max_rate=300.0)
    pool = PrefillPool(int(rng.integers(1, 6)), _timing(rng, int(rng.choice([1, 2, 4]))),
                       int(rng.integers(1, 8000)))
    limit = float(rng.uniform(0.05, 2)) if rng.random() < 0.7 else float("inf")
    budget = int(rng.integers(0, len(arrival) // 10 + 1)) if rng.random() < 0.5 else None
    out = simulate_prefill_pool(arrival, ins, pool, limit, budget)
    return [out.done_s.tolist(), out.instance_ids.tolist(), out.num_violations, out.stopped_early]


def _colocated_case(rng: np.random.Generator):
    arrival, ins, outs = _trace(rng, 300)
    pool = ColocatedPool(
        int(rng.integers(1, 4)), _timing(rng, 1), int(rng.integers(1000, 80_000)),
        scheduler=str(rng.choice(["prefill_priority", "chunked_prefill"])),
        token_budget=int(rng.integers(64, 8000)), max_num_seqs=int(rng.integers(1, 200)),
        pipeline_parallel_size=int(rng.choice([1, 2, 4])), memory=str(rng.choice(["paged", "reserve"])),
        block_size=int(rng.choice([1, 16])), admission_watermark=float(rng.choice([0.0, 0.01])))
    ttft = float(rng.uniform(0.05, 3)) if rng.random() < 0.7 else float("inf")
    tpot = float(rng.uniform(0.01, 0.2)) if rng.random() < 0.7 else float("inf")
    budget = int(rng.integers(0, len(arrival) // 10 + 1)) if rng.random() < 0.5 else None
    out = simulate_colocated_pool(arrival, ins, outs, pool, ttft, tpot, budget)
    return [out.first_token_s.tolist(), out.finish_s.tolist(), out.num_violations,
            out.stopped_early, out.num_preemptions]


def run_cases(seed: int = 0) -> dict[str, list]:
    """Every case's outcome, as plain lists (this module is also run in a subprocess)."""
    rng = np.random.default_rng(seed)
    return {name: [case(rng) for _ in range(NUM_CASES)]
            for name, case in (("decode", _decode_case), ("prefill", _prefill_case),
                               ("colocated", _colocated_case))}


def _interpreted() -> dict[str, list]:
    code = ("import json; from tests.planner.test_planner_jit import run_cases; "
            "print(json.dumps(run_cases()))")
    env = {**os.environ, "NUMBA_DISABLE_JIT": "1"}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)  # Python's json reads back the Infinity it writes


def test_compiled_loops_match_their_python_source_bit_for_bit():
    compiled = run_cases()
    interpreted = _interpreted()
    for name in compiled:
        cases = compiled[name]
        # The cases reach the paths that matter: early stops, and preemption where it exists.
        assert any(c[-2 if name != "prefill" else -1] for c in cases), f"{name}: no early stop"
        if name != "prefill":
            assert any(c[-1] for c in cases), f"{name}: no preemption"
        for i, (a, b) in enumerate(zip(cases, interpreted[name])):
            assert a == b, f"{name} case {i}: compiled and interpreted outcomes differ"


def test_importing_the_planner_does_not_load_numba():
    code = ("import sys, cluster.planner, cluster.profiler, pdserve.cli, pdserve.replanner; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('numba', 'llvmlite')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
