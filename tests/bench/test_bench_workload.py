"""Length distributions, length CSVs, clipping and exact-length prompts."""

from pathlib import Path

import numpy as np
import pytest

from bench.errors import BenchError
from bench.prompts import PromptBuilder
from bench.workload import (DatasetLengths, LengthDistribution, SyntheticLengths, build_workload,
                            clip_lengths, load_length_csv)

SHAREGPT = Path(__file__).resolve().parents[3] / "shared" / "data" / "sharegpt_opt_lengths.csv"


def test_fixed_uniform_lognormal_lengths():
    rng = np.random.default_rng(0)
    assert set(LengthDistribution("fixed", mean=7).sample(50, rng)) == {7}
    uniform = LengthDistribution("uniform", min_len=10, max_len=20).sample(20_000, rng)
    assert uniform.min() == 10 and uniform.max() == 20
    assert uniform.mean() == pytest.approx(15, abs=0.1)
    lognormal = LengthDistribution("lognormal", mean=200, sigma=0.8).sample(50_000, rng)
    assert lognormal.mean() == pytest.approx(200, rel=0.03)
    assert np.median(lognormal) == pytest.approx(200 * np.exp(-0.8**2 / 2), rel=0.03)
    clipped = LengthDistribution("lognormal", mean=200, min_len=50, max_len=300).sample(5000, rng)
    assert clipped.min() >= 50 and clipped.max() <= 300


@pytest.mark.parametrize("kwargs, message", [
    ({"kind": "uniform", "min_len": 1}, "needs a max length"),
    ({"kind": "fixed", "mean": 0}, ">= 1"),
    ({"kind": "uniform", "min_len": 10, "max_len": 5}, "below min length"),
    ({"kind": "lognormal", "sigma": 0.0}, "sigma"),
])
def test_invalid_distributions(kwargs, message):
    with pytest.raises(BenchError, match=message):
        LengthDistribution(**kwargs)


def test_length_csv_reads_pairs_and_samples_by_seed(tmp_path):
    path = tmp_path / "lengths.csv"
    path.write_text("input_len,output_len,source\n10,1,a\n20,2,b\n30,3,c\n")
    dataset = load_length_csv(path)
    assert dataset.input_lens.tolist() == [10, 20, 30]
    a = dataset.sample(3, np.random.default_rng(1))
    b = dataset.sample(3, np.random.default_rng(1))
    assert [x.tolist() for x in a] == [x.tolist() for x in b]
    assert sorted(a[0].tolist()) == [10, 20, 30]  # without replacement while rows last
    assert (a[1] * 10 == a[0]).all()  # pairs stay together


@pytest.mark.parametrize("text, message", [
    ("in,out\n1,2\n", "expected a header with input_len and output_len"),
    ("", "expected a header"),
    ("input_len,output_len\n10,5\n12,abc\n", r"lengths.csv:3: output_len 'abc' is not an integer"),
    ("input_len,output_len\n10\n", r"lengths.csv:2: output_len None is not an integer"),
    ("input_len,output_len\n-1,5\n", r"lengths.csv:2: input_len must be >= 1"),
    ("input_len,output_len\n", "no rows"),
])
def test_malformed_length_csv(tmp_path, text, message):
    path = tmp_path / "lengths.csv"
    path.write_text(text)
    with pytest.raises(BenchError, match=message):
        load_length_csv(path)


def test_missing_length_csv(tmp_path):
    with pytest.raises(BenchError, match="cannot read length file"):
        load_length_csv(tmp_path / "missing.csv")


@pytest.mark.skipif(not SHAREGPT.exists(), reason=f"reference data not found at {SHAREGPT}")
def test_sharegpt_lengths_match_the_documented_means():
    dataset = load_length_csv(SHAREGPT)
    assert len(dataset.input_lens) == 12_088
    assert dataset.input_lens.mean() == pytest.approx(767, abs=1)
    assert dataset.output_lens.mean() == pytest.approx(199, abs=1)


def test_clip_lengths_to_context_and_minimum():
    inputs, outputs, changed = clip_lengths(np.array([1, 100, 3000, 500]),
                                            np.array([5, 100, 50, 1800]), 2, 2048)
    assert inputs.tolist() == [2, 100, 2047, 500]
    assert outputs.tolist() == [5, 100, 1, 1548]
    assert changed == 3
    assert ((inputs + outputs) <= 2048).all()
    with pytest.raises(BenchError, match="leaves no room"):
        clip_lengths(np.array([5]), np.array([5]), 2, 2)


def test_prompt_builder_hits_exact_token_counts(tiny_tokenizer):
    builder = PromptBuilder(tiny_tokenizer)
    assert builder.num_special_tokens == 1  # the BOS the tiny model's tokenizer adds
    rng = np.random.default_rng(0)
    targets = list(range(builder.min_tokens, 80)) + rng.integers(80, 3000, size=40).tolist()
    for n in targets:
        text = builder.build(n, np.random.default_rng(n))
        assert len(tiny_tokenizer(text).input_ids) == n, n
    with pytest.raises(BenchError, match="at least 2 tokens"):
        builder.build(1, rng)


def test_workload_is_deterministic_exact_and_prefixes_differ(tiny_tokenizer):
    builder = PromptBuilder(tiny_tokenizer)
    lengths = SyntheticLengths(LengthDistribution("uniform", min_len=1, max_len=400),
                               LengthDistribution("lognormal", mean=50))
    workload = build_workload(lengths, 30, builder, seed=3, max_context=256)
    again = build_workload(lengths, 30, builder, seed=3, max_context=256)
    assert workload == again
    assert workload.num_clipped > 0
    for request in workload.requests:
        assert len(tiny_tokenizer(request.prompt).input_ids) == request.input_len
        assert request.input_len >= builder.min_tokens
        assert request.input_len + request.output_len <= 256
    # No two prompts share a first KV block (16 tokens): prefix caching cannot help.
    prefixes = {tuple(tiny_tokenizer(r.prompt).input_ids[:17]) for r in workload.requests
                if r.input_len >= 17}
    assert len(prefixes) == sum(1 for r in workload.requests if r.input_len >= 17)
    other = build_workload(lengths, 30, builder, seed=4)
    assert other.requests[0].prompt != workload.requests[0].prompt


def test_dataset_workload_keeps_pairs(tiny_tokenizer):
    dataset = DatasetLengths(np.array([10, 20, 30]), np.array([1, 2, 3]))
    workload = build_workload(dataset, 6, PromptBuilder(tiny_tokenizer), seed=0)
    assert all(r.input_len == 10 * r.output_len for r in workload.requests)
