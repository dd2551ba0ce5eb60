"""cluster.slo: the one TPOT / SLO definition, and that router, bench and planner use it."""

import numpy as np
import pytest

from cluster import slo
from cluster.config import SLOConfig

SLO = SLOConfig(ttft_s=0.5, tpot_s=0.1, attainment=0.9)


def test_scalar_definitions():
    assert slo.tpot_s(1.0, 2.0, 11) == pytest.approx(0.1)
    assert slo.tpot_s(1.0, 1.0, 1) is None
    assert slo.meets_slo(0.5, 0.1, SLO) and slo.meets_slo(0.2, None, SLO)
    assert not slo.meets_slo(0.51, 0.05, SLO) and not slo.meets_slo(0.2, 0.11, SLO)
    assert not slo.meets_slo(None, None, SLO)  # never produced a token


def test_array_forms_agree_with_the_scalar_ones():
    first = np.array([1.0, 1.0, 1.0, np.inf])
    last = np.array([2.0, 1.0, 3.0, np.inf])
    n = np.array([11, 1, 11, 5])
    tpot = slo.tpot_s_array(first, last, n)
    assert tpot.tolist() == pytest.approx([0.1, 0.0, 0.2, np.inf])
    ttft = np.array([0.4, 0.6, 0.1, np.inf])
    assert slo.meets_slo_array(ttft, tpot, SLO).tolist() == [
        slo.meets_slo(t, None if k == 1 else p, SLO) if np.isfinite(t) else False
        for t, p, k in zip(ttft, tpot, n)]
    assert slo.attainment(np.array([], bool)) == 1.0


def test_router_bench_and_planner_share_it():
    import bench.metrics
    import cluster.planner.simulator
    import router.metrics
    for module in (bench.metrics, router.metrics, cluster.planner.simulator):
        assert module.slo_math is slo
    assert bench.metrics.tpot_s(e2e_s=2.0, ttft_s=1.0, num_output_tokens=11) == slo.tpot_s(1.0, 2.0, 11)


def test_lognormal_lengths_mean_the_same_in_plan_and_bench():
    import numpy as np

    from bench.workload import LengthDistribution
    from cluster.planner.workload import LognormalLengths, sample_lengths
    plan = LognormalLengths(input_len_mean=400, input_len_sigma=0.8, output_len_mean=100,
                            output_len_sigma=0.5, max_input_len=100_000, max_output_len=100_000)
    ins, outs = sample_lengths(plan, 200_000, np.random.default_rng(0))
    bench_ins = LengthDistribution("lognormal", mean=400, sigma=0.8, max_len=100_000).sample(
        200_000, np.random.default_rng(1))
    assert ins.mean() == pytest.approx(400, rel=0.02) and bench_ins.mean() == pytest.approx(400, rel=0.02)
    assert outs.mean() == pytest.approx(100, rel=0.02)
    median = LognormalLengths(input_len_median=400, input_len_sigma=0.8, output_len_median=100,
                              output_len_sigma=0.5)
    assert np.median(sample_lengths(median, 50_000, np.random.default_rng(0))[0]) == pytest.approx(400, rel=0.03)
    with pytest.raises(ValueError, match="exactly one"):
        LognormalLengths(input_len_mean=1, input_len_median=1, input_len_sigma=1,
                         output_len_mean=1, output_len_sigma=1)
