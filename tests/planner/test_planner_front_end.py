"""The front end on a CPU host (`cluster/planner/front_end.py`): its load on the cores it
shares, the judge's time stretch, and the layout `pdserve plan` chooses and writes."""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np
import pytest

from cluster.config import SLOConfig, load_config
from cluster.planner import cli
from cluster.planner.front_end import FrontEndEffect, FrontEndLoad
from cluster.planner.goodput import RateJudge
from cluster.planner.inputs import PlanRequest
from cluster.planner.plans import ParallelConfig
from cluster.planner.problem import build_problem, for_front_end_layout, scale_profile
from cluster.planner.search import _Search, search
from cluster.planner.simulator import simulate_colocated
from cluster.planner.workload import make_trace

FAST = {"num_requests": 300, "num_seeds": 1, "compare_colocated": True}


def _request(profile, model, **front_end) -> PlanRequest:
    return PlanRequest.model_validate({
        "model": str(model), "profile": str(profile),
        "slo": {"ttft_s": 0.5, "tpot_s": 0.011, "attainment": 0.9},
        "workload": {"lengths": {"kind": "uniform", "input_len_min": 256, "input_len_max": 768,
                                 "output_len_min": 16, "output_len_max": 112}},
        "cluster": {"device": "cpu", "num_nodes": 1, "gpus_per_node": 2, "gpu_memory_gib": 4},
        "engine": {"framework_overhead": False},
        "front_end": front_end, "search": FAST})


def test_a_shared_front_end_slows_the_engines_by_its_share_of_their_cores():
    load = FrontEndLoad(cpu_s_per_request=0.008, cpu_s_per_output_token=0.0001,
                        mean_output_tokens=20)  # 10 ms per served request
    shared = load.shared(engine_cores=2)
    # At 50 req/s the front end keeps half a core busy: the engines keep 1.5 of their 2
    # cores (x4/3); the front end, a queue on its fair share against 2 runners (2/3 of a
    # core), runs each request's 8 ms in 12 ms at utilisation 0.75 (x4).
    assert shared(50.0) == pytest.approx(FrontEndEffect(4 / 3, 0.048))
    assert shared(0.0) == pytest.approx(FrontEndEffect(1.0, 0.012))
    assert shared(200 / 3) is None  # its fair share is full: nothing is served
    reserved = load.reserved(cores=1)
    assert reserved(50.0) == pytest.approx(FrontEndEffect(1.0, 0.016))  # M/M/1 at 50%
    assert reserved(100.0) is None
    assert load.max_rate(1) == pytest.approx(100.0)
    # On the prefill instances' core only: prefill iterations stretch, decode steps do not.
    # At 20 req/s: 0.2 of the prefill core busy (prefill x1.25); the front end's half of
    # that core runs 8 ms in 16 ms at utilisation 0.4.
    with_prefill = load.with_prefill(prefill_cores=1)
    assert with_prefill(20.0) == pytest.approx(FrontEndEffect(1.0, 0.016 / 0.6, prefill_scale=1.25))
    assert with_prefill(50.0) is None


def test_the_judge_runs_a_slowed_deployment_as_the_same_system_stretched_in_time(
        synthetic_profile_path, tiny_model_dir):
    # Every iteration twice as slow, simulated directly (profile x2) and by the judge's
    # stretch (arrivals / 2, SLO / 2, latencies x 2): the same latencies at every rate.
    problem = build_problem(_request(synthetic_profile_path, tiny_model_dir))
    slower = replace(problem, profiles={tp: scale_profile(p, 2.0) for tp, p in problem.profiles.items()})
    traces = [make_trace(problem.request.workload.lengths, problem.request.workload.arrival, 400, 7)]
    slo = problem.request.slo

    def judge(p, front_end):
        pool = p.colocated_pool(1, 1, "prefill_priority")
        return RateJudge(lambda a, t, stop, s: simulate_colocated(pool, a, t.input_lens, t.output_lens, s, stop),
                         traces, slo, front_end)

    direct, stretched = judge(slower, None), judge(problem, lambda rate: FrontEndEffect(2.0, 0.0))
    for rate in (0.5, 2.0, 4.0, 8.0):
        a, b = direct.measure(rate), stretched.measure(rate)
        assert b.attainment == pytest.approx(a.attainment)
        assert b.mean_ttft_s == pytest.approx(a.mean_ttft_s, rel=1e-9)
        assert b.mean_tpot_s == pytest.approx(a.mean_tpot_s, rel=1e-9)
        assert direct.feasible(rate) == stretched.feasible(rate)
    # The front end's own time lands in TTFT, and a saturated front end serves nothing.
    base = judge(problem, None).measure(2.0)
    late = judge(problem, lambda rate: FrontEndEffect(1.0, 0.2)).measure(2.0)
    assert late.mean_ttft_s == pytest.approx(base.mean_ttft_s + 0.2)
    assert late.mean_tpot_s == pytest.approx(base.mean_tpot_s)
    full = judge(problem, lambda rate: None)
    assert not full.feasible(0.5) and full.measure(0.5).attainment == 0.0


def test_a_front_end_on_the_engines_cores_costs_goodput(synthetic_profile_path, tiny_model_dir):
    free = search(build_problem(_request(synthetic_profile_path, tiny_model_dir)))
    shared = search(build_problem(_request(synthetic_profile_path, tiny_model_dir,
                                           cpu_ms_per_request=20, layout="shared")))
    assert shared.front_end_layout == "shared" and shared.front_end_cores == 0
    assert 0 < shared.deployment_goodput_rps < free.deployment_goodput_rps


def _plan_args(profile, model, out, front_end_ms: str, step_ms: str) -> list[str]:
    return ["--model", str(model), "--profile", str(profile),
            "--input-len-range", "256", "768", "--output-len-range", "16", "112",
            "--ttft-s", "0.5", "--tpot-s", "0.02", "--device", "cpu", "--nodes", "1",
            "--gpus-per-node", "3", "--gpu-memory-gib", "4", "--compare-colocated",
            "--front-end-cpu-ms", front_end_ms, "--shared-core-step-ms", step_ms,
            "--num-requests", "300", "--num-seeds", "1", "--output", str(out)]


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return cli.run(parser.parse_args(argv))


def _engine_cores(config) -> set[int]:
    pools = (config.colocated,) if config.mode == "colocated" else (config.prefill, config.decode)
    return {c for pool in pools for cores in pool.cpu_cores for c in cores}


def test_plan_keeps_a_heavy_front_end_off_the_decode_cores_and_writes_that_layout(
        synthetic_profile_path, tiny_model_dir, tmp_path, capsys):
    # 3 cores. A front end that costs 60 ms of CPU per request, on every engine's cores,
    # slows every step (and each step also waits 4 ms for its scheduler's time slice) past
    # what TPOT 20 ms allows at the rates 3 engines could carry. On a core of its own, or on
    # the prefill instances' cores only, it leaves the decode engines at full speed.
    out = tmp_path / "plan.yaml"
    assert _run(_plan_args(synthetic_profile_path, tiny_model_dir, out, "60", "4")) == 0
    report = capsys.readouterr().out
    assert "Front-end layouts (each planned):" in report
    assert "chosen  front end shared" not in report, report
    config = load_config(out)
    fe_cores = set(config.ray.front_end_cores)
    assert fe_cores and not fe_cores & {c for cores in config.decode.cpu_cores for c in cores}
    assert _engine_cores(config) | fe_cores == {0, 1, 2}

    request = PlanRequest.model_validate(
        {**_request(synthetic_profile_path, tiny_model_dir).model_dump(mode="json"),
         "slo": {"ttft_s": 0.5, "tpot_s": 0.02, "attainment": 0.9},
         "cluster": {"device": "cpu", "num_nodes": 1, "gpus_per_node": 3, "gpu_memory_gib": 4},
         "front_end": {"cpu_ms_per_request": 60, "shared_core_step_ms": 4}})
    outcome = search(build_problem(request))
    others = {o.front_end_layout: o for o in outcome.other_layouts}
    assert outcome.front_end_layout in ("reserved", "with_prefill") and outcome.units == 3
    assert set(others) | {outcome.front_end_layout} == {"shared", "reserved", "with_prefill"}
    assert outcome.deployment_goodput_rps > others["shared"].deployment_goodput_rps > 0
    # Never more than the front end's cores can carry: 1 or 2 cores / 60 ms.
    fe_cores = 1 if outcome.front_end_layout == "reserved" else outcome.best.plan.num_prefill
    assert outcome.deployment_goodput_rps < FrontEndLoad(0.06, 0.0, 1).max_rate(fe_cores)


def test_a_tight_tpot_puts_the_front_end_with_prefill_and_decode_alone_on_its_core(
        synthetic_profile_path, tiny_model_dir, tmp_path, capsys):
    # 2 cores, TPOT 11 ms, TTFT 2 s, a 20 ms front end. Shared, it slows the decode steps
    # past TPOT; reserved, it leaves one colocated engine whose prefills stall its decodes.
    # With the prefill instance, only TTFT pays for it, and TTFT has room.
    argv = ["--model", str(tiny_model_dir), "--profile", str(synthetic_profile_path),
            "--input-len-range", "256", "768", "--output-len-range", "16", "112",
            "--ttft-s", "2", "--tpot-s", "0.011", "--device", "cpu", "--nodes", "1",
            "--gpus-per-node", "2", "--gpu-memory-gib", "4", "--compare-colocated",
            "--front-end-cpu-ms", "20", "--shared-core-step-ms", "2", "--no-framework-overhead",
            "--num-requests", "300", "--num-seeds", "1", "--output", str(tmp_path / "plan.yaml")]
    assert _run(argv) == 0
    report = capsys.readouterr().out
    assert "chosen  front end on the prefill instances' cores" in report, report
    config = load_config(tmp_path / "plan.yaml")
    assert config.mode == "disaggregated"
    assert config.ray.front_end_cores == [0]
    assert config.prefill.cpu_cores == [[0]] and config.decode.cpu_cores == [[1]]

    request = _request(synthetic_profile_path, tiny_model_dir, cpu_ms_per_request=20,
                       shared_core_step_ms=2).model_copy(
        update={"slo": SLOConfig(ttft_s=2.0, tpot_s=0.011, attainment=0.9)})
    outcome = search(build_problem(request))
    others = {o.front_end_layout: o for o in outcome.other_layouts}
    assert outcome.front_end_layout == "with_prefill" and not outcome.serve_colocated
    for other in others.values():
        assert outcome.deployment_goodput_rps > 2 * other.deployment_goodput_rps
    # Its decode runs at profiled speed: at the plan's goodput, TPOT is what the same plan
    # gives with no front end at all (up to prefills finishing later), and TTFT pays.
    plan, rate = outcome.best.plan, outcome.best.goodput_rps
    ours = _Search(for_front_end_layout(build_problem(request), "with_prefill")).judge(plan).measure(rate)
    free = _Search(build_problem(_request(synthetic_profile_path, tiny_model_dir).model_copy(
        update={"slo": request.slo}))).judge(plan).measure(rate)
    assert ours.mean_tpot_s == pytest.approx(free.mean_tpot_s, rel=0.05)
    assert ours.mean_ttft_s > free.mean_ttft_s + 0.02


def test_plan_keeps_a_light_front_end_on_the_engines_cores(
        synthetic_profile_path, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "plan.yaml"
    assert _run(_plan_args(synthetic_profile_path, tiny_model_dir, out, "1", "0")) == 0
    report = capsys.readouterr().out
    # A 1 ms front end costs the engines next to nothing wherever it runs, so no core is
    # given up for it: among the engines, or (a tie, which keeps it off the decode
    # engines) with the prefill instance.
    assert "chosen  front end on 1 core(s) of its own" not in report, report
    config = load_config(out)
    assert _engine_cores(config) == {0, 1, 2}
    assert config.ray.front_end_cores in (None, [c for cores in config.prefill.cpu_cores for c in cores])


def test_the_shared_layout_pays_its_step_cost_and_the_reserved_one_does_not(
        synthetic_profile_path, tiny_model_dir):
    base = _request(synthetic_profile_path, tiny_model_dir, cpu_ms_per_request=5,
                    shared_core_step_ms=3, scheduler_poll_share=0.5)
    problem = build_problem(base)
    shared = for_front_end_layout(problem, "shared")
    reserved = for_front_end_layout(problem, "reserved")
    for tp, profile in problem.profiles.items():
        # One polling scheduler on each engine's core: x1.5, then 3 ms more per iteration.
        assert shared.profiles[tp].decoding_smallbs[0] == pytest.approx(1.5 * profile.decoding_smallbs[0] + 3)
        assert shared.profiles[tp].prefill[1:] == pytest.approx(tuple(1.5 * x for x in profile.prefill[1:]))
        assert reserved.profiles[tp] == profile
    assert reserved.request.cluster.gpu_budget == 1 and reserved.request.cluster.gpus_per_node == 1
    # With the front end on the prefill cores, every engine's scheduler is there too: one
    # prefill core with the schedulers of 1 prefill + 1 decode runs prefill x(1 + 0.5 x 2),
    # on top of the front end's processor share; the decode phase alone is not slowed.
    with_prefill = for_front_end_layout(problem, "with_prefill")
    assert with_prefill.profiles == problem.profiles
    effect = with_prefill.front_end_effect(engine_units=2, prefill_units=1)(0.0)
    assert effect.prefill_scale == pytest.approx(2.0) and effect.scale == 1.0
    assert with_prefill.front_end_effect(engine_units=2, prefill_units=0) is None


@pytest.mark.parametrize("front_end, message", [
    ({"layout": "reserved"}, "need the front end's cost"),
    ({"shared_core_step_ms": 2}, "need the front end's cost"),
    ({"cpu_ms_per_request": 5, "layout": "shared", "reserved_cores": 2}, "not shared"),
    ({"cpu_ms_per_request": 5, "layout": "reserved", "shared_core_step_ms": 2}, "not reserved"),
    ({"cpu_ms_per_request": 5, "layout": "reserved", "scheduler_poll_share": 0.4}, "not reserved"),
    ({"scheduler_poll_share": 0.4}, "need the front end's cost"),
])
def test_a_front_end_setting_that_would_be_ignored_is_refused(
        synthetic_profile_path, tiny_model_dir, front_end, message):
    with pytest.raises(ValueError, match=message):
        _request(synthetic_profile_path, tiny_model_dir, **front_end)


@pytest.mark.parametrize("change, message", [
    ({"cluster": {"device": "gpu"}}, "front_end models a CPU host"),
    ({"cluster": {"num_nodes": 2}}, "modelled on one node"),
    ({"engine": {"iteration_time_scale": 1.5}}, "set one of them"),
    ({"front_end": {"cpu_ms_per_request": 5, "layout": "reserved", "reserved_cores": 2}},
     "leaves no core"),
])
def test_front_end_input_that_cannot_hold_is_refused(synthetic_profile_path, tiny_model_dir, change, message):
    data = _request(synthetic_profile_path, tiny_model_dir, cpu_ms_per_request=5).model_dump(mode="json")
    for key, value in change.items():
        data[key] = {**(data[key] or {}), **value}
    with pytest.raises(ValueError, match=message):
        PlanRequest.model_validate(data)


def test_a_reserved_front_end_on_two_cores_writes_one_colocated_engine_after_it(
        synthetic_profile_path, tiny_model_dir, tmp_path, capsys):
    # 2 cores, the front end on one of them: one engine is left, so no disaggregated plan
    # exists; the report says so instead of "no plan", and the colocated engine goes to core 1.
    out = tmp_path / "plan.yaml"
    args = _plan_args(synthetic_profile_path, tiny_model_dir, out, "20", "0")
    args[args.index("--gpus-per-node") + 1] = "2"
    assert _run(args + ["--front-end-layout", "reserved"]) == 0
    report = capsys.readouterr().out
    assert "No disaggregated plan meets the SLO on 1 engine core(s)" in report, report
    assert "NO PLAN" not in report
    config = load_config(out)
    assert config.mode == "colocated" and config.colocated.num_instances == 1
    assert config.colocated.cpu_cores == [[1]] and config.ray.front_end_cores == [0]
