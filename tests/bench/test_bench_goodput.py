"""Goodput search on synthetic attainment curves, and units from configs."""

import math

import pytest

from bench.errors import BenchError
from bench.goodput import GoodputSearch, SearchSettings, Units, search_goodput, units_from_config
from cluster.config import ServeConfig


def step(capacity_rps):
    return lambda rate: 1.0 if rate <= capacity_rps else 0.5


def logistic(knee_rps):
    # Smooth, monotone: attainment 0.9 exactly at knee_rps.
    return lambda rate: 1 / (1 + math.exp((rate - knee_rps) / knee_rps * 10 - math.log(9)))


def test_geometric_sweep_then_bisect_brackets_the_capacity():
    calls = []

    def measure(rate):
        calls.append(rate)
        return step(7.3)(rate)

    result = search_goodput(measure, SearchSettings(start_rate_rps=1.0, num_bisect_steps=10,
                                                    rel_tolerance=0.01))
    assert calls[:4] == [1.0, 2.0, 4.0, 8.0]  # sweep stops at the first miss
    assert result.lowest_failing_rate_rps is not None
    assert result.goodput_rps <= 7.3 < result.lowest_failing_rate_rps
    assert (result.lowest_failing_rate_rps - result.goodput_rps) / result.goodput_rps <= 0.01
    assert [p.phase for p in result.probes][:4] == ["sweep"] * 4
    assert all(p.phase == "bisect" for p in result.probes[4:])


def test_bisection_steps_bound_the_probes():
    result = search_goodput(step(7.3), SearchSettings(num_bisect_steps=2, rel_tolerance=0.0))
    assert len(result.probes) == 4 + 2
    assert result.goodput_rps == 7.0  # 4 pass, 8 fail, 6 pass, 7 pass


def test_smooth_curve_goodput_near_the_knee():
    result = search_goodput(logistic(20.0), SearchSettings(start_rate_rps=2.0,
                                                          num_bisect_steps=8,
                                                          rel_tolerance=0.005))
    assert result.goodput_rps == pytest.approx(20.0, rel=0.02)
    assert result.goodput_rps <= 20.0


def test_explicit_rates_and_full_sweep():
    settings = SearchSettings(rates_rps=(16.0, 2.0, 4.0, 8.0), num_bisect_steps=0)
    result = search_goodput(step(5.0), settings)
    assert [p.rate_rps for p in result.probes] == [2.0, 4.0, 8.0]  # sorted, stops at a miss
    assert result.goodput_rps == 4.0
    full = search_goodput(step(5.0), SearchSettings(rates_rps=(2.0, 4.0, 8.0, 16.0),
                                                    num_bisect_steps=0, full_sweep=True))
    assert [p.rate_rps for p in full.probes] == [2.0, 4.0, 8.0, 16.0]
    assert full.goodput_rps == 4.0


def test_steps_down_when_the_first_rate_misses():
    result = search_goodput(step(0.3), SearchSettings(start_rate_rps=4.0, num_bisect_steps=0))
    assert [p.rate_rps for p in result.probes] == [4.0, 2.0, 1.0, 0.5, 0.25]
    assert result.probes[1].phase == "step_down"
    assert result.goodput_rps == 0.25


def test_nothing_meets_the_target():
    result = search_goodput(lambda rate: 0.0, SearchSettings(start_rate_rps=1.0, min_rate_rps=0.2))
    assert result.goodput_rps == 0.0
    assert min(p.rate_rps for p in result.probes) >= 0.2


def test_every_rate_passes_gives_a_lower_bound():
    result = search_goodput(lambda rate: 1.0, SearchSettings(start_rate_rps=1.0, max_rate_rps=16.0))
    assert result.goodput_rps == 16.0 and not result.is_upper_bounded
    listed = search_goodput(lambda rate: 1.0, SearchSettings(rates_rps=(1.0, 3.0)))
    assert listed.goodput_rps == 3.0 and not listed.is_upper_bounded


def test_non_monotone_noise_is_handled_conservatively():
    # 8 misses but 16 passes (noise): goodput never counts rates above a miss.
    noisy = {1.0: 1.0, 2.0: 1.0, 4.0: 1.0, 8.0: 0.5, 16.0: 1.0}
    result = search_goodput(lambda r: noisy.get(r, 0.5),
                            SearchSettings(rates_rps=tuple(noisy), full_sweep=True,
                                           num_bisect_steps=0))
    assert result.goodput_rps == 4.0 and result.lowest_failing_rate_rps == 8.0


def test_attainment_target_threshold_is_inclusive():
    search = GoodputSearch(SearchSettings(attainment_target=0.9, rates_rps=(1.0,)))
    assert search.next_rate() == 1.0
    search.observe(1.0, 0.9)
    assert search.probes[0].meets_target
    assert search.next_rate() is None


def test_invalid_search_settings():
    with pytest.raises(BenchError):
        SearchSettings(growth_factor=1.0)
    with pytest.raises(BenchError):
        SearchSettings(rates_rps=(1.0, -2.0))
    with pytest.raises(BenchError):
        SearchSettings(attainment_target=0.0)


def test_units_from_configs():
    cpu = ServeConfig.model_validate({
        "mode": "disaggregated",
        "prefill": {"num_instances": 2, "cpu_cores": [[0, 1], [2]]},
        "decode": {"num_instances": 1},
    })
    assert units_from_config(cpu) == Units(4.0, "core")  # 2 + 1 pinned, 1 reserved
    gpu = ServeConfig.model_validate({
        "mode": "colocated",
        "colocated": {"num_instances": 2, "num_gpus": 2, "tensor_parallel_size": 2},
    })
    assert units_from_config(gpu) == Units(4.0, "GPU")
    assert str(Units(1.0, "core")) == "1 core" and str(Units(4.0, "GPU")) == "4 GPUs"


def test_cpu_units_count_the_front_end_core_a_local_deployment_keeps():
    one = ServeConfig.model_validate({"mode": "colocated", "colocated": {"num_instances": 1}})
    assert units_from_config(one) == Units(1.0, "core")  # the engine's reservation alone
    # pdserve serve on 2 cores puts the engine on one and keeps the other for the front end
    assert units_from_config(one, host_cores=2) == Units(2.0, "core")
    two = ServeConfig.model_validate({"mode": "colocated", "colocated": {"num_instances": 2}})
    assert units_from_config(two, host_cores=2) == Units(2.0, "core")  # no core kept
    pinned = ServeConfig.model_validate({"mode": "colocated",
                                         "colocated": {"num_instances": 1, "cpu_cores": [[1]]}})
    assert units_from_config(pinned) == Units(1.0, "core")  # the engine's own core
    # On 2 cores pdserve serve pins the front end to the core the engine leaves free.
    assert units_from_config(pinned, host_cores=2) == Units(2.0, "core")
    fenced = ServeConfig.model_validate({"mode": "colocated", "ray": {"front_end_cores": [0]},
                                         "colocated": {"num_instances": 1, "cpu_cores": [[1]]}})
    assert units_from_config(fenced) == units_from_config(fenced, host_cores=2) == Units(2.0, "core")
    shared = ServeConfig.model_validate({"mode": "colocated", "ray": {"front_end_cores": [1]},
                                         "colocated": {"num_instances": 1, "cpu_cores": [[1]]}})
    assert units_from_config(shared) == Units(1.0, "core")  # the front end on the engine's core
