"""The transfer benchmark's measurement paths run and check their own copies (not timed)."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from bench.transfer_bench import (  # noqa: E402
    KIB,
    ShmPath,
    bandwidth_table,
    bench_fresh_pages,
    bench_memcpy,
    bench_shm,
    bench_tcp,
)
from kvtransfer.staging import list_segments  # noqa: E402


def test_shm_path_moves_the_blocks_and_reuses_pooled_files(tmp_path):
    path = ShmPath(512 * KIB, tmp_path)
    for _ in range(3):
        path.round_trip()
    for name, src in path.caches_src.items():
        dst = path.caches_dst[name]
        assert bool((dst[0::2] == src[1::2]).all())  # odd source blocks -> even decode blocks
    assert path.producer.pool.num_created == 1 and path.producer.pool.num_reused == 2
    assert list_segments(tmp_path) == []


def test_bandwidth_cells_and_table(tmp_path):
    size = 256 * KIB
    cells = [bench_memcpy(size), *bench_shm(size, tmp_path), bench_tcp(size, tmp_path)]
    assert {c.transport for c in cells} == {"memcpy", "shm", "stage+shm", "tcp"}
    assert all(c.size_bytes == size and c.median_s > 0 for c in cells)
    cells.append(bench_fresh_pages(size, tmp_path))
    table = bandwidth_table(cells)
    assert "256 KiB" in table and "stage+shm" in table


def test_device_path_bench_runs_on_host_tensors():
    from bench.transfer_bench import device_bandwidth, simulate_layerwise_prefill

    (row,) = device_bandwidth([256 * KIB], "cpu")
    assert row["size_bytes"] == 256 * KIB and row["d2d_gbps"] > 0 and row["stage_gbps"] > 0
    small = {"num_layers": 4, "num_kv_heads": 2, "head_size": 16, "dtype": "bfloat16",
             "block_size": 16}
    sim = simulate_layerwise_prefill("cpu", prompt_tokens=128, layer_ms=2.0, reps=1, shape=small)
    assert sim["kv_bytes"] == 4 * 8 * 2 * 16 * 32 * 2  # layers x blocks x heads x tokens x 2D x 2 B
    assert sim["compute_alone_s"] >= 4 * 2e-3  # four layers of at least 2 ms each
    assert sim["transfer_exposed_s"] >= 0 and sim["transfer_alone_s"] > 0
    # The share hidden behind compute is the transfer time not exposed after it, at least none.
    expected = max(0.0, 1 - sim["transfer_exposed_s"] / sim["transfer_alone_s"])
    assert sim["transfer_hidden_share"] == expected and 0 <= expected <= 1
