"""The online re-planner's pure core, step by step: snapshots in, decisions and effects out."""

from __future__ import annotations

import pytest

from cluster.planner.online import (AddInstances, DrainInstance, InstanceStatus, PoolBounds,
                                    PoolSizer, RemoveInstance, ReplanLoop, Replanner,
                                    ReplanSettings, Sizing, TrafficSnapshot)


def _instances(num_prefill, num_decode, draining=(), in_flight=None):
    in_flight = in_flight or {}
    out = []
    for role, n in (("prefill", num_prefill), ("decode", num_decode)):
        for i in range(n):
            iid = f"{role[0]}{i}"
            out.append(InstanceStatus(iid, role, "draining" if iid in draining else "serving",
                                      in_flight.get(iid, 3)))
    return tuple(out)


def _snap(t, instances, rate=10.0, n=100, ttft=0.1, tpot=0.02):
    return TrafficSnapshot(t, rate, (500,) * n, (100,) * n, 0.95, ttft, tpot, instances)


class FakeSizer:
    """Returns scripted sizes and records the correction it was given."""

    def __init__(self, *sizes):
        self.sizes = list(sizes)
        self.corrections = []

    def __call__(self, snap, correction):
        self.corrections.append(correction)
        n_p, n_d = self.sizes.pop(0)
        return Sizing(n_p, n_d, predicted_ttft_s=0.1, predicted_tpot_s=0.02)


SETTINGS = ReplanSettings(observe_only=False, interval_s=60, max_units=8,
                          prefill=PoolBounds(min_instances=1, max_instances=4),
                          decode=PoolBounds(min_instances=1, max_instances=6))


def test_observe_only_decides_but_never_acts():
    core = Replanner(SETTINGS.model_copy(update={"observe_only": True}), FakeSizer((2, 3)))
    assert core.observe(_snap(0, _instances(1, 1))) == []
    (d,) = core.decisions
    assert (d.action, d.num_prefill, d.num_decode, d.applied) == ("resize", (1, 2), (1, 3), False)
    assert "10.00 req/s" in d.reason


def test_grow_then_shrink_drains_before_it_removes():
    core = Replanner(SETTINGS, FakeSizer((2, 3), (1, 2)))
    assert core.observe(_snap(0, _instances(1, 1))) == [AddInstances("prefill", 1), AddInstances("decode", 2)]
    # Within the interval nothing is re-sized (the fake would raise if asked: no sizes left
    # would be wrong, it still has one).
    assert core.observe(_snap(30, _instances(2, 3))) == []
    assert len(core.decisions) == 1
    # Shrink: one decision, the instances with the fewest requests in flight drain first.
    effects = core.observe(_snap(60, _instances(2, 3, in_flight={"p0": 5, "p1": 1, "d0": 4, "d1": 0, "d2": 2})))
    assert effects == [DrainInstance("prefill", "p1"), DrainInstance("decode", "d1")]
    assert core.decisions[-1].num_prefill == (2, 1) and core.decisions[-1].num_decode == (3, 2)
    # Still busy: nothing removed; idle: removed, between sizing ticks.
    busy = _instances(2, 3, draining=("p1", "d1"), in_flight={"p1": 2, "d1": 0})
    assert core.observe(_snap(61, busy)) == [RemoveInstance("decode", "d1")]
    idle = _instances(2, 2, draining=("p1",), in_flight={"p1": 0})
    assert core.observe(_snap(62, idle)) == [RemoveInstance("prefill", "p1")]
    assert core.observe(_snap(63, idle)) == []  # removed once


def test_a_ratio_change_is_one_decision():
    core = Replanner(SETTINGS, FakeSizer((3, 1)))
    effects = core.observe(_snap(0, _instances(2, 2, in_flight={"d0": 1, "d1": 9})))
    assert effects == [AddInstances("prefill", 1), DrainInstance("decode", "d0")]
    assert len(core.decisions) == 1 and core.decisions[0].action == "resize"


def test_bounds_and_unit_budget():
    core = Replanner(SETTINGS, FakeSizer((9, 0), (4, 6)))
    core.observe(_snap(0, _instances(1, 1)))
    d = core.decisions[-1]
    assert d.num_prefill[1] == 4 and d.num_decode[1] == 1 and "pool bounds" in d.reason
    core.observe(_snap(60, _instances(4, 1)))
    d = core.decisions[-1]  # 4 + 6 units asked, 8 allowed: both pools give in proportion
    assert d.num_prefill[1] + d.num_decode[1] == 8 and "unit budget of 8" in d.reason
    assert d.num_prefill[1] >= 3 and d.num_decode[1] >= 4


def test_too_few_requests_holds_without_sizing():
    sizer = FakeSizer()
    core = Replanner(SETTINGS, sizer)
    assert core.observe(_snap(0, _instances(1, 1), n=10)) == []
    assert core.decisions[0].action == "hold" and "too few" in core.decisions[0].reason
    assert sizer.corrections == []


def test_measured_slower_than_predicted_corrects_the_next_sizing():
    sizer = FakeSizer((1, 1), (1, 1), (1, 1))
    core = Replanner(SETTINGS, sizer)
    core.observe(_snap(0, _instances(1, 1), tpot=0.04))  # 2x the predicted 0.02
    core.observe(_snap(60, _instances(1, 1), tpot=0.04))
    core.observe(_snap(120, _instances(1, 1), tpot=1.0))  # 50x: clamped
    assert sizer.corrections[:2] == [1.0, pytest.approx(2.0)]
    assert core.decisions[-1].correction == SETTINGS.max_correction
    assert all(d.action == "hold" for d in core.decisions)


def test_loop_applies_effects_through_the_actuator():
    class FakeActuator:
        def __init__(self):
            self.calls = []

        def add(self, role, count):
            self.calls.append(("add", role, count))

        def drain(self, role, instance_id):
            self.calls.append(("drain", role, instance_id))

        def remove(self, role, instance_id):
            self.calls.append(("remove", role, instance_id))

    snaps = iter([_snap(0, _instances(1, 2, in_flight={"d0": 0, "d1": 1})),
                  _snap(10, _instances(2, 2, draining=("d0",), in_flight={"d0": 0}))])
    actuator = FakeActuator()
    loop = ReplanLoop(Replanner(SETTINGS, FakeSizer((2, 1))), lambda: next(snaps), actuator)
    loop.tick()
    loop.tick()
    assert actuator.calls == [("add", "prefill", 1), ("drain", "decode", "d0"), ("remove", "decode", "d0")]


def test_pool_sizer_follows_a_workload_shift(synthetic_profile_path, tiny_model_dir):
    # The real sizer (co-simulation): short prompts with long outputs need decode capacity,
    # long prompts with short outputs need prefill capacity, and more traffic more of both.
    from cluster.planner.inputs import PlanRequest
    from cluster.planner.plans import ParallelConfig
    from cluster.planner.problem import build_problem
    problem = build_problem(PlanRequest.model_validate({
        "model": str(tiny_model_dir), "profile": str(synthetic_profile_path),
        "slo": {"ttft_s": 0.2, "tpot_s": 0.03, "attainment": 0.9},
        "workload": {"lengths": {"kind": "fixed", "input_len": 100, "output_len": 10}},
        "cluster": {"num_nodes": 1, "gpus_per_node": 8, "gpu_memory_gib": 16}}))
    settings = ReplanSettings(max_units=8, prefill=PoolBounds(max_instances=6),
                              decode=PoolBounds(max_instances=6))
    sizer = PoolSizer(problem, ParallelConfig(1, 1), ParallelConfig(1, 1), settings, num_requests=300)
    inst = _instances(2, 2)

    def size(rate, prompt, output):
        snap = TrafficSnapshot(0, rate, (prompt,) * 100, (output,) * 100, 1.0, 0.1, 0.02, inst)
        s = sizer(snap, 1.0)
        return s.num_prefill, s.num_decode

    chat = size(20, 64, 256)
    summarise = size(10, 1024, 8)
    assert chat[1] > chat[0] and summarise[0] > summarise[1]
    low, high = size(3, 1024, 8), size(12, 1024, 8)
    assert sum(low) < sum(high)


def test_pool_sizer_without_a_passing_size_asks_for_the_closest_within_the_budget(
        synthetic_profile_path, tiny_model_dir):
    # Decode-bound traffic too heavy for any split of 4 units: the sizer must not ask for the
    # largest pools (which the budget then cuts to an even split) but for the split whose
    # co-simulated attainment comes closest: more decodes than prefills.
    from cluster.planner.inputs import PlanRequest
    from cluster.planner.plans import ParallelConfig
    from cluster.planner.problem import build_problem
    problem = build_problem(PlanRequest.model_validate({
        "model": str(tiny_model_dir), "profile": str(synthetic_profile_path),
        "slo": {"ttft_s": 0.2, "tpot_s": 0.03, "attainment": 0.9},
        "workload": {"lengths": {"kind": "fixed", "input_len": 100, "output_len": 10}},
        "cluster": {"num_nodes": 1, "gpus_per_node": 8, "gpu_memory_gib": 16}}))
    settings = ReplanSettings(max_units=4, prefill=PoolBounds(max_instances=3),
                              decode=PoolBounds(max_instances=3))
    sizer = PoolSizer(problem, ParallelConfig(1, 1), ParallelConfig(1, 1), settings, num_requests=300)
    snap = TrafficSnapshot(0, 40, (64,) * 100, (256,) * 100, 0.1, 0.1, 0.2, _instances(2, 2))
    s = sizer(snap, 1.0)
    assert "closest" in s.note
    assert s.num_prefill + s.num_decode <= 4 and s.num_decode > s.num_prefill
