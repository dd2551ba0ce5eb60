"""The load generator against the in-process fake SSE server (loopback only)."""

import asyncio

import pytest

from bench.deployment import free_port
from bench.errors import BenchError
from bench.fake_server import FakeServerThread, FakeTiming
from bench.loadgen import LoadOptions, check_server, inter_token_gaps, run_load, tokens_per_chunk
from bench.metrics import request_metrics, summarize
from bench.records import RequestOutcome
from bench.workload import RequestSpec
from cluster.config import SLOConfig

TTFT_S, TPOT_S = 0.05, 0.02
# Timers on a shared 2-core machine: allow some scheduling noise, never less than truth.
SLACK_S = 0.05


def specs(num, output_len=10, prompt="one two three"):
    return [RequestSpec(index=i, input_len=4, output_len=output_len, prompt=prompt)
            for i in range(num)]


def options(url, **kw):
    return LoadOptions(base_url=url, model="fake-model", show_progress=False, **kw)


@pytest.fixture(scope="module")
def server():
    with FakeServerThread(FakeTiming(ttft_s=TTFT_S, tpot_s=TPOT_S)) as s:
        asyncio.run(run_load(specs(1, output_len=1), [0.0], options(s.url)))  # warm-up
        yield s


@pytest.fixture(scope="module")
def chunky_server():
    with FakeServerThread(FakeTiming(ttft_s=TTFT_S, tpot_s=TPOT_S, tokens_per_chunk=3)) as s:
        yield s


def test_measured_ttft_and_tpot_match_the_server(server):
    run = asyncio.run(run_load(specs(4), [0.0, 0.05, 0.1, 0.15], options(server.url)))
    assert len(run.records) == 4 and run.num_not_sent == 0
    ttfts = sorted(r.ttft_s for r in run.records)
    assert ttfts[0] >= TTFT_S  # never faster than the server's delay
    assert ttfts[len(ttfts) // 2] < TTFT_S + SLACK_S
    assert ttfts[-1] < TTFT_S + 3 * SLACK_S  # one may pay a connection set-up
    for r in run.records:
        assert r.outcome is RequestOutcome.OK, r.error
        assert r.num_output_tokens == 10 and r.num_chunks == 10
        m = request_metrics(r, SLOConfig())
        assert m.tpot_s == pytest.approx(TPOT_S, abs=0.01)
        assert len(r.itl_s) == 9
        assert sum(r.itl_s) == pytest.approx(r.e2e_s - r.ttft_s)
    sent = [r.sent_s for r in run.records]
    assert sent == pytest.approx([0.0, 0.05, 0.1, 0.15], abs=0.04)  # open loop, on schedule


def test_multi_token_chunks_are_spread_using_usage(chunky_server):
    run = asyncio.run(run_load(specs(2, output_len=10), [0.0, 0.0], options(chunky_server.url)))
    for r in run.records:
        assert r.outcome is RequestOutcome.OK, r.error
        assert r.num_chunks == 4  # 1 + 3 + 3 + 3 tokens
        assert r.num_output_tokens == 10  # from the usage chunk, not the chunk count
        assert len(r.itl_s) == 9
        assert sum(r.itl_s) == pytest.approx(r.e2e_s - r.ttft_s)
        # Each 3-token chunk arrives 3 * TPOT after the last one: 3 gaps of ~TPOT.
        assert max(r.itl_s) < TPOT_S + SLACK_S and min(r.itl_s) >= TPOT_S * 0.9
        assert request_metrics(r, SLOConfig()).tpot_s == pytest.approx(TPOT_S, abs=0.01)


def test_continuous_usage_gives_exact_chunk_sizes(chunky_server):
    run = asyncio.run(run_load(specs(1, output_len=8), [0.0],
                               options(chunky_server.url, continuous_usage_stats=True)))
    r = run.records[0]
    assert r.outcome is RequestOutcome.OK and r.num_output_tokens == 8
    assert r.num_chunks == 4 and len(r.itl_s) == 7  # chunks of 1, 3, 3, 1 tokens
    assert r.itl_s[-1] == pytest.approx(TPOT_S, abs=SLACK_S)


def test_token_spreading_rules():
    assert tokens_per_chunk(4, 10, [None] * 4) == [1, 3, 3, 3]
    assert tokens_per_chunk(3, 6, [None] * 3) == [1, 3, 2]
    assert tokens_per_chunk(3, 3, [None] * 3) == [1, 1, 1]
    assert tokens_per_chunk(1, 5, [None]) == [5]
    assert tokens_per_chunk(3, 9, [2, 2, 9]) == [2, 0, 7]  # exact from cumulative usage
    gaps = inter_token_gaps([0.1, 0.2, 0.5, 0.8], [2, 0, 3, 1])
    # 1 extra token with the first (gap 0); the empty chunk's gap rolls into the next one.
    assert gaps == pytest.approx((0.0, 0.4 / 3, 0.4 / 3, 0.4 / 3, 0.3))


def test_http_error_is_recorded_with_the_servers_message(server):
    run = asyncio.run(run_load(specs(1, output_len=0), [0.0], options(server.url)))
    r = run.records[0]
    assert r.outcome is RequestOutcome.HTTP_ERROR
    assert "HTTP 400" in r.error and "max_tokens" in r.error


def test_request_timeout_and_drain_deadline(server):
    run = asyncio.run(run_load(specs(1, output_len=50), [0.0],
                               options(server.url, request_timeout_s=0.2)))
    assert run.records[0].outcome is RequestOutcome.TIMEOUT
    run = asyncio.run(run_load(specs(2, output_len=50), [0.0, 0.0],
                               options(server.url, drain_timeout_s=0.2)))
    assert {r.outcome for r in run.records} == {RequestOutcome.NOT_FINISHED}
    assert run.wall_time_s < 1.0
    s = summarize(run, SLOConfig())
    assert s.attainment == 0.0 and s.num_sent == 2


def test_duration_bound_stops_sending(server):
    run = asyncio.run(run_load(specs(5, output_len=2), [0.0, 0.05, 0.1, 1.0, 2.0],
                               options(server.url, duration_s=0.5)))
    assert len(run.records) == 3 and run.num_not_sent == 2
    assert run.wall_time_s < 0.9


def test_unreachable_server():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(BenchError, match=f"cannot reach the server at {url}"):
        check_server(url, timeout_s=2)
    run = asyncio.run(run_load(specs(1), [0.0], options(url)))
    assert run.records[0].outcome is RequestOutcome.CONNECTION_ERROR


def test_check_server_reads_the_model_id(server):
    assert check_server(server.url) == "fake-model"
    assert check_server(server.url, model="other") == "other"
