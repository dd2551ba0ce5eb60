"""The search against brute force, and the limits every plan must respect."""

import itertools

import pytest

from cluster.planner.inputs import PlanRequest
from cluster.planner.phase_goodput import enumerate_configs
from cluster.planner.placement import layout_plan, transfer_topology
from cluster.planner.plans import ParallelConfig, Plan
from cluster.planner.problem import build_problem
from cluster.planner.search import _Search, search


def _request(profile, model, **overrides) -> PlanRequest:
    data = {
        "model": str(model), "profile": str(profile),
        "slo": {"ttft_s": 0.2, "tpot_s": 0.04, "attainment": 0.9},
        "workload": {"lengths": {"kind": "uniform", "input_len_min": 256, "input_len_max": 768,
                                 "output_len_min": 16, "output_len_max": 112}},
        "cluster": {"num_nodes": 1, "gpus_per_node": 4, "gpu_memory_gib": 16},
        "search": {"num_requests": 300, "num_seeds": 1, "max_pipeline_parallel": 2,
                   "placements": ["high_node_affinity"]},
    }
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split("__")
        node = data
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return PlanRequest.model_validate(data)


def _all_plans(s: _Search, configs, budget):
    for cp, cd in itertools.product(configs, repeat=2):
        for n_p in range(1, budget // cp.num_gpus + 1):
            for n_d in range(1, (budget - n_p * cp.num_gpus) // cd.num_gpus + 1):
                plan = Plan("high_node_affinity", cp, n_p, cd, n_d)
                if s.feasible_layout(plan):
                    yield plan


def _prepared(problem):
    s = _Search(problem)
    configs, _ = enumerate_configs(problem)
    s.phase_goodputs(configs, None)
    return s, configs


def test_max_goodput_matches_brute_force(synthetic_profile_path, tiny_model_dir):
    problem = build_problem(_request(synthetic_profile_path, tiny_model_dir))
    s, configs = _prepared(problem)
    brute = {plan: s.evaluate(plan).goodput_rps for plan in _all_plans(s, configs, 4)}
    assert len(brute) > 10
    best_brute = max(brute.values())
    outcome = search(problem)
    tol = problem.request.search.rel_tol
    assert outcome.best.goodput_rps >= best_brute / (1 + tol)
    assert brute[outcome.best.plan] == outcome.best.goodput_rps  # same simulation, same number
    assert outcome.best.at_goodput.min_attainment >= 0.9


def test_min_gpus_matches_brute_force(synthetic_profile_path, tiny_model_dir):
    rate = 12.0
    problem = build_problem(_request(synthetic_profile_path, tiny_model_dir, workload__rate=rate))
    s, configs = _prepared(problem)
    passing = [p for p in _all_plans(s, configs, 4) if s.passes(p, rate)]
    assert passing, "the test needs a feasible rate"
    outcome = search(problem)
    assert outcome.objective == "min_gpus"
    assert outcome.best.plan.num_gpus == min(p.num_gpus for p in passing)
    assert outcome.best.at_target.min_attainment >= 0.9


def test_plans_respect_memory_and_gpu_budget(synthetic_profile_path, tiny_model_dir):
    # ~0.32 GB of weights: one 0.3 GiB GPU (90% usable) cannot hold them, two can.
    request = _request(synthetic_profile_path, tiny_model_dir,
                       cluster__gpu_memory_gib=0.3, cluster__gpus_per_node=8, cluster__max_gpus=6)
    problem = build_problem(request)
    configs, excluded = enumerate_configs(problem)
    reasons = {c: r for c, r in excluded}
    assert "do not fit" in reasons[ParallelConfig(1, 1)]
    assert ParallelConfig(2, 1) in configs and ParallelConfig(1, 2) in configs
    outcome = search(problem)
    best = outcome.best
    assert best.goodput_rps > 0
    for e in (best, *outcome.runners_up):
        assert e.plan.num_gpus <= 6
        assert layout_plan(e.plan, 1, 8) is not None
        for config in (e.plan.prefill, e.plan.decode):
            assert config.num_gpus >= 2 and problem.kv_capacity(config) > 0


def test_search_is_deterministic(synthetic_profile_path, tiny_model_dir):
    problem = build_problem(_request(synthetic_profile_path, tiny_model_dir))
    a, b = search(problem), search(problem)
    assert a.best.plan == b.best.plan and a.best.goodput_rps == b.best.goodput_rps


_SAME_OUTCOME = """
import sys
from cluster.planner.pool import num_workers
from cluster.planner.problem import build_problem
from cluster.planner.search import search
from tests.planner.test_planner_search import _request

profile, model = sys.argv[1:]
assert num_workers(3) == 3  # a fresh process: no other thread, so the pool forks
one, three = (search(build_problem(_request(profile, model, search__workers=n,
                                             search__compare_colocated=True))) for n in (1, 3))
assert one.best == three.best and one.runners_up == three.runners_up
assert one.phases == three.phases and one.colocated == three.colocated
assert one.num_simulations == three.num_simulations
assert len(one.runners_up) >= 1 and one.best.at_goodput is not None
"""


def test_worker_processes_do_not_change_the_outcome(synthetic_profile_path, tiny_model_dir):
    # Per-phase goodputs, bar checks, evaluations and the report's runs go to a process
    # pool; every job is pure, so one process and three give the same outcome, runs
    # included. In a process of its own: the test process may run threads (no pool then).
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run([sys.executable, "-c", _SAME_OUTCOME, str(synthetic_profile_path),
                           str(tiny_model_dir)], capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-3000:]


def test_layouts_and_links():
    tp2 = ParallelConfig(2, 1)
    # High node affinity, first-fit decreasing: 3 x 2-GPU instances + 2 x 1-GPU on 2 nodes of 4.
    plan = Plan("high_node_affinity", tp2, 3, ParallelConfig(1, 1), 2)
    layout = layout_plan(plan, 2, 4)
    assert layout.prefill_nodes == ((0,), (0,), (1,)) and layout.decode_nodes == ((1,), (1,))
    topo = transfer_topology(plan, layout, 1000.0, intra_node_bytes_per_s=1e6, inter_node_bytes_per_s=1e3)
    assert topo.seconds_per_token[0][0] == pytest.approx(1.0)  # P0 (node 0) -> D0 (node 1): NIC
    assert topo.seconds_per_token[2][0] == pytest.approx(1000.0 / (1e6 * 1))  # same node: NVLink
    assert topo.link_ids[0][0] == topo.link_ids[1][1] == 3 + 0  # both leave node 0's NIC
    assert layout_plan(Plan("high_node_affinity", tp2, 3, tp2, 2), 2, 4) is None  # 10 GPUs > 8
    # Low node affinity: each node holds one prefill and one decode segment, pipelined over 2 nodes.
    pp2 = ParallelConfig(2, 2)
    plan = Plan("low_node_affinity", pp2, 2, ParallelConfig(1, 2), 2, num_units=2)
    assert layout_plan(plan, 4, 4).prefill_nodes == ((0, 1), (2, 3))
    topo = transfer_topology(plan, layout_plan(plan, 4, 4), 1000.0, 1e6, 1e3)
    assert topo.decode_candidates == ((0,), (1,))  # routed within the unit, over NVLink
    assert topo.seconds_per_token[0][0] == pytest.approx(1000.0 / (1e6 * 2))
    assert layout_plan(plan, 3, 4) is None  # two units of two nodes need four nodes


def test_low_node_affinity_alone_works_on_one_node(synthetic_profile_path, tiny_model_dir):
    request = _request(synthetic_profile_path, tiny_model_dir, search__placements=["low_node_affinity"])
    best = search(build_problem(request)).best
    assert best.plan.placement == "low_node_affinity" and best.goodput_rps > 0
    assert best.plan.prefill.pp == best.plan.decode.pp == 1  # one node: no cross-node pipeline


def test_no_process_pool_in_a_process_with_threads(monkeypatch, caplog):
    import threading

    from cluster.planner import pool

    with monkeypatch.context() as m:  # as in a process with no other thread
        m.setattr(pool.threading, "active_count", lambda: 1)
        assert pool.num_workers(3) == 3 and pool.num_workers(None) >= 1
    release = threading.Event()
    other = threading.Thread(target=release.wait)
    other.start()
    try:
        assert pool.num_workers(3) == 1  # a fork would copy locks the other thread may hold
        assert "3 worker processes asked for, running in one" in caplog.text  # not silently
    finally:
        release.set()
        other.join()
