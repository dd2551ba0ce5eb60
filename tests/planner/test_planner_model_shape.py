import json

import numpy as np
import pytest

from cluster.planner.model_shape import (REFERENCE_MODELS, ModelShapeError, kv_capacity_tokens,
                                         load_capacity_table, load_model_shape)
from cluster.planner.workload import (ArrivalSpec, CsvLengths, FixedLengths, LognormalLengths,
                                      UniformLengths, WorkloadError, make_trace, read_lengths_csv)

GIB = 1024**3


def test_reference_shapes_and_kv_bytes():
    opt13 = load_model_shape("facebook/opt-13b")
    assert opt13.head_dim == 128
    assert opt13.kv_bytes_per_token == 2 * 40 * 40 * 128 * 2  # K+V, layers, heads, head_dim, fp16
    assert 25.0e9 < opt13.weights_bytes < 26.5e9  # ~12.9 B parameters
    assert load_model_shape("facebook/opt-66b").head_dim == 128
    with pytest.raises(ModelShapeError, match="reference model"):
        load_model_shape("facebook/opt-1b")


def test_local_config_with_gqa_and_explicit_head_dim(tiny_model_dir):
    shape = load_model_shape(str(tiny_model_dir))
    assert (shape.num_layers, shape.num_key_value_heads, shape.head_dim) == (8, 4, 128)
    assert shape.kv_bytes_per_token == 2 * 8 * 4 * 128 * 2
    assert shape.is_gated_mlp and not shape.tie_word_embeddings
    config = json.loads((tiny_model_dir / "config.json").read_text())
    (tiny_model_dir / "config.json").write_text(json.dumps({**config, "head_dim": 64}))
    assert load_model_shape(str(tiny_model_dir)).kv_bytes_per_token == 2 * 8 * 4 * 64 * 2
    (tiny_model_dir / "model.safetensors").write_bytes(b"\0" * 1234)
    assert load_model_shape(str(tiny_model_dir)).weights_bytes == 1234  # measured beats estimated


def test_capacity_follows_the_distserve_formula():
    shape = REFERENCE_MODELS["facebook/opt-13b"]
    mem = 80 * GIB
    for tp, pp in [(1, 1), (2, 1), (1, 2), (4, 2)]:
        usable = mem * 0.9 - shape.weights_bytes / (tp * pp)
        per_token = 2 * (40 // pp) * (40 // tp) * 128 * 2
        assert kv_capacity_tokens(shape, tp, pp, mem, 0.9) == int(usable // (per_token * 16)) * 16
    # More GPUs per instance: more room for KV, and OPT-66B does not fit on one 80 GB GPU.
    assert kv_capacity_tokens(shape, 2, 1, mem) > 2 * kv_capacity_tokens(shape, 1, 1, mem)
    assert kv_capacity_tokens(REFERENCE_MODELS["facebook/opt-66b"], 1, 1, mem) == 0


def test_capacity_table_matches_reference_csv(shared_data):
    table = load_capacity_table(shared_data / "max_num_tokens.csv", "facebook/opt-13b")
    assert table[(1, 1)] == 66144
    shape = REFERENCE_MODELS["facebook/opt-13b"]
    # Our formula (90% of 80 GiB) lands within 10% of DistServe's table.
    assert kv_capacity_tokens(shape, 1, 1, 80 * GIB) == pytest.approx(66144, rel=0.1)
    with pytest.raises(ModelShapeError, match="no rows"):
        load_capacity_table(shared_data / "max_num_tokens.csv", "other/model")


def test_traces_are_deterministic_and_rescale(tmp_path):
    lengths = UniformLengths(input_len_min=10, input_len_max=20, output_len_min=1, output_len_max=5)
    a = make_trace(lengths, ArrivalSpec(), 100, seed=3)
    b = make_trace(lengths, ArrivalSpec(), 100, seed=3)
    assert np.array_equal(a.unit_arrival_s, b.unit_arrival_s) and np.array_equal(a.input_lens, b.input_lens)
    assert not np.array_equal(a.input_lens, make_trace(lengths, ArrivalSpec(), 100, seed=4).input_lens)
    assert np.allclose(a.arrivals_at(4.0), a.unit_arrival_s / 4)
    assert a.input_lens.min() >= 10 and a.input_lens.max() <= 20


def test_arrival_processes_have_requested_rate_and_burstiness():
    fixed = FixedLengths(input_len=8, output_len=2)
    for cv in (0.5, 1.0, 3.0):
        arrival = ArrivalSpec(process="poisson") if cv == 1 else ArrivalSpec(process="gamma", cv=cv)
        gaps = np.diff(make_trace(fixed, arrival, 50_000, seed=1).unit_arrival_s)
        assert gaps.mean() == pytest.approx(1.0, rel=0.05)
        assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.05)
    with pytest.raises(ValueError, match="gamma"):
        ArrivalSpec(process="poisson", cv=2.0)


def test_length_sources(tmp_path):
    lognormal = LognormalLengths(input_len_median=100, input_len_sigma=0.5, output_len_median=20,
                                 output_len_sigma=0.5, max_input_len=300)
    t = make_trace(lognormal, ArrivalSpec(), 20_000, seed=0)
    assert np.median(t.input_lens) == pytest.approx(100, rel=0.05) and t.input_lens.max() <= 300
    csv_path = tmp_path / "lens.csv"
    csv_path.write_text("input_len,output_len\n5,7\n9,11\n")
    assert read_lengths_csv(csv_path)[0].tolist() == [5, 9]
    t = make_trace(CsvLengths(path=csv_path), ArrivalSpec(), 50, seed=0)
    assert set(zip(t.input_lens.tolist(), t.output_lens.tolist())) <= {(5, 7), (9, 11)}
    bad = tmp_path / "bad.csv"
    bad.write_text("input,output\n1,2\n")
    with pytest.raises(WorkloadError, match="header"):
        read_lengths_csv(bad)
    with pytest.raises(WorkloadError, match="not found"):
        read_lengths_csv(tmp_path / "none.csv")
    with pytest.raises(ValueError):
        UniformLengths(input_len_min=5, input_len_max=1, output_len_min=1, output_len_max=1)
