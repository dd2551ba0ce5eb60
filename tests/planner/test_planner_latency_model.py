import json

import numpy as np
import pytest

from cluster.planner.latency_model import EngineTiming, ProfileError, load_profiles, parse_profiles
from cluster.planner.profile_fit import (DecodeSample, PrefillSample, fit_decode, fit_prefill, fit_profile,
                                         profile_document)


def test_reference_profile_worked_values(shared_data):
    table = load_profiles(shared_data / "profiler-a100-80g.distserve.json")
    assert table.models() == ["facebook/opt-13b", "facebook/opt-66b"]
    assert table.tensor_parallel_sizes("facebook/opt-66b") == [2, 3, 4, 8]
    tp1, tp2 = table.get("facebook/opt-13b", 1), table.get("facebook/opt-13b", 2)
    # README worked values. Decode matches to 0.01 ms; the README's prefill values carry an
    # extra 1 ms per iteration (a per-stage constant some DistServe versions add), which
    # the documented formula a + b*sum(l) + c*sum(l^2) does not have.
    assert tp1.decode_ms([1024] * 16) == pytest.approx(30.82, abs=0.02)
    assert tp2.decode_ms([1024] * 16) == pytest.approx(19.89, abs=0.02)
    assert tp1.prefill_ms([512]) == pytest.approx(73.15 - 1.0, abs=0.02)
    assert tp1.prefill_ms([1024, 1024]) == pytest.approx(242.76 - 1.0, abs=0.02)
    assert tp2.prefill_ms([512]) == pytest.approx(51.50 - 1.0, abs=0.02)
    # Both reference files share the format.
    assert load_profiles(shared_data / "profiler-a100-80g.vllm.json").models()


def test_decode_switches_coefficients_at_threshold(synthetic_profile_path):
    p = load_profiles(synthetic_profile_path).get("test/tiny", 1)
    assert p.hardware == "test-gpu"
    assert p.decode_ms([0] * 94) == pytest.approx(8.0 + 0.001 * 94 + 0.2 * 94)
    assert p.decode_ms([0] * 95) == pytest.approx(6.0 + 0.001 * 95 + 0.3 * 95)


def test_pipeline_divides_prefill_per_stage(synthetic_profile_path):
    p = load_profiles(synthetic_profile_path).get("test/tiny", 1)
    timing = EngineTiming(p, pipeline_parallel_size=4)
    first, later = timing.prefill_stage_s(100, 100**2)
    assert first == later == pytest.approx(p.prefill_ms([100]) / 4 / 1000)
    assert timing.prefill_latency_s(100, 100**2) == pytest.approx(p.prefill_ms([100]) / 1000)
    overhead = EngineTiming(p, 1, framework_overhead=True)
    assert overhead.prefill_stage_s(100, 100**2)[0] == pytest.approx((p.prefill_ms([100]) + 2.01) / 1000)
    # A profile of whole engine iterations (`pdserve profile`) already holds that overhead.
    whole = EngineTiming(p.model_copy(update={"whole_iterations": True}), 1, framework_overhead=True)
    assert whole.prefill_stage_s(100, 100**2)[0] == pytest.approx(p.prefill_ms([100]) / 1000)
    assert whole.decode_step_s(8, 800) == pytest.approx(EngineTiming(p).decode_step_s(8, 800))
    assert whole.mixed_step_s([50], [0], 8, 800) == pytest.approx(EngineTiming(p).mixed_step_s([50], [0], 8, 800))


def test_chunked_prefill_cost_sums_to_whole_prompt(synthetic_profile_path):
    p = load_profiles(synthetic_profile_path).get("test/tiny", 1)
    timing = EngineTiming(p)
    a = p.prefill[0]
    chunks = [timing.mixed_step_s([250], [done], 0, 0) for done in (0, 250, 500, 750)]
    # Four chunks pay the fixed cost four times but the same token and attention work.
    assert sum(chunks) * 1000 == pytest.approx(p.prefill_ms([1000]) + 3 * a)


@pytest.mark.parametrize(
    "content, message",
    [
        ("not json", "not valid JSON"),
        ("[]", "non-empty object"),
        (json.dumps({"m": {"x": {}}}), "TP degrees"),
        (json.dumps({"m": {"1": {"prefill": [1, 2]}}}), "prefill"),
        (json.dumps({"m": {"1": {"prefill": [1, 2, 3], "decoding_smallbs": [1, 2, 3],
                                 "decoding_largebs": [1, 2, 3], "typo": 1}}}), "typo"),
    ],
)
def test_bad_profiles_raise_readable_errors(tmp_path, content, message):
    path = tmp_path / "p.json"
    path.write_text(content)
    with pytest.raises(ProfileError, match=message):
        load_profiles(path)


def test_missing_entries_name_what_exists(synthetic_profile_path):
    table = load_profiles(synthetic_profile_path)
    with pytest.raises(ProfileError, match=r"has \[1, 2\]"):
        table.get("test/tiny", 8)
    with pytest.raises(ProfileError, match="test/tiny"):
        table.get("other", 1)
    with pytest.raises(ProfileError, match="not found"):
        load_profiles(synthetic_profile_path.parent / "missing.json")


def test_fit_recovers_known_coefficients():
    rng = np.random.default_rng(0)
    prefill_true, small_true, large_true = (18.1, 0.102, 7.1e-6), (19.9, 6.3e-4, 0.0385), (7.2, 5.8e-4, 0.158)
    prefill = []
    for _ in range(60):
        lens = rng.integers(16, 2048, rng.integers(1, 6)).tolist()
        t = prefill_true[0] + prefill_true[1] * sum(lens) + prefill_true[2] * sum(l * l for l in lens)
        prefill.append(PrefillSample(tuple(lens), t * (1 + rng.normal(0, 0.002))))
    decode = []
    for _ in range(120):
        batch = int(rng.integers(1, 200))
        ctx = rng.integers(16, 2048, batch).tolist()
        a, b, c = small_true if batch < 95 else large_true
        decode.append(DecodeSample(tuple(ctx), (a + b * (sum(ctx) + batch) + c * batch) * (1 + rng.normal(0, 0.002))))
    assert np.allclose(fit_prefill(prefill), prefill_true, rtol=0.05)
    small, large = fit_decode(decode, threshold=95)
    assert np.allclose(small, small_true, rtol=0.05)
    assert np.allclose(large, large_true, rtol=0.05)

    entry = fit_profile(prefill, decode, hardware="A100", kv_capacity_tokens=1000)
    document = json.loads(json.dumps(profile_document("m", {1: entry})))  # the file format
    reloaded = parse_profiles(document).get("m", 1)
    assert reloaded.hardware == "A100" and reloaded.kv_capacity_tokens == 1000
    assert np.allclose(reloaded.prefill, prefill_true, rtol=0.05)


def test_fit_accepts_tuples_and_reuses_one_regime():
    prefill = [([n], 5 + 0.1 * n + 1e-5 * n * n) for n in (16, 64, 256, 512, 1024)]
    decode = [([50 + 10 * b] * b, 3 + 0.001 * (51 + 10 * b) * b + 0.2 * b) for b in (1, 2, 4, 8, 16, 32)]
    assert np.allclose(fit_prefill(prefill), (5, 0.1, 1e-5), rtol=1e-6, atol=1e-9)
    small, large = fit_decode(decode)
    assert small == large  # no large-batch samples: the small-batch fit stands for both
    with pytest.raises(ValueError, match="at least 3"):
        fit_prefill(prefill[:2])
    with pytest.raises(ValueError, match="determine"):
        fit_prefill([([100], 1.0)] * 5)
